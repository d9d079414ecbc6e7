"""Screenshots for the README's "Compare runs": the MLflow compare view of one execution's model runs
and DVC's plots page, taken in headless Chromium (Debian's `chromium` + `chromium-driver`, driven by
selenium), with the MLflow server bound to 127.0.0.1.

    python scripts/screenshots.py --store mlflow.db [--plots-html dvc_plots/index.html] [--out docs/images]

`--plots-html`: the page `dvc plots show` wrote (rendered offline: image plots only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")


@contextlib.contextmanager
def mlflow_server(store: Path) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{store.resolve()}", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600   # a loaded 2-core machine took 175 s to start it
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        else:
            raise SystemExit("mlflow server did not answer on 127.0.0.1")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def chromium(width: int, height: int) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    with tempfile.TemporaryDirectory() as profile:
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
            opts.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
        try:
            yield driver
        finally:
            driver.quit()


def latest_model_runs(url: str, experiment: str) -> tuple[str, str, list[str]]:
    """(experiment id, parent run id, model run ids) of the newest execution in the store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r} in the store")
    [parent] = client.search_runs([exp.experiment_id], "tags.`arpipe.role` = 'execution'", max_results=1,
                                  order_by=["attributes.start_time DESC"]) or [None]
    if parent is None:
        raise SystemExit("no execution run in the store: run the aggregate stage first")
    models = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
                                " and tags.`arpipe.role` = 'model'")
    return str(exp.experiment_id), parent.info.run_id, [r.info.run_id for r in models]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=Path("mlflow.db"))
    ap.add_argument("--experiment", default="arpipe")
    ap.add_argument("--plots-html", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("docs/images"))
    ap.add_argument("--url", default=None, help="an MLflow server already running on 127.0.0.1 over --store")
    ap.add_argument("--wait", type=float, default=12.0, help="seconds for a page to render")
    args = ap.parse_args()
    if not args.store.is_file():
        raise SystemExit(f"--store {args.store}: no such file")
    args.out.mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext(args.url) if args.url else mlflow_server(args.store)) as url:
        exp_id, parent, runs = latest_model_runs(url, args.experiment)
        compare = (f"{url}/#/compare-runs?runs={urllib.parse.quote(json.dumps(runs))}"
                   f"&experiments={urllib.parse.quote(json.dumps([exp_id]))}")
        with chromium(1600, 2200) as driver:
            driver.get(compare)   # type: ignore[attr-defined]
            time.sleep(args.wait)
            driver.save_screenshot(str(args.out / "mlflow_compare.png"))   # type: ignore[attr-defined]
            driver.get(f"{url}/#/experiments/{exp_id}/runs/{runs[0]}/artifacts")   # type: ignore[attr-defined]
            time.sleep(args.wait)
            driver.save_screenshot(str(args.out / "mlflow_model_run_artifacts.png"))   # type: ignore[attr-defined]
    if args.plots_html is not None:
        with chromium(1400, 2600) as driver:
            driver.get(args.plots_html.resolve().as_uri())   # type: ignore[attr-defined]
            time.sleep(3)
            driver.save_screenshot(str(args.out / "dvc_plots.png"))   # type: ignore[attr-defined]
    print(f"wrote {', '.join(str(p) for p in sorted(args.out.glob('*.png')) if p.stat().st_mtime > time.time() - 600)}")


if __name__ == "__main__":
    main()
