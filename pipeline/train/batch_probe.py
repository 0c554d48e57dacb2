"""``data.batch_size=auto``: the largest per-worker batch whose training step fits in the accelerator's memory.

Search: double from ``start`` while a step fits, then bisect between the last batch that fitted and the first that
did not (``O(log B)`` trial steps). Each trial is one real training step (forward, backward, optimizer step, EMA
update) of a throwaway copy of the run's model, so the parameters, gradients, AdamW moments, EMA and activations
of that batch are all allocated; an out-of-memory error means "does not fit". The result then keeps
``HEADROOM`` of it (rounded down to a multiple of 8 when above 8) for what the trial does not allocate: DeepSpeed's
flat gradient buffers and the memory allocator's fragmentation over a long run.

CPU runs have no fixed memory to fill (a batch "fits" until the host swaps), so ``auto`` is refused there in one
line naming the setting (``TrainJobConfig`` refuses ``data.batch_size=auto`` without ``train.use_gpu=true``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

HEADROOM = 0.9
MAX_BATCH = 1 << 16


def largest_fitting(fits: Callable[[int], bool], start: int = 1, limit: int = MAX_BATCH) -> int:
    """The largest ``b`` in ``[start, limit]`` with ``fits(b)``, assuming ``fits`` is monotone (fits at ``b`` implies
    fits below); 0 when not even ``start`` fits."""
    if not fits(start):
        return 0
    good, bad = start, None
    while bad is None:  # doubling: good fits, 2*good is the next trial
        trial = min(good * 2, limit)
        if trial == good:
            return good
        if fits(trial):
            good = trial
        else:
            bad = trial
    while bad - good > 1:  # bisection: good fits, bad does not
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def with_headroom(batch: int) -> int:
    """``HEADROOM`` of ``batch``, a multiple of 8 when that is at least 8, and at least 1."""
    kept = int(batch * HEADROOM)
    return max(1, kept // 8 * 8 if kept >= 8 else kept)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def step_fits(build: Callable[[], torch.nn.Module], objective: Any, sample: Callable[[int], dict[str, torch.Tensor]],
              device: torch.device, autocast: Any, lr: float = 1e-4) -> Callable[[int], bool]:
    """A predicate ``fits(b)``: one training step of a fresh model (``build()``) at batch ``b`` on ``device`` runs
    without running out of memory. Memory is released after each trial."""
    from pipeline.train.ema import EMA

    def fits(batch: int) -> bool:
        model = optimizer = ema = loss = None
        try:
            model = build().to(device)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                          fused=device.type == "cuda" or None)
            ema = EMA(model, 0.999)
            data = {k: v.to(device) for k, v in sample(batch).items()}
            with autocast:
                loss = objective.loss(model, data)
            loss.backward()
            optimizer.step()
            ema.update(model)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return True
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            return False
        finally:
            del model, optimizer, ema, loss
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return fits


def probe_worker_batch(cfg: Any, info: Any) -> int:
    """``data.batch_size=auto`` on this worker's GPU: the largest fitting step's batch, with headroom.

    The trial model is built whole (under ZeRO-3 that over-counts the parameters: the answer errs small)."""
    from pipeline.errors import FlowrailError
    from pipeline.models import build_model
    from pipeline.objective import build_objective
    from pipeline.train.engine import resolve_precision

    device = torch.device("cuda", torch.cuda.current_device())
    shape = (info.channels, info.size, info.size)

    def build() -> torch.nn.Module:
        torch.manual_seed(cfg.seed)
        return build_model(cfg.model, in_channels=info.channels, input_size=info.size, num_classes=info.num_classes)

    def sample(batch: int) -> dict[str, torch.Tensor]:
        out = {"image": torch.randn(batch, *shape)}
        if info.num_classes:
            out["label"] = torch.randint(0, info.num_classes, (batch,))
        return out

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=resolve_precision(cfg.train) == "bf16")
    found = largest_fitting(step_fits(build, build_objective(cfg, info.num_classes), sample, device, autocast))
    if found == 0:
        raise FlowrailError("data.batch_size=auto: not even a batch of 1 fits in this GPU's memory; give a number "
                            "with train.zero_stage=3 / train.offload=true")
    return with_headroom(found)


def resolve_auto_batch(cfg: Any, info: Any, rank: int) -> int:
    """The per-worker batch for ``data.batch_size=auto``, the same on every rank.

    A restarted or resumed run keeps its checkpoint's batch (the resume position counts batches); otherwise each
    rank probes its GPU and all take the smallest answer."""
    import ray.train

    from pipeline.train.checkpoint_read import read_meta
    from pipeline.train.collectives import all_reduce_min

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        from pathlib import Path

        with checkpoint.as_directory() as ckpt_dir:
            return int(read_meta(Path(ckpt_dir))["config"]["data"]["batch_size"])
    batch = int(all_reduce_min([float(probe_worker_batch(cfg, info))])[0])
    if rank == 0:
        print(f"[flowrail] data.batch_size=auto: {batch} per worker ({HEADROOM:.0%} of the largest batch whose "
              "training step fits)", flush=True)
    return batch
