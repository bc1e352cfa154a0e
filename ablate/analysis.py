"""Diagnostics of the paper's setting, drawn: a run's loss curve, the loss CDFs of Figure 4 and the
loss family of Figure 1. The anchor imbalance, which a run measures, is in ablate.imbalance: training
never imports this module (the edges that run training draw the loss curve once it returns)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch

from ablate import builders
from ablate.checkpoint import load_checkpoint
from ablate.errors import ConfigError, one_line
from ablate.matching import IGNORED, Matcher


def parse_gammas(text: str) -> list[float]:
    """'0,0.5,1,2' (--gammas) as numbers, each finite and >= 0; else one ConfigError."""
    try:
        gammas = [float(g) for g in text.split(",")]
    except ValueError:
        raise ConfigError(f"--gammas: expected numbers separated by commas, got '{text}'") from None
    bad = [g for g in gammas if not (math.isfinite(g) and g >= 0)]
    if bad:
        raise ConfigError(f"--gammas: each gamma must be a finite number >= 0, got {bad[0]}")
    return gammas


def loss_curve_png(history: list[dict[str, float]], path: Path, title: str = "") -> None:
    """The run's loss_cls and loss_box_reg against iteration (log scale), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["iteration"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for key in ("loss_cls", "loss_box_reg"):
        ax.plot(steps, [h[key] for h in history], label=key)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def draw_loss_curve(run_dir: str | Path | None, title: str, console=None) -> None:
    """loss_curve.png in the folder of a run (`RunRecord.run_dir`), from its metrics.jsonl;
    nothing for a run that logged no line, or a rank without a folder (None). A plot that
    cannot be drawn (a font, a backend, a full disk) is a warning: the run's files and checkpoint
    are what matter, and the curve is in metrics.jsonl."""
    if run_dir is None:
        return
    run_dir = Path(run_dir)
    try:
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return
    if not history:
        return
    path = run_dir / "loss_curve.png"
    try:
        loss_curve_png(history, path, title=title)
    except Exception as e:  # noqa: BLE001 - any failure of the plotting stack
        message = f"warning: {path} not drawn ({type(e).__name__}: {one_line(e)}); the losses are in metrics.jsonl"
        if console:
            from rich.markup import escape

            console.print(escape(message), style="yellow", soft_wrap=True)
        else:
            warnings.warn(message, stacklevel=2)


