"""Write a deterministic clickstream as JSON Lines: ``python examples/clickstream/generate.py``.

The same arguments always produce the same file: by default 100,000 clicks over 20 minutes of
event time, shaped to show what the pipeline does with it:

- a few hot product pages: page ``/p/n`` is visited in proportion to ``1/n`` (Zipf), and about
  a third of the clicks are on pages that are not products (``/``, ``/search``, ``/cart``...);
- bounded disorder: a click's ``ts`` is up to 8 s earlier than its place in the file implies,
  as clicks from many browsers arrive in about, not exactly, the order they happened;
- :data:`VERY_LATE` clicks an hour behind, from a phone that was offline: far beyond the
  disorder the pipeline allows, so they go to its late-data topic;
- about one line in ten thousand is bad on purpose (malformed JSON, or a click without a
  user), for the dead-letter topic.
"""

from __future__ import annotations

import argparse
import random
from datetime import UTC, datetime, timedelta
from itertools import accumulate
from pathlib import Path

import orjson

PRODUCT_PAGES = [f"/p/{n}" for n in range(1, 51)]
OTHER_PAGES = ["/", "/search", "/cart", "/checkout", "/help"]
PAGES = [*PRODUCT_PAGES, *OTHER_PAGES]
WEIGHTS = [*(1 / n for n in range(1, len(PRODUCT_PAGES) + 1)), 1.0, 0.8, 0.4, 0.2, 0.1]
"""How often each of :data:`PAGES` is visited, relatively: ``1/n`` for ``/p/n``."""

START = datetime(2026, 1, 1, tzinfo=UTC)
SPAN = timedelta(minutes=20)
"""The event time the clicks cover, whatever their number."""
DISORDER_MS = 8_000
"""The most a click's ``ts`` is earlier than its place in the file implies."""
VERY_LATE = 10
"""How many clicks are an hour behind (on the least visited product pages)."""
VERY_LATE_BY = timedelta(hours=1)


def very_late_positions(count: int) -> set[int]:
    """Where, among ``count`` lines, the very late clicks are: spread over the second half."""
    return {count * (VERY_LATE + k) // (2 * VERY_LATE) for k in range(VERY_LATE)}


def _ts(n: int, count: int, rng: random.Random, late: bool) -> str:
    """The event time of the ``n``-th of ``count`` clicks, as ISO-8601 with milliseconds."""
    in_order = START + timedelta(milliseconds=DISORDER_MS) + SPAN * n / count
    behind = VERY_LATE_BY if late else timedelta(milliseconds=rng.randrange(DISORDER_MS + 1))
    return (in_order - behind).isoformat(timespec="milliseconds")


def _line(click: dict[str, str], n: int) -> bytes:
    """``click`` as a JSON line, or, at a few places, as a bad one."""
    if n % 10_007 == 5_000:
        return orjson.dumps(click)[:-9]  # cut short: malformed JSON
    if n % 10_009 == 7_000:
        del click["user"]  # valid JSON, but not a Click
    return orjson.dumps(click)


def clicks(count: int, seed: int) -> list[bytes]:
    """``count`` lines of clickstream, the same for the same seed (see the module docstring)."""
    rng = random.Random(seed)
    users = [f"user-{n:04d}" for n in range(1000)]
    pages = rng.choices(PAGES, cum_weights=list(accumulate(WEIGHTS)), k=count)
    late = very_late_positions(count)
    lines = []
    for n, page in enumerate(pages):
        click = {
            "user": rng.choice(users),
            "url": rng.choice(PRODUCT_PAGES[-10:]) if n in late else page,
            "ts": _ts(n, count, rng, n in late),
            "session": f"s-{rng.randrange(20_000)}",
        }
        lines.append(_line(click, n))
    return lines


def main() -> None:
    """Write the clicks to ``--out`` (``data/clicks.jsonl``)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("data/clicks.jsonl"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(b"\n".join(clicks(args.events, args.seed)) + b"\n")
    print(f"wrote {args.events:,} clicks to {args.out}")


if __name__ == "__main__":
    main()
