"""Write a deterministic clickstream as JSON Lines: ``python examples/clickstream/generate.py``.

The same arguments always produce the same file. About one line in ten thousand is bad on
purpose (malformed JSON, or a click without a user) to show the dead-letter topic at work.
"""

from __future__ import annotations

import argparse
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

PAGES = [f"/p/{n}" for n in range(200)] + ["/", "/search", "/cart", "/checkout", "/help"]
START = datetime(2026, 1, 1, tzinfo=UTC)


def clicks(count: int, seed: int) -> list[bytes]:
    """``count`` lines of clickstream, the same for the same seed."""
    rng = random.Random(seed)
    users = [f"user-{n:04d}" for n in range(1000)]
    lines = []
    for n in range(count):
        click = {
            "user": rng.choice(users),
            "url": rng.choice(PAGES),
            "ts": (START + timedelta(milliseconds=n * 250)).isoformat(),
            "session": f"s-{rng.randrange(20_000)}",
        }
        if n % 10_007 == 5_000:
            lines.append(orjson.dumps(click)[:-9])  # cut short: malformed JSON
        elif n % 10_009 == 7_000:
            del click["user"]  # valid JSON, but not a Click
            lines.append(orjson.dumps(click))
        else:
            lines.append(orjson.dumps(click))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("data/clicks.jsonl"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(b"\n".join(clicks(args.events, args.seed)) + b"\n")
    print(f"wrote {args.events:,} clicks to {args.out}")


if __name__ == "__main__":
    main()
