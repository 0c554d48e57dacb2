"""The one training loop (pipeline/train/loop.py) in-process, with a stand-in engine: the stage's refresh hook runs
once per optimizer step (also under accumulation), a NaN loss from a test hook is skipped by every step unit, and
the window and checkpoint steps come where train.log_every / train.checkpoint_every put them. The Ray Train runs of
the spine and the privacy stage (test_spine_train, test_privacy_train) run the same loop for real."""
from __future__ import annotations

from contextlib import ExitStack, nullcontext
from types import SimpleNamespace

import pytest
import torch

from pipeline.config import TrainJobConfig
from pipeline.train import loop
from pipeline.train.checkpoint import TrainState


class Engine:
    """Counts micro-batches; an optimizer step at every ``accum``-th backward."""

    def __init__(self, accum: int) -> None:
        self.accum, self.backwards, self.steps = accum, 0, 0
        self.module = torch.nn.Linear(1, 1)

    def backward(self, loss):
        self.backwards += 1

    def is_gradient_accumulation_boundary(self):
        return self.backwards % self.accum == 0

    def step(self):
        self.steps += int(self.is_gradient_accumulation_boundary())

    def zero_grad(self):
        pass


class CountingStage(loop.Stage):
    def __init__(self, batches_per_epoch: int) -> None:
        self.per_epoch, self.refreshed_at, self.losses = batches_per_epoch, [], 0

    def epoch_batches(self, state):
        for i in range(state.batch_in_epoch, self.per_epoch):
            yield {"i": i}

    def before_step(self, state):
        self.refreshed_at.append(state.step)

    def loss(self, engine, batch):
        self.losses += 1
        return torch.tensor(1.0)

    def samples(self, batch):
        return 4


class NanAt(loop.LoopHooks):
    def __init__(self, index: int) -> None:
        self.index, self.after = index, []

    def on_loss(self, rank, batch_index, loss):
        return loss * float("nan") if batch_index == self.index else loss

    def after_step(self, rank, step, last_checkpoint_step):
        self.after.append((step, last_checkpoint_step))


@pytest.mark.parametrize("accum", [1, 2])
def test_one_loop_runs_a_stage_step_by_step(accum, monkeypatch):
    cfg = TrainJobConfig()
    cfg.train.steps, cfg.train.log_every, cfg.train.checkpoint_every, cfg.train.grad_accum_steps = 6, 2, 3, accum
    state = TrainState()
    ema = SimpleNamespace(updates=0, decay_at=lambda step: 0.5)
    ema.update = lambda module, decay: setattr(ema, "updates", ema.updates + 1)
    engine = Engine(accum)
    setup = SimpleNamespace(engine=engine, ema=ema, device=torch.device("cpu"), autocast=nullcontext(), state=state,
                            objective=None)
    windows, checkpoints = [], []
    monkeypatch.setattr(loop, "checkpoint_and_report", lambda ctx, stage, metrics: checkpoints.append(state.step))
    monkeypatch.setattr(loop.MetricReporter, "submit", lambda self, metrics: windows.append(metrics["step"]))
    stage, hooks = CountingStage(batches_per_epoch=5), NanAt(index=2)
    with ExitStack() as cleanups:
        ctx = loop.LoopContext(cfg=cfg, info=None, setup=setup, rank=0, world=1, loop_config={}, cleanups=cleanups,
                               hooks=hooks)
        loop.run(ctx, stage)
    assert state.step == 6 and engine.steps == 6 and ema.updates == 6
    assert state.bad_steps == 1 and stage.losses == 6 * accum + 1  # the NaN micro-batch was skipped, not stepped
    assert stage.refreshed_at == [0, 1, 2, 3, 4, 5]  # once per optimizer step, before its first micro-batch
    assert state.epoch == (6 * accum + 1) // 5 and state.batch_in_epoch == (6 * accum + 1) % 5
    assert windows == [2, 4] and checkpoints == [3, 6]  # step 6 is both: checkpointed, with its window's metrics
    assert hooks.after == [(1, 0), (2, 0), (3, 3), (4, 3), (5, 3), (6, 6)]
    assert ctx.startup_s is not None and ctx.first_window_step == 2


def test_too_many_nan_losses_abort_in_one_line():
    cfg = TrainJobConfig()
    cfg.train.steps, cfg.train.max_bad_steps = 4, 0
    state = TrainState()
    setup = SimpleNamespace(engine=Engine(1), ema=None, device=torch.device("cpu"), autocast=nullcontext(),
                            state=state, objective=None)
    with ExitStack() as cleanups, pytest.raises(loop.TooManyBadSteps, match=r"NaN/Inf in 1 steps"):
        loop.run(loop.LoopContext(cfg=cfg, info=None, setup=setup, rank=0, world=1, loop_config={},
                                  cleanups=cleanups, hooks=NanAt(index=0)), CountingStage(5))
