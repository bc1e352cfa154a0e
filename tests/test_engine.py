"""ablate.engine: the training loop's plain arguments (iterations, logging, checkpoints, pruning,
divergence) and predict's post-processing and rescaling, on a tiny model and made-up batches."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ablate import engine
from ablate.criterion import DetectionLoss
from ablate.data.coco import collate
from ablate.model.retinanet import RetinaNet
from ablate.postprocess import Postprocess
from ablate.runs import Outcome


def _sample(image_id: int, size: int = 64, orig: tuple[int, int] = (64, 64)):
    g = torch.Generator().manual_seed(image_id)
    image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
    return image, {"boxes": torch.tensor([[8.0, 8.0, 40.0, 30.0]]), "labels": torch.tensor([1]),
                   "image_id": image_id, "orig_size": orig}


def _setup():
    torch.manual_seed(0)
    model = RetinaNet(3, trunk="tiny", tiny_widths=(4, 8, 8, 8, 8), fpn_channels=8, head_convs=1, head_channels=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    batches = itertools.repeat(collate([_sample(1), _sample(2)]))
    return model, optimizer, scheduler, batches


def _train(criterion=None, *, iterations: int, log_every: int = 10, amp: bool = True, state=None, **hooks):
    model, optimizer, scheduler, batches = _setup()
    logged, checkpoints = [], []
    parts = engine.TrainParts(model, criterion or DetectionLoss(), optimizer, scheduler)
    plan = engine.TrainPlan(torch.device("cpu"), iterations, log_every=log_every, amp=amp)
    hooks = engine.TrainHooks(log=lambda it, m: logged.append(it), checkpoint=checkpoints.append, show_progress=False,
                              **hooks)
    outcome = engine.train(parts, batches, plan, hooks=hooks, state=state)
    return outcome, logged, checkpoints


def test_iterations_log_every_and_checkpoint_every():
    outcome, logged, checkpoints = _train(iterations=5, log_every=2, checkpoint_every=2, amp=False)
    assert (outcome.status, outcome.iterations) == (Outcome.FINISHED, 5)
    assert logged == [2, 4, 5]  # every 2, and the last
    assert [h["iteration"] for h in outcome.history] == logged
    assert checkpoints == [2, 4]  # not at the end: the caller saves the final checkpoint
    first = outcome.history[0]
    assert first["num_fg"] > 0 and math.isfinite(first["loss"])
    assert first["loss"] == pytest.approx(first["loss_cls"] + first["loss_box_reg"], rel=1e-6)


def test_a_non_finite_loss_stops_the_run_as_diverged():
    def nan_at_two(*args):
        out = DetectionLoss()(*args)
        nan_at_two.calls += 1
        if nan_at_two.calls == 3:
            out["loss"] = out["loss"] * float("nan")
        return out
    nan_at_two.calls = 0
    outcome, logged, _ = _train(nan_at_two, iterations=5, log_every=1)
    assert (outcome.status, outcome.diverged_at, outcome.iterations) == (Outcome.DIVERGED, 2, 2)
    assert logged == [1, 2]


def test_the_evaluate_hook_can_prune_the_run():
    seen = []
    outcome, _, _ = _train(iterations=6, log_every=1, eval_every=2, evaluate=lambda it: seen.append(it) or it >= 4)
    assert seen == [2, 4] and (outcome.status, outcome.iterations) == (Outcome.PRUNED, 4)


def test_stop_saves_the_state_and_a_saved_state_continues_the_numbering():
    saved, calls = [], iter(range(1, 100))
    outcome, logged, _ = _train(iterations=6, log_every=2, amp=False, stop=lambda: next(calls) == 3, save_every=2,
                                save_state=lambda state: saved.append((state.iteration, set(state.sums))))
    assert (outcome.status, outcome.iterations, logged) == (Outcome.INTERRUPTED, 3, [2])
    assert saved == [(2, set()), (3, set(engine.LOGGED))]  # every 2, and when stopped: iteration 3 not yet logged
    state = engine.TrainState(iteration=3, history=outcome.history, sums={k: 0.0 for k in engine.LOGGED}, images=2,
                              interval_seconds=1.0)
    outcome, logged, _ = _train(iterations=6, log_every=2, amp=False, state=state)
    assert (outcome.status, outcome.iterations, logged) == (Outcome.FINISHED, 6, [4, 6])
    assert [h["iteration"] for h in outcome.history] == [2, 4, 6] and outcome.history is state.history


def test_predict_applies_the_postprocess_and_rescales_to_the_original_pixels():
    model, *_ = _setup()
    batch = collate([_sample(1, orig=(128, 32))])  # the file was 128 x 32 (h, w), resized to 64 x 64
    post = Postprocess(score_thresh=0.0, detections_per_img=5)
    (det,) = engine.predict(model, batch, post, torch.device("cpu"), amp=False)
    with torch.no_grad():
        cls_logits, box_deltas, anchors, per_level = model.eval()(batch.images)
    (raw,) = post(cls_logits, box_deltas, anchors, per_level, batch.image_sizes)
    assert len(det["scores"]) == 5
    assert torch.equal(det["scores"], raw["scores"]) and torch.equal(det["labels"], raw["labels"])
    torch.testing.assert_close(det["boxes"], raw["boxes"] * torch.tensor([0.5, 2.0, 0.5, 2.0]))
