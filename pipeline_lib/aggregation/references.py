"""ARDist reference points: this run's own baselines, or a published table shipped with the package.

A published table is pipeline_lib/references/<name>.csv with columns
    method, dataset, arch, clean, autoattack, source_id, source, note
(accuracies in percent; `source` cites where each number comes from, `note` says
what is not a published number). Several rows may share a method (one per source).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources

from .config import reference_tables

PUBLISHED_COLUMNS = ("method", "dataset", "arch", "clean", "autoattack", "source_id", "source", "note")


@dataclass(frozen=True)
class ReferencePoint:
    method: str
    standard: float     # percent
    robust: float       # percent
    source: str         # "this run" or the citation
    dataset: str | None = None
    arch: str | None = None


def load_published_table(name: str) -> list[dict[str, str]]:
    """Rows of a shipped reference table, checked for the expected columns and numeric accuracies."""
    if name not in reference_tables():
        raise ValueError(f"unknown published table {name!r}; shipped: {', '.join(reference_tables())}")
    text = (resources.files("pipeline_lib") / "references" / f"{name}.csv").read_text(encoding="utf-8")
    reader = csv.DictReader(io.StringIO(text))
    missing = set(PUBLISHED_COLUMNS) - set(reader.fieldnames or [])
    if missing:
        raise ValueError(f"reference table {name}.csv lacks column(s) {sorted(missing)}")
    rows = list(reader)
    for i, row in enumerate(rows, start=2):   # line 1 is the header
        for col in ("clean", "autoattack"):
            try:
                value = float(row[col])
            except ValueError:
                raise ValueError(f"{name}.csv line {i}: {col}={row[col]!r} is not a number") from None
            if not 0.0 <= value <= 100.0:
                raise ValueError(f"{name}.csv line {i}: {col}={value} is not a percentage")
        if not row["source"].strip():
            raise ValueError(f"{name}.csv line {i}: method {row['method']!r} has no source")
    return rows


def published_points(table: str, methods: Sequence[str], sources: Sequence[str] | None = None) -> list[ReferencePoint]:
    """The table's (clean, AutoAttack) points of `methods`, optionally only rows whose source_id is in `sources`."""
    rows = load_published_table(table)
    if sources is not None:
        known = {r["source_id"] for r in rows}
        unknown = sorted(set(sources) - known)
        if unknown:
            raise ValueError(f"published_sources {unknown} not in {table}.csv; its source_ids: {sorted(known)}")
    return [ReferencePoint(r["method"], float(r["clean"]), float(r["autoattack"]),
                           f"{r['source']}" + (f" ({r['note']})" if r["note"] else ""), r["dataset"], r["arch"])
            for r in rows if r["method"] in methods and (sources is None or r["source_id"] in sources)]


def own_points(methods: Sequence[str], standard: Mapping[str, float],
               robust: Mapping[str, float | None]) -> list[ReferencePoint]:
    """This run's points of the reference models that were evaluated (in `methods` order)."""
    return [ReferencePoint(m, standard[m], r, "this run") for m in methods
            if m in standard and (r := robust.get(m)) is not None]
