"""ablate.runner: training imports no plotting, and the run folder's plot is drawn by its caller."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHECK = """
import sys
{before}
plotting = sorted(m for m in sys.modules if m.split(".")[0] in ("matplotlib", "seaborn")
                  or m.startswith(("ablate.report", "ablate.analysis")))
assert not plotting, plotting[:5]
"""

def _check(code: str, cwd: Path) -> None:
    result = subprocess.run([sys.executable, "-c", CHECK.format(before=code)], cwd=cwd, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_importing_training_imports_no_plotting(tmp_path: Path):
    _check("import ablate.runner, ablate.engine, ablate.imbalance", tmp_path)


def test_a_training_run_imports_no_plotting(tmp_path: Path, tiny_coco: Path):
    """run_training to the end (train, checkpoint, evaluate, write): still no plotting module; the
    edge that ran it draws loss_curve.png from metrics.jsonl afterwards."""
    overrides = {"data.source": "coco", "data.root": str(tiny_coco), "data.cache_images": False,
                 "data.min_size": 64, "data.max_size": 64, "train.batch_size": 2, "train.iterations": 2,
                 "train.log_every": 1, "train.out_dir": str(tmp_path / "runs")}
    code = ("from ablate.config import build_config\nfrom ablate.runner import run_training\n"
            f"summary = run_training(build_config('tiny', {overrides!r}), name='t', console=None, show_progress=False)\n"
            f"open({str(tmp_path / 'run_dir.txt')!r}, 'w').write(summary['run_dir'])")
    _check(code, tmp_path)
    run_dir = Path((tmp_path / "run_dir.txt").read_text())
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    assert not (run_dir / "loss_curve.png").exists()
    from ablate.analysis import draw_loss_curve

    draw_loss_curve({"run_dir": str(run_dir)}, "t")
    assert (run_dir / "loss_curve.png").stat().st_size > 0
