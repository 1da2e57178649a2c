#!/usr/bin/env python
"""Collect a Hydra multirun (e.g. `-m ablation=captioner`) into one table, like the paper's Tables 3-4.

    python scripts/collect_runs.py multirun/train/2026-11-25_10-00-00 [--markdown out.md]

Reads each run's `.hydra/overrides.yaml` and `metrics.json` (written at the end of training) or
`results.json` (written by `python -m odise_pl.eval`, e.g. `-m ablation=ensemble`);
a row per run, named by the overrides that differ between runs.
"""

import argparse
import json
import sys
from pathlib import Path

import yaml

COLUMNS = (("pq", "PQ"), ("pq_th", "PQ th"), ("pq_st", "PQ st"), ("ap", "AP"), ("miou", "mIoU"))


def read_metrics(run: Path) -> dict | None:
    """A training run's metrics.json, or an evaluation run's results.json (first dataset), keys without 'val/'."""
    if (run / "metrics.json").is_file():
        return {k.split("/", 1)[-1]: v for k, v in json.loads((run / "metrics.json").read_text()).items()}
    if (run / "results.json").is_file():
        results = json.loads((run / "results.json").read_text())["results"]
        return next(iter(results.values())) if results else None
    return None


def collect(sweep_dir: Path) -> tuple[list[str], list[tuple[str, dict]]]:
    runs = []
    for run in sorted(sweep_dir.iterdir(), key=lambda p: (len(p.name), p.name)):
        over = run / ".hydra" / "overrides.yaml"
        if not over.is_file():
            continue
        overrides = yaml.safe_load(over.read_text()) or []
        metrics = read_metrics(run)
        error = run / "error.txt"  # a failed point (odise_pl/sweep.py)
        if metrics is None and error.is_file():
            metrics = {"error": " ".join(error.read_text().split())[:160]}
        runs.append((overrides, metrics))
    if not runs:
        raise SystemExit(f"error: no runs (folders with .hydra/overrides.yaml) in {sweep_dir}")
    common = set(runs[0][0]).intersection(*(set(o) for o, _ in runs))
    rows = [(", ".join(o for o in overrides if o not in common) or "(base)", m) for overrides, m in runs]
    return sorted(common), rows


def table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| run | " + " | ".join(n for _, n in COLUMNS) + " |", "|" + " --- |" * (len(COLUMNS) + 1)]
    for name, m in rows:
        if m is None or "error" in m:
            failed = f"(failed: {m['error']})" if m else "(failed: no metrics)"
            cells = [failed.replace("|", "/")] + [""] * (len(COLUMNS) - 1)
        else:
            cells = [f"{m[k]:.1f}" if k in m else "" for k, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--markdown", type=Path, help="also write the table here")
    a = p.parse_args(argv)
    if not a.sweep_dir.is_dir():
        print(f"error: not a folder: {a.sweep_dir}", file=sys.stderr)
        return 2
    common, rows = collect(a.sweep_dir)
    text = table(rows) + (f"\n\ncommon to all runs: {', '.join(common)}" if common else "")
    print(text)
    if a.markdown:
        a.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
