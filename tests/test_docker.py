"""``docker/``: Docker does not run on the machines the tests run on, so the files are checked
as far as that allows. The compose file loads and pins the broker the tests use; the commands
the image and the compose service run are run here, in a copy of the build context (the
repository minus ``.dockerignore``), on the test broker for the compose service, twice: a
second ``docker compose up`` must compute the same report again. Prometheus scrapes the port
the service serves its metrics on, and every query of the Grafana dashboard names a metric a
run exports."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support.kafka import KAFKA_BOOTSTRAP

import connectors
from pipelines import Pipeline, Topic
from pipelines.log.base import TopicPartition
from pipelines.runtime.metrics import RunCollector
from pipelines.runtime.progress import RunState
from pipelines.runtime.reset import Item, ResetPlan
from pipelines.runtime.sources import SourceProgress
from pipelines.runtime.topology import compile_pipeline
from pipelines.runtime.worker import WorkerReport

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


def compose() -> dict[str, object]:
    loaded = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def ignored(relative: str, patterns: list[str]) -> bool:
    """Whether ``.dockerignore`` leaves ``relative`` (a path in the repository) out of the
    build context: a pattern matches a path or a directory above it, from the root
    (``**/NAME`` matches NAME in any directory)."""
    parts = relative.split("/")
    for pattern in patterns:
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            if pattern.startswith("**/"):
                if fnmatch.fnmatchcase(parts[depth - 1], pattern.removeprefix("**/")):
                    return True
            elif fnmatch.fnmatchcase(prefix, pattern):
                return True
    return False


def build_context(into: Path) -> Path:
    """A copy of what ``docker build`` sends from the repository root: the files git knows,
    minus what ``.dockerignore`` leaves out."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    listed = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for relative in listed:
        if (ROOT / relative).is_file() and not ignored(relative, patterns):
            (into / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / relative, into / relative)
    return into