def normalized_loss_cdf(losses: torch.Tensor, points: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's Figure 4 curve for one set of examples: sorted from lowest to highest loss, the
    cumulative share of the total loss against the fraction of examples.

    losses: float [E]. Returns (fraction [points], cumulative normalised loss [points]), sampled
    at evenly spaced fractions (the full curve of 10^6 points is no better to look at).
    """
    ordered = losses.double().sort().values
    cumulative = ordered.cumsum(0) / ordered.sum().clamp(min=1e-300)
    fraction = torch.linspace(1.0 / len(ordered), 1.0, points, dtype=torch.float64)
    index = (fraction * len(ordered)).ceil().long().clamp(1, len(ordered)) - 1
    return fraction, cumulative[index]


@torch.no_grad()
def collect_examples(model, loader, matcher: Matcher, device, max_negatives: int = 2_000_000,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the positive (anchor, its class) and negative (anchor, other class) examples of a
    trained model on a data set: (positives [P], negatives [<= max_negatives], random subsample).

    Ignored anchors count as neither, as in training.
    """
    model.eval()
    positives, negatives = [], []
    g = torch.Generator().manual_seed(seed)
    for batch in loader:
        batch = batch.to(device)
        cls_logits, _, anchors, _ = model(batch.images)
        cls_logits = cls_logits.float()
        matched = matcher(batch.gt_boxes, batch.gt_labels, anchors)
        labels = batch.gt_labels.gather(1, matched.clamp(min=0))
        is_pos = torch.zeros_like(cls_logits, dtype=torch.bool)
        is_pos.scatter_(2, labels.clamp(min=0)[..., None], (matched >= 0)[..., None])
        valid = (matched != IGNORED)[..., None].expand_as(is_pos)
        positives.append(cls_logits[is_pos].cpu())
        neg = cls_logits[valid & ~is_pos].cpu()
        # Keep each negative with the probability that leaves ~max_negatives over the whole set.
        rate = max_negatives * len(batch.images) / max(1, len(loader.dataset) * len(neg))
        negatives.append(neg[torch.rand(len(neg), generator=g) < rate])
    return torch.cat(positives), torch.cat(negatives)[:max_negatives]


def loss_cdf_png(positives: torch.Tensor, negatives: torch.Tensor, gammas: list[float], path: Path,
                 title: str = "") -> list[dict[str, float]]:
    """Figure 4: CDFs of the normalised focal loss (alpha = None) of positive and negative
    examples for each gamma; returns the curves as rows (gamma, side, fraction, cumulative)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ablate.losses import focal

    rows = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for ax, side, logits, target in ((axes[0], "positive", positives, 1.0), (axes[1], "negative", negatives, 0.0)):
        for gamma in gammas:
            losses = focal(logits, torch.full_like(logits, target), gamma, alpha=None)
            fraction, cumulative = normalized_loss_cdf(losses)
            ax.plot(fraction.numpy(), cumulative.numpy(), label=f"γ = {gamma:g}")
            rows += [{"gamma": gamma, "side": side, "fraction": float(f), "cumulative_loss": float(c)}
                     for f, c in zip(fraction, cumulative)]
        ax.set_title(f"{side} examples ({len(logits):,})")
        ax.set_xlabel(f"fraction of {side} examples")
        ax.set_ylabel("cumulative normalized loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return rows


def write_loss_cdf(checkpoint: Path, gammas: list[float], out_dir: Path, overrides: dict | None = None,
                   title: str | None = None) -> dict:
    """Figure 4 for one trained checkpoint on its val split: writes loss_cdf.png and loss_cdf.csv
    into out_dir; returns {"png", "csv", "positives", "negatives", "images"}."""
    import csv

    model, cfg, ckpt = load_checkpoint(checkpoint, overrides or {})
    device = builders.resolve_device(cfg.train.device)
    val_set, loader = builders.build_val_loader(cfg, builders.data_root(cfg))
    builders.check_same_classes(ckpt["class_names"], val_set, f"the checkpoint {checkpoint}")
    positives, negatives = collect_examples(model.to(device), loader, builders.build_matcher(cfg), device)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, table = out_dir / "loss_cdf.png", out_dir / "loss_cdf.csv"
    rows = loss_cdf_png(positives, negatives, gammas, png, title=title or f"{checkpoint} ({len(val_set)} val images)")
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {"png": png, "csv": table, "positives": len(positives), "negatives": len(negatives),
            "images": len(val_set)}


# ----------------------------------------------------------------------------- Figure 1

FIGURE1_GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)


def figure1_curves(p_t: torch.Tensor, gammas: tuple[float, ...] = FIGURE1_GAMMAS) -> dict[float, torch.Tensor]:
    """FL(p_t) for each gamma (alpha=None; gamma 0 is CE), via ablate.losses.focal on the logit of
    p_t. p_t: probabilities of the ground-truth class in (0, 1), any shape; float64 curves of its shape."""
    from ablate.losses import focal

    p = torch.as_tensor(p_t, dtype=torch.float64)
    logits = torch.log(p) - torch.log1p(-p)
    targets = torch.ones_like(p)
    return {g: focal(logits, targets, gamma=g, alpha=None) for g in gammas}


def plot_loss_vs_pt(path: Path) -> Path:
    """The paper's Figure 1, in the report's seaborn style: loss against the probability of the
    ground-truth class, for FIGURE1_GAMMAS."""
    import seaborn as sns

    from ablate.report.plots import new_figure, save_figure, style

    p_t = torch.linspace(1e-3, 1 - 1e-6, 600, dtype=torch.float64)
    with style():
        fig, ax = new_figure(6.5, 4.6)
        ax.axvspan(0.6, 1.0, color="0.9", zorder=0)
        ax.text(0.8, 2.6, "well-classified\nexamples", ha="center", va="center", fontsize=10)
        palette = sns.color_palette("tab10", len(FIGURE1_GAMMAS))
        for color, (gamma, loss) in zip(palette, figure1_curves(p_t).items()):
            label = "γ = 0 (CE)" if gamma == 0 else f"γ = {gamma:g}"
            ax.plot(p_t.numpy(), loss.numpy(), color=color, linewidth=2, label=label)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 5)
        ax.set_xlabel("probability of ground truth class")
        ax.set_ylabel("loss")
        ax.set_title(r"$\mathrm{CE}(p_t) = -\log(p_t)$,  $\mathrm{FL}(p_t) = -(1-p_t)^\gamma \log(p_t)$")
        ax.legend(loc="upper right")
        return save_figure(fig, path)
