"""Print clicks per user and page from the pipeline's output: the busiest pairs and totals.

python examples/clickstream/report.py [out/product-views.jsonl]
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import orjson


def views_per_user_page(path: Path) -> Counter[tuple[str, str]]:
    """How many product views each (user, page) pair has in the output file."""
    with path.open("rb") as lines:
        return Counter((v["user"], v["page"]) for v in map(orjson.loads, lines))


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "out/product-views.jsonl")
    if not path.is_file():
        sys.exit(f"no output at {path}: run `headwater run examples/clickstream/pipeline.py` first")
    counts = views_per_user_page(path)
    print(f"{sum(counts.values()):,} product views by {len({u for u, _ in counts}):,} users")
    print(f"{'user':<12} {'page':<10} {'views':>5}")
    for (user, page), views in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:10]:
        print(f"{user:<12} {page:<10} {views:>5}")


if __name__ == "__main__":
    main()
