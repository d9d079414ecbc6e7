"""Compare two runs' metrics key by key: `python scripts/compare_metrics.py RUN_A RUN_B`.

Walks every JSON and CSV under RUN_A/metrics and RUN_B/metrics. JSON files are flattened to dotted keys
and compared value by value; timing keys (names containing `time`, `seconds`, `_s` suffix, `duration`,
`started`, `host`) are skipped because they measure the machine, not the result. CSV files are compared
cell by cell on their common columns except timing columns. Prints one line per difference and a count;
exits 1 when a value other than a timing differs
(files present on one side only are listed and counted apart: outputs a change added or removed). This is how a refactor is shown not to move a result.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path
from typing import Any

TIMING = re.compile(r"(time|seconds|duration|started|finished|host|_s$|wall|elapsed)", re.I)


def flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, list):
        out = {}
        for i, v in enumerate(obj):
            out.update(flat(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: obj}


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def main(a: Path, b: Path) -> int:
    diffs, only, keys, files = [], [], 0, 0
    for fa in sorted((a / "metrics").rglob("*")):
        rel = fa.relative_to(a)
        fb = b / rel
        if fa.suffix not in (".json", ".csv"):
            continue
        if not fb.exists():
            only.append(f"{rel}: only in {a}")
            continue
        files += 1
        if fa.suffix == ".json":
            ja, jb = flat(json.loads(fa.read_text())), flat(json.loads(fb.read_text()))
            for k in sorted(set(ja) | set(jb)):
                if any(TIMING.search(part) for part in k.split(".")):
                    continue
                keys += 1
                if ja.get(k, "<absent>") != jb.get(k, "<absent>"):
                    diffs.append(f"{rel}: {k}: {ja.get(k, '<absent>')!r} != {jb.get(k, '<absent>')!r}")
        else:
            ra, rb = rows(fa), rows(fb)
            if len(ra) != len(rb):
                diffs.append(f"{rel}: {len(ra)} rows != {len(rb)} rows")
                continue
            for i, (x, y) in enumerate(zip(ra, rb, strict=True)):
                for c in sorted(set(x) & set(y)):
                    if TIMING.search(c):
                        continue
                    keys += 1
                    if x[c] != y[c]:
                        diffs.append(f"{rel}: row {i} {c}: {x[c]!r} != {y[c]!r}")
    for fb in sorted((b / "metrics").rglob("*")):
        if fb.suffix in (".json", ".csv") and not (a / fb.relative_to(b)).exists():
            only.append(f"{fb.relative_to(b)}: only in {b}")
    for d in only + diffs:
        print(d)
    print(f"{files} files in both, {keys} values compared (timings skipped): {len(diffs)} difference(s); "
          f"{len(only)} file(s) on one side only")
    return 1 if diffs else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
