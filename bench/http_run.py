"""What a whole run takes in over HTTP: records/s acknowledged by ``headwater run``'s HttpSource
once they are on the embedded log.

    python bench/http_run.py [--records N] [--per-post P] [--clients C] [--workers W]
                             [--batch-size B] [--smoke]

``headwater run`` (a real runner process, its workers, the embedded log in a temporary
directory) runs a pipeline of one HttpSource on a free port of 127.0.0.1 into a 4-partition
topic, and a ``filter`` that keeps nothing behind it (the workers read the topic; nothing is
written after). ``--clients`` aiohttp clients in this process post NDJSON bodies of
``--per-post`` records (made before the clock starts, as ``bench/http_ingest.py`` makes them)
until ``--records`` records are acknowledged: a 200 means the records are durable on the log.
It prints the records/s acknowledged and the POST latency p50 / p99 / max, then stops the run
with Ctrl-C (SIGINT) and checks that the source wrote every record.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
from http_ingest import make_bodies, percentile

from connectors.http import NDJSON

MODULE = """
from connectors.http import HttpSource
from pipelines import Pipeline, Topic

pipeline = (
    Pipeline("ingest")
    .source(HttpSource(port={port}, batch_size={batch}), into=Topic("clicks", partitions=4))
    .filter("nothing", lambda click: False)
)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def wait_until_up(url: str, runner: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            if runner.poll() is not None:
                sys.exit(f"headwater run ended with status {runner.returncode} before serving")
            try:
                async with session.get(url) as answer:
                    if answer.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    sys.exit(f"nothing answered at {url}")


async def post_all(
    url: str, bodies: list[tuple[bytes, int]], clients: int
) -> tuple[float, list[float]]:
    """Seconds until every body is acknowledged, and each POST's latency."""
    queue = list(reversed(bodies))
    latencies: list[float] = []

    async def client(session: aiohttp.ClientSession) -> None:
        while queue:
            body, _ = queue.pop()
            began = time.perf_counter()
            while True:
                async with session.post(url, data=body, headers={"Content-Type": NDJSON}) as got:
                    if got.status == 200:
                        break
                    if got.status != 429:
                        sys.exit(f"the source answered {got.status}: {await got.text()}")
                await asyncio.sleep(0.01)
            latencies.append(time.perf_counter() - began)

    async with aiohttp.ClientSession() as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        return time.perf_counter() - start, latencies


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=500_000)
    parser.add_argument("--per-post", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=10_000, help="HttpSource batch_size")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run, for tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.records, args.clients = 20_000, 2
    port = free_port()
    bodies = make_bodies(args.records, args.per_post, "ndjson")
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        module = directory / "ingest.py"
        module.write_text(textwrap.dedent(MODULE.format(port=port, batch=args.batch_size)))
        command = [sys.executable, "-m", "pipelines.cli", "run", str(module), "--no-progress"]
        command += ["--workers", str(args.workers), "--data-dir", str(directory / "data")]
        env = {k: v for k, v in os.environ.items() if not k.startswith("HEADWATER_")}
        runner = subprocess.Popen(command, cwd=directory, env=env, stderr=subprocess.PIPE)
        try:
            url = f"http://127.0.0.1:{port}/ingest"
            asyncio.run(wait_until_up(url, runner))
            seconds, latencies = asyncio.run(post_all(url, bodies, args.clients))
        finally:
            runner.send_signal(signal.SIGINT)
            _, stderr = runner.communicate(timeout=60)
    written = re.search(r"source clicks: ([\d,]+) records written", stderr.decode())
    if written is None or int(written.group(1).replace(",", "")) != args.records:
        sys.exit(f"the source did not write {args.records:,} records:\n{stderr.decode()}")
    print(
        f"{args.records:,} records, {args.per_post:,} a POST, {args.clients} clients, "
        f"{args.workers} worker(s), batch_size {args.batch_size:,}"
    )
    p50, p99 = percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000
    print(
        f"acknowledged on the log: {args.records / seconds:,.0f} records/s, POST latency "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {max(latencies) * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
