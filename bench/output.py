"""Where every benchmark leaves its numbers: <out>/<name>.json, written whole or not at
all (bench.table reads them), and the same on stdout for whoever ran it."""

from __future__ import annotations

import json
import os
from pathlib import Path


def save(results: dict, out: Path | str | None, name: str, hide: tuple[str, ...] = ()) -> None:
    """`hide`: bulky keys kept in the file but not printed (e.g. RSS samples)."""
    if out is not None:
        target = Path(out) / f"{name}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".json.tmp")
        partial.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(partial, target)
    print(json.dumps({k: v for k, v in results.items() if k not in hide}, indent=2))
