"""`ablate ui` in a real browser (headless Chromium, tests/browser.py) after a tiny grid and its
report: what a person sees on the pages `ablate ui` prints, after a reload, and the report page
with its plots. Screenshots go to /tmp/ui-shots/ (outside the repository), to look at by eye.
"""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from browser import browser
from cli import app
from servers import free_port

pytestmark = pytest.mark.slow
SHOTS = Path("/tmp/ui-shots")

EXPERIMENT = """
description = "Two cells in seconds, for the browser test."
preset = "tiny"
seeds = [0, 1]
baseline = "focal"

[report]
x = "loss.cls"

[config]
synth.num_train = 16
synth.num_val = 8
train.batch_size = 8
train.iterations = 2
train.warmup_iters = 1
train.log_every = 1
data.num_workers = 0

[grid]
"loss.cls" = ["focal", "alpha_ce"]
"""
# A person clicks what they read: the element whose own text is `text` (or its clickable parent).
CLICK = """(() => {{
  const e = [...document.querySelectorAll('a, button, span, div')].find(e => e.textContent.trim() === {text!r}
      && [...e.children].every(c => c.textContent.trim() !== {text!r}));
  if (!e) return false;
  (e.closest('a, button, [role=button]') || e).click();
  return true;
}})()"""
GROUPED = ("document.body.innerText.includes('Group: focal') && document.body.innerText.includes('Group: alpha_ce')"
           " && ['AP', 'AP50', 'AP75'].every(h => [...document.querySelectorAll('[role=columnheader], th')]"
           ".some(c => c.innerText.trim() === h))")


def invoke(*args: str) -> str:
    saved, sys.argv = sys.argv, ["ablate", *args]
    try:
        result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    finally:
        sys.argv = saved
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def tiny_grid(tmp_path, monkeypatch) -> Path:
    """A folder with a 2-cell x 2-seed grid tracked in mlflow.db and its report written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "browse.toml").write_text(EXPERIMENT)
    invoke("run", "experiments/browse.toml", "--no-progress")
    invoke("report", "experiments/browse.toml")
    return tmp_path


def start_ui(folder: Path, port: int) -> tuple[subprocess.Popen, dict[str, str], str]:
    """`ablate ui browse` as a user starts it; returns it, {page: URL} from what it printed, and
    what it printed, once the server answers."""
    proc = subprocess.Popen([sys.executable, "-m", "cli", "ui", "browse", "--port", str(port)], cwd=folder,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "400"})  # one URL per line
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    urls, seen = {}, []
    deadline = time.monotonic() + 300
    # The URLs are listed while the server boots: on a busy machine after uvicorn's own lines.
    while ("Uvicorn running" not in "".join(seen) or len(urls) < 2) and time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        found = re.match(r"\s+browse (report|runs): (http\S+)", line)
        if found:
            urls[found.group(1)] = found.group(2)
    return proc, urls, "".join(seen)


async def check_pages(urls: dict[str, str], report_file: Path) -> None:
    async with browser() as page:
        # The Runs table: the cells as groups, AP, AP50, AP75 as columns.
        await page.goto(urls["runs"])
        await page.wait_for(GROUPED)
        await page.screenshot(SHOTS / "1-runs-table.png")
        # A reload drops MLflow's shared view (its URL now carries filters); the experiment's
        # description, shown on every page of it, leads back in one click.
        await page.reload()
        await page.wait_for("document.body.innerText.includes('cells: the Runs table grouped by cell')")
        await page.screenshot(SHOTS / "2-after-reload.png")
        link = await page.evaluate("[...document.links].filter(a => a.textContent.trim() === "
                                   "'cells: the Runs table grouped by cell').map(a => [a.href, a.target])[0]")
        assert link and "viewStateShareKey=ablate" in link[0], link
        await page.goto(link[0])  # where the click leads (the UI opens description links in a new tab)
        await page.wait_for(GROUPED)
        # Saved as the user's own view once ("Override saved view"), it survives reloads.
        assert await page.evaluate(CLICK.format(text="Override saved view"))
        await page.wait_for("!document.body.innerText.includes('Override saved view')")
        await page.reload()
        await page.wait_for(GROUPED)
        await page.screenshot(SHOTS / "3-own-view-after-reload.png")

        # The report page in MLflow's artifact viewer: the table and every plot drawn.
        await page.goto(urls["report"])
        await page.wait_for("!!document.querySelector('iframe.mlflow-html-iframe')")
        frame = await page.frame_session("blob:")
        await page.wait_for("document.images.length >= 3 && [...document.images].every(i => i.complete)", session=frame)
        widths = await page.evaluate("[...document.images].map(i => i.naturalWidth)", frame)
        assert all(w > 0 for w in widths), widths
        text = await page.evaluate("document.body.innerText", frame)
        assert "Verdicts against the baseline" in text and "alpha_ce" in text and "AP 95% CI" in text
        await page.screenshot(SHOTS / "4-report-in-mlflow.png")

        # The same file from disk: self-contained, plots embedded.
        await page.goto(report_file.as_uri())
        await page.wait_for("document.images.length >= 3 && [...document.images].every(i => i.complete)")
        assert all(w > 0 for w in await page.evaluate("[...document.images].map(i => i.naturalWidth)"))
        links = await page.evaluate("[...document.links].map(a => a.href)")
        assert any("searchFilter=" in link for link in links)  # each cell's runs in MLflow
        await page.screenshot(SHOTS / "5-report-from-disk.png")


@pytest.mark.timeout(1200)  # a grid, its report, the UI and a browser on 2 shared cores
def test_a_person_sees_the_cells_and_the_report_in_the_browser(tiny_grid):
    proc, urls, printed = start_ui(tiny_grid, free_port())
    try:
        assert set(urls) == {"report", "runs"}, printed
        assert urls["report"].endswith("/artifactPath/report/report.html?workflowType=machine_learning")
        asyncio.run(check_pages(urls, tiny_grid / "reports" / "browse" / "report.html"))
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output
    assert "Traceback" not in output
