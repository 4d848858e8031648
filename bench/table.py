"""Print bench/results/*.json as one Markdown table (what README's benchmark tables hold).

    python -m bench.table
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    print("| benchmark | key | value |\n| --- | --- | --- |")
    for path in sorted(RESULTS.glob("*.json")):
        for key, value in json.loads(path.read_text()).items():
            if isinstance(value, (int, float, str)):
                print(f"| {path.stem} | `{key}` | {value} |")


if __name__ == "__main__":
    main()
