"""How often does the regression gate cry wolf? Re-run the `ci` profile with several training seeds
(unchanged code: every difference is noise) and gate each run against a baseline.

    python benchmarks/gate_false_alarms.py --seeds 0 1 2 3        # seed 0's run becomes the baseline
    python benchmarks/gate_false_alarms.py --seeds 1 2 --baseline baselines/ci.json

Prints, per re-seeded run, the paired gate's verdict (`--records`: accuracies against the baseline's
own examples) and the fixed-tolerance verdict of the same gate without records (what the gate did
before), then the false-alarm counts. A scratch repository under a temporary folder runs the
pipeline (the checkout stays clean); each seed costs one full `ci` repro (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["pipeline_lib", "stages", "conf", "dvc.yaml", "params.yaml", ".dvcignore"]


def _env(root: Path, store: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PYTHONPATH=str(root), DVC_NO_ANALYTICS="1", MLFLOW_TRACKING_URI=f"sqlite:///{store}",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return env


def _run(cmd: list[str], root: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        sys.exit(f"`{' '.join(cmd)}` exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def scratch_repo(base: Path) -> tuple[Path, dict[str, str]]:
    root = base / "repo"
    root.mkdir()
    env = _env(root, base / "mlflow.db")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in PROJECT_FILES:
        src = REPO / name
        (shutil.copytree(src, root / name, ignore=ignore) if src.is_dir() else shutil.copy2(src, root / name))
    data = REPO / "data"
    if data.is_dir():   # a checkout's downloaded datasets; otherwise the loader's system copy
        # linked one by one: data/corrupted/ holds the corrupt stage's DVC output, which must be the
        # scratch repo's own (a path through a link into the checkout makes `dvc repro` fail)
        (root / "data").mkdir()
        for entry in data.iterdir():
            if entry.name != "corrupted":
                (root / "data" / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    _run(["git", "init", "-q"], root, env)
    _run([sys.executable, "-m", "dvc", "init", "-q"], root, env)
    _run(["arpipe", "profile", "ci"], root, env)
    return root, env


def run_seed(root: Path, env: dict[str, str], seed: int, out: Path) -> Path:
    """`dvc repro` of the ci profile with training seed `seed`; its summary and records copied to `out`."""
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["seed"] = seed
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _run([sys.executable, "-m", "dvc", "repro", "-q"], root, env)
    out.mkdir(parents=True)
    shutil.copy2(root / "metrics" / "aggregate" / "summary.json", out / "summary.json")
    shutil.copytree(root / "metrics" / "eval_detail", out / "records")
    return out


def gate(root: Path, env: dict[str, str], baseline: Path, run: Path, paired: bool) -> tuple[bool, str]:
    cmd = ["arpipe", "gate", "--baseline", str(baseline), "--current", str(run / "summary.json"),
           "--params", str(root / "params.yaml")]
    if paired:
        cmd += ["--records", str(run / "records")]
    proc = _run(cmd, root, env, check=False)
    if proc.returncode not in (0, 1):
        sys.exit(f"gate exited {proc.returncode}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    failed = [line.strip() for line in proc.stdout.splitlines() if "REGRESSED" in line or "MISSING" in line]
    return proc.returncode == 1, "; ".join(failed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--baseline", type=Path, default=None,
                    help="baseline JSON to gate against (default: the first seed's run, with its records)")
    args = ap.parse_args()
    if args.baseline is None and len(args.seeds) < 2:
        sys.exit("--seeds needs a baseline seed and at least one more (or give --baseline)")
    with tempfile.TemporaryDirectory(prefix="gate-bench-") as tmp:
        base = Path(tmp)
        root, env = scratch_repo(base)
        seeds = list(args.seeds)
        # the gate runs in the scratch repository: a baseline given relative to the caller's folder is resolved here
        baseline = None if args.baseline is None else args.baseline.resolve()
        if baseline is not None and not baseline.is_file():
            sys.exit(f"--baseline {args.baseline}: no such file")
        if baseline is None:
            first = seeds.pop(0)
            run = run_seed(root, env, first, base / f"seed{first}")
            baseline = base / "baseline.json"
            _run(["arpipe", "gate", "--update", "--baseline", str(baseline), "--current", str(run / "summary.json"),
                  "--records", str(run / "records"), "--params", str(root / "params.yaml")], root, env)
            print(f"baseline: seed {first}")
        alarms = {"paired": 0, "fixed tolerance": 0}
        for seed in seeds:
            run = run_seed(root, env, seed, base / f"seed{seed}")
            for label, paired in (("paired", True), ("fixed tolerance", False)):
                failed, why = gate(root, env, baseline, run, paired)
                alarms[label] += failed
                print(f"seed {seed}: {label:<15} {'FALSE ALARM' if failed else 'pass'}  {why}")
        for label, count in alarms.items():
            print(f"{label} gate: {count} false alarm(s) in {len(seeds)} re-seeded run(s) of unchanged code")


if __name__ == "__main__":
    main()