def in_image(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``sh -c COMMAND`` as the image runs it: in the build context, with ``python`` and
    ``headwater`` of the installed package."""
    bin_dir = cwd / ".bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").symlink_to(sys.executable)
    (bin_dir / "headwater").write_text(f'#!/bin/sh\nexec {sys.executable} -m pipelines.cli "$@"\n')
    (bin_dir / "headwater").chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HEADWATER_")}
    return subprocess.run(
        ["sh", "-c", command],
        cwd=cwd,
        env={**clean, **env, "PATH": f"{bin_dir}:{clean['PATH']}"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_compose_file_runs_the_broker_the_tests_run() -> None:
    services = compose()["services"]
    assert isinstance(services, dict)
    assert set(services) == {"kafka", "headwater", "prometheus", "grafana"}
    pom = (ROOT / "scripts" / "kafka-pom.xml").read_text()
    version = re.search(r"<kafka.version>([^<]+)</kafka.version>", pom)
    assert version is not None
    assert services["kafka"]["image"] == f"apache/kafka:{version[1]}"
    assert services["headwater"]["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    assert services["headwater"]["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}


def test_the_dockerfile_usage_line_runs_in_its_build_context(tmp_path: Path) -> None:
    text = (DOCKER / "Dockerfile").read_text()
    usage = re.search(r"-c '(.*?)'", " ".join(line.lstrip("# ") for line in text.splitlines()))
    assert usage is not None, "the Dockerfile no longer shows how to run the example"
    context = build_context(tmp_path / "app")
    done = in_image(usage[1], context, {})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "headwater: clickstream finished" in done.stderr
    assert "bad lines are on the dead-letter topic" in done.stdout


def report_of(stdout: str) -> str:
    """The report's lines of the service's output, without what ``headwater reset`` printed:
    the first ``up`` may find another run's leftovers on the broker, or none (its plan, with
    its indented items and what it keeps, each ``removed``/``kept`` line and the last word)."""
    report: list[str] = []
    in_plan = False
    for line in stdout.splitlines():
        if line.startswith(("resetting pipeline ", "nothing to reset ")):
            in_plan = True
        elif in_plan and (line.startswith("  ") or line == "and keeps:"):
            pass
        elif line.startswith(("removed ", "kept ", "headwater reset: ")):
            in_plan = False
        else:
            in_plan = False
            report.append(line)
    return "\n".join(report)


@pytest.mark.slow
def test_the_compose_service_computes_the_same_report_every_time_it_is_brought_up(
    tmp_path: Path,
) -> None:
    service = compose()["services"]["headwater"]
    assert service["entrypoint"] == ["sh", "-c"]
    (command,) = service["command"]
    # metrics on this machine only, on a free port (the container serves them to its network)
    assert "--metrics-port 9464 --metrics-host 0.0.0.0" in command
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = command.replace(
        "--metrics-port 9464 --metrics-host 0.0.0.0", f"--metrics-port {port}"
    )
    env = {**service["environment"], "HEADWATER_BOOTSTRAP_SERVERS": KAFKA_BOOTSTRAP}
    reports = []
    for up in ("first", "second"):
        context = build_context(tmp_path / up)  # each `up` is a new container
        done = in_image(command, context, env)
        assert done.returncode == 0, f"{up} up:\n{done.stdout}{done.stderr}"
        assert "headwater: clickstream finished" in done.stderr, done.stderr
        assert "source clicks: 100,000 records written" in done.stderr, done.stderr
        reports.append(report_of(done.stdout))
    assert reports[0] == reports[1]
    assert "bad lines are on the dead-letter topic" in reports[0]


def test_prometheus_scrapes_the_port_the_service_serves_metrics_on() -> None:
    (command,) = compose()["services"]["headwater"]["command"]
    port = re.search(r"--metrics-port (\d+)", command)
    assert port is not None
    scrape = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    assert job["static_configs"] == [{"targets": [f"headwater:{port[1]}"]}]
    mounts = compose()["services"]["prometheus"]["volumes"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    # --metrics-port needs the extra in the image
    assert "pip install '.[metrics]'" in (DOCKER / "Dockerfile").read_text()


def exported_metrics() -> set[str]:
    """The names a run's /metrics holds (counters with their ``_total``)."""
    pipeline = (
        Pipeline("p")
        .source(connectors.Iterable([1]), into=Topic("in"))
        .map("m", lambda v: v)
        .sink(connectors.Stdout())
    )
    state = RunState(compile_pipeline(pipeline), "embedded", 1)
    state.lag = {TopicPartition("in", 0): 0}
    state.reports[0] = WorkerReport(0, {"m": [1, 1, 0, 0, 0]}, [], 1)
    state.sources = [SourceProgress("in")]
    text = generate_latest(_registry(state)).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def _registry(state: RunState) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunCollector(state))
    return registry


def test_every_query_of_the_grafana_dashboard_names_an_exported_metric() -> None:
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "headwater.json").read_text())
    exported = exported_metrics()
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [v["query"] for v in dashboard["templating"]["list"]]
    assert len(queries) >= 6
    for query in queries:
        names = set(re.findall(r"\bheadwater_[a-z_]+", query))
        assert names, query
        assert names <= exported, f"{query}: {names - exported} not exported ({sorted(exported)})"
    provisioned = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "dashboards" / "headwater.yml").read_text()
    )
    assert provisioned["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    source = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert source["datasources"][0]["uid"] == "prometheus"
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {"prometheus"}


def test_the_report_leaves_out_what_reset_printed_whether_it_found_leftovers_or_not() -> None:
    report = "wrote 100 clicks\n64 views counted\n\n  minute  page  views\n  00:19   /p/1  756"
    found = ResetPlan("clickstream", "kafka", remove=[Item("topic", "t", "its records")])
    found.keep.append(Item("directory", "<data-dir>/state/clickstream/", "elsewhere too"))
    outputs = [
        "\n".join([*ResetPlan("clickstream", "kafka").lines(), report]),
        "\n".join([*found.lines(), "removed topic 't'", "kept x", "headwater reset: done", report]),
    ]
    assert [report_of(output) for output in outputs] == [report, report]
