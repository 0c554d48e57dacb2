"""``flowrail privacy train``: SFBD, SFBD flow and their baselines as a Ray Train + DeepSpeed job.

Driver: the release's clean and noisy shard sets become two Ray Datasets (the lead's streaming decoder; noisy
copies are float CHW and pass through unresized), one MLflow run, a ``TorchTrainer``. Worker: the spine's one
training loop (:mod:`pipeline.train.loop`: NaN guard, accumulation, metric spool, checkpoints, resume, console) over
a :class:`PrivacyStage`: each worker keeps its slice of the clean set and of the noisy set in memory (SFBD needs
random access to its pool), denoises its own slice when the :class:`privacy.sfbd.Schedule` says so, and trains on
the mixed loss of :mod:`privacy.sfbd`.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import DataError
from pipeline.train.checkpoint import TrainState
from pipeline.train.loop import LoopContext, Stage
from privacy.config import PrivacyTrainConfig
from privacy.sfbd import DenoisedPool, Schedule, denoise, mixed_loss, sample_clean


def schedule_for(cfg: PrivacyTrainConfig) -> Schedule:
    p, steps = cfg.privacy, cfg.train.steps
    ramp_start = p.warmup_steps if p.ramp_start is None else p.ramp_start
    ramp_end = p.ramp_end if p.ramp_end is not None else ramp_start + max(0, steps - ramp_start) // 2
    return Schedule(p.method, steps, warmup_steps=p.warmup_steps if p.method in ("sfbd", "sfbd_flow") else 0,
                    rounds=p.rounds, refresh_every=p.refresh_every, ramp_start=ramp_start, ramp_end=ramp_end)


POOL_DIR = "privacy_pool"  # in a checkpoint: each rank's denoised pool and compute counters (rank<R>.safetensors)


def _materialize(shard: Any, rank: int, world: int, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of a whole (not split) dataset, kept in memory: every row in a canonical order (by label,
    then by a fixed random projection of its pixels), then rows ``rank::world``. The same rows in the same order on
    every attempt, whatever order Ray Data read them in, so a resumed run draws the batches an uninterrupted one
    would."""
    import numpy as np

    xs, ys = [], []
    for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=False):
        xs.append(batch["image"].float())
        ys.append(batch["label"].long())
    if not xs:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    x, y = torch.cat(xs), torch.cat(ys)
    direction = torch.randn(x[0].numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    order = torch.from_numpy(np.lexsort(((x.flatten(1).double() @ direction).numpy(), y.numpy())))
    mine = order[rank::world]
    return x[mine].contiguous(), y[mine].contiguous()


def _draw_seed(seed: int, rank: int, draw: int) -> int:
    """The seed of micro-batch ``draw``'s clean and pool draws on ``rank``: a function of the position only."""
    return ((seed * 1_000_003 + rank) * 1_000_033 + draw) % (2 ** 63)


class PrivacyStage(Stage):
    """The privacy stage of the one loop: batches drawn from this rank's in-memory clean slice and denoised pool
    (micro-batch ``i`` draws with a generator seeded by ``(seed, rank, i)``), the pool refreshed before the steps
    the :class:`privacy.sfbd.Schedule` names, the loss ``(n_c L_c + w n_d L_d) / (n_c + w n_d)``. The pool and the
    compute counters are part of each checkpoint, so a resumed run takes the steps an uninterrupted one takes."""

    def __init__(self, ctx: LoopContext, cfg: PrivacyTrainConfig, s: float, restored: dict[str, torch.Tensor]) -> None:
        import ray.train

        from pipeline.train.collectives import all_reduce_sum

        self.ctx, self.cfg, self.pcfg, self.s = ctx, cfg, cfg.privacy, s
        self.sched = sched = schedule_for(cfg)
        self.batch_size = int(cfg.data.batch_size)
        rank, world = ctx.rank, ctx.world
        clean_x, clean_y = (_materialize(ray.train.get_dataset_shard("clean"), rank, world) if sched.uses_clean
                            else (None, None))
        noisy_x, noisy_y = (_materialize(ray.train.get_dataset_shard("noisy"), rank, world) if sched.uses_pool
                            else (None, None))
        n_clean_local = 0 if clean_x is None else clean_x.shape[0]
        n_pool_local = 0 if noisy_x is None else noisy_x.shape[0]
        self.n_clean, self.n_pool = (int(v) for v in all_reduce_sum([n_clean_local, n_pool_local]))
        if sched.uses_clean and n_clean_local == 0:
            raise DataError(f"worker {rank} got no clean samples from {cfg.clean_dir} (too few for {world} workers)")
        if sched.uses_pool and n_pool_local == 0:
            raise DataError(f"worker {rank} got no noisy samples from {cfg.noisy_dir} (too few for {world} workers)")
        self.clean_x, self.clean_y = clean_x, clean_y
        self.pool = DenoisedPool(noisy_x, noisy_y, keep_noisy=not sched.denoises) if sched.uses_pool else None
        # compute spent by this worker over the run (attempts included): sample-gradients (samples in a backward
        # pass) and denoising sample-evaluations (samples x NFE, forward only)
        self.counters = {"sample_gradients": 0, "denoise_sample_nfe": 0, "denoise_nfe": 0}
        self.denoise_s, self.w, self._samples = 0.0, 0.0, 0
        self.refresh_all = False
        if restored:
            self._load(restored)
        elif ctx.setup.resumed and sched.denoises and ctx.state.step > sched.warmup_steps:
            self.refresh_all = True  # a checkpoint without its pool: re-denoise the whole slice first

    def _load(self, saved: dict[str, torch.Tensor]) -> None:
        for name in self.counters:
            self.counters[name] = int(saved[name])
        if self.pool is not None:
            if "data" in saved:
                self.pool.data = saved["data"].clone()
            self.pool.valid = saved["valid"].bool().clone()
            self.pool.cursor, self.pool.refreshes = int(saved["cursor"]), int(saved["refreshes"])
            self.pool.last_change = float(saved["last_change"])

    def save_files(self, local_dir: Path, rank: int) -> None:
        from safetensors.torch import save_file

        tensors = {k: torch.tensor(v) for k, v in self.counters.items()}
        if self.pool is not None:
            tensors.update(valid=self.pool.valid.to(torch.uint8), cursor=torch.tensor(self.pool.cursor),
                           refreshes=torch.tensor(self.pool.refreshes),
                           last_change=torch.tensor(self.pool.last_change, dtype=torch.float64))
            if self.sched.denoises:  # noisy_only's pool is the released noisy copies themselves
                tensors["data"] = self.pool.data.contiguous()
        (local_dir / POOL_DIR).mkdir(exist_ok=True)
        save_file(tensors, str(local_dir / POOL_DIR / f"rank{rank}.safetensors"))

    def epoch_batches(self, state: TrainState) -> Iterator[dict[str, Any]]:
        """Endless: micro-batch ``i`` is a draw index, materialised in :meth:`loss` after the step's refresh."""
        draw = state.batch_in_epoch
        while True:
            yield {"draw": draw}
            draw += 1

    def before_step(self, state: TrainState) -> None:
        kind = "full" if self.refresh_all else self.sched.refresh(state.step)
        self.refresh_all = False
        if kind is not None:
            self._refresh(kind)
        self.w = self.sched.weight(state.step)

    def _refresh(self, kind: str) -> None:
        """Denoise the pool's next chunk (or all of it) with the EMA (or live) model, from ``alpha(t*) y``."""
        pool, setup, pcfg = self.pool, self.ctx.setup, self.pcfg
        assert pool is not None
        t0 = time.perf_counter()
        idx = pool.next_indices(None if kind == "full" else pcfg.refresh_size)
        net = setup.ema.model if pcfg.denoise_with == "ema" else setup.engine.module
        net.eval()
        with setup.autocast:
            x_hat, nfe = denoise(setup.objective, net, pool.noisy[idx].to(setup.device), self.s,
                                 pool.labels[idx].to(setup.device), steps=pcfg.denoise_steps,
                                 solver=pcfg.denoise_solver, batch_size=pcfg.denoise_batch)
        setup.engine.module.train()
        pool.update(idx, x_hat.float().cpu().clamp(-1.5, 1.5))
        self.counters["denoise_nfe"] = int(nfe)
        self.counters["denoise_sample_nfe"] += int(idx.numel()) * int(nfe)
        self.denoise_s += time.perf_counter() - t0

    def loss(self, engine: Any, batch: dict[str, Any]) -> torch.Tensor:
        setup, bs = self.ctx.setup, self.batch_size
        gen = torch.Generator().manual_seed(_draw_seed(self.cfg.seed, self.ctx.rank, int(batch["draw"])))

        def on_device(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.to(setup.device, non_blocking=True) for k, v in b.items()}

        loss_c = (setup.objective.loss(engine, on_device(sample_clean(self.clean_x, self.clean_y, bs, gen)))
                  if self.sched.uses_clean else None)
        loss_p = (setup.objective.loss(engine, on_device(self.pool.sample(bs, gen)))
                  if self.pool is not None and self.w > 0 else None)
        self._samples = bs * (int(loss_c is not None) + int(loss_p is not None))
        return mixed_loss(loss_c, loss_p, self.n_clean, self.n_pool, self.w)

    def samples(self, batch: dict[str, Any]) -> int:
        self.counters["sample_gradients"] += self._samples  # called after the backward pass only
        return self._samples

    def window_values(self) -> dict[str, float]:
        pool = self.pool
        change = 0.0 if pool is None or pool.last_change != pool.last_change else pool.last_change  # NaN: none yet
        values = {"denoise_s": self.denoise_s, "sample_gradients": self.counters["sample_gradients"],
                  "denoise_sample_nfe": self.counters["denoise_sample_nfe"],
                  "pool_refreshes": 0 if pool is None else pool.refreshes, "pool_change": change}
        self.denoise_s = 0.0
        return values

    def window_metrics(self, summed: dict[str, float], world: int) -> dict[str, float]:
        metrics = {"denoised_weight": self.w, "denoise_seconds": summed["denoise_s"] / world,
                   "sample_gradients": summed["sample_gradients"], "denoise_sample_nfe": summed["denoise_sample_nfe"]}
        if self.pool is not None:
            metrics.update(pool_refreshes=summed["pool_refreshes"] / world, pool_change=summed["pool_change"] / world,
                           denoise_nfe=self.counters["denoise_nfe"])
        return metrics

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"privacy": self.pcfg.model_dump(mode="json")}


def privacy_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point: the one training loop (:mod:`pipeline.train.loop`) over a :class:`PrivacyStage`,
    under the user-error record (a bad input is not retried)."""
    from pipeline.train import user_errors

    user_errors.run_recorded(_privacy_worker, loop_config)


def _privacy_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    from pipeline.data.streaming import DataInfo
    from pipeline.train import loop as train_loop
    from pipeline.train.worker import start_worker

    cfg = PrivacyTrainConfig.model_validate(loop_config["cfg"])
    restored: dict[str, torch.Tensor] = {}

    def restore_pool(ckpt_dir: Path) -> None:
        from safetensors.torch import load_file

        saved = ckpt_dir / POOL_DIR / f"rank{ray.train.get_context().get_world_rank()}.safetensors"
        if saved.is_file():
            restored.update(load_file(str(saved)))

    with ExitStack() as cleanups:
        ctx = start_worker(loop_config, cfg.base(), DataInfo(**loop_config["data"]), cleanups,
                           restore_extra=restore_pool)
        train_loop.run(ctx, PrivacyStage(ctx, cfg, float(loop_config["noise_std"]), restored))


def check_refresh_size(method: str, refresh_size: int | None, n_noisy: int, world: int) -> None:
    """SFBD flow re-denoises ``refresh_size`` of each worker's pool slice per refresh; the smallest slice holds
    ``floor(n_noisy / world)`` copies (rows ``rank::world``). A refresh larger than that is refused in one line (it
    would be silently cut to the whole slice, so the setting would change nothing past that size)."""
    smallest = n_noisy // max(1, world)
    if method == "sfbd_flow" and refresh_size is not None and refresh_size > smallest:
        raise DataError(f"privacy.refresh_size={refresh_size} is larger than a worker's share of the pool "
                        f"({smallest} noisy copies: {n_noisy} over train.num_workers={world}); use at most {smallest},"
                        f" or privacy.refresh_size=null to re-denoise the whole share at every refresh")


def build_datasets(cfg: PrivacyTrainConfig, sched: Schedule) -> tuple[dict[str, Any], Any, float]:
    """The clean and noisy Ray Datasets this method needs, the model's DataInfo and the release noise level."""
    from pipeline.data.shards import read_manifest
    from pipeline.data.streaming import build_dataset
    from privacy.release import read_release

    release = read_release(cfg.privacy.release)
    s = float(release["noise_std"])
    datasets: dict[str, Any] = {}
    infos = []
    if sched.uses_clean:
        if not (Path(cfg.clean_dir) / "manifest.json").is_file():
            raise DataError(f"privacy.method={sched.method} needs a clean set: {cfg.clean_dir} holds none "
                            f"(release with --clean-fraction/--clean-from, or set privacy.clean_shards)")
        datasets["clean"], info = build_dataset(cfg.clean_dir, image_size=None, job="privacy train",
                                                policy=cfg.data.bad_sample_policy)
        infos.append(info)
    if sched.uses_pool:
        datasets["noisy"], info = build_dataset(cfg.noisy_dir, image_size=None, job="privacy train",
                                                policy=cfg.data.bad_sample_policy)
        infos.append(replace(info, kind="pixels", field="image.npy"))
        check_refresh_size(sched.method, cfg.privacy.refresh_size, info.num_samples, cfg.train.num_workers)
        if read_manifest(cfg.noisy_dir).get("noise_std") != s:
            raise DataError(f"{cfg.noisy_dir} does not match its release manifest's noise_std={s}")
    info = infos[0]
    for other in infos[1:]:
        if (other.channels, other.size) != (info.channels, info.size):
            raise DataError(f"clean set {cfg.clean_dir} ({info.channels}x{info.size}x{info.size}) and noisy set "
                            f"{cfg.noisy_dir} ({other.channels}x{other.size}x{other.size}) differ in shape")
    if cfg.data.image_size not in (None, info.size):
        raise ValueError(f"data.image_size={cfg.data.image_size}: privacy training runs at the release's stored size "
                         f"{info.size} (resizing noisy copies changes their noise level); set data.image_size=null")
    num_classes = max(i.num_classes for i in infos)
    return datasets, replace(info, num_classes=num_classes, num_samples=sum(i.num_samples for i in infos)), s


def log_curves(cfg: Any, result: Any) -> Path:
    """The loss / throughput curves as an MLflow image (no samples: those wait for the audit gate)."""
    from pipeline.images import save_curves
    from pipeline.tracking import client

    c = client(result.tracking_uri)
    history = {name: [(m.step, m.value) for m in c.get_metric_history(result.run_id, name)]
               for name in ("loss", "samples_per_s")}
    curves = save_curves(history, Path(cfg.run_dir) / "samples" / cfg.run_name / "curves.png", title=cfg.run_name)
    c.log_artifact(result.run_id, str(curves), artifact_path="curves")
    return curves


def fit_privacy(cfg: PrivacyTrainConfig, *, make_grid: bool = True):  # noqa: ANN201
    """Train one privacy method; returns the spine's ``TrainResult`` (MLflow run id, checkpoint, metrics).

    ``make_grid`` logs the loss curves only: sample images of a privacy-stage model go to MLflow after its audit
    passed (:func:`privacy.gate.log_sample_grid`, run by ``flowrail privacy audit``)."""
    import ray.train
    from mlflow.entities import Param
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.config import flatten, tracking_uri
    from pipeline.errors import FlowrailError
    from pipeline.tracking import client, redact, start_or_resume_run
    from pipeline.train.trainer import TrainResult, _unwrap, init_ray

    sched = schedule_for(cfg)
    if cfg.privacy.denoise_with == "model" and cfg.train.zero_stage == 3:
        raise ValueError("privacy.denoise_with=model needs train.zero_stage < 3 (ZeRO-3 partitions the live weights;"
                         " use privacy.denoise_with=ema)")
    init_ray()
    datasets, info, s = build_datasets(cfg, sched)
    base = cfg.base()
    uri = tracking_uri(base)
    run_id, resumed = start_or_resume_run(base, {"flowrail.job": "privacy train", "privacy.method": cfg.privacy.method})
    if not resumed:
        params = [Param(k, str(v)[:500]) for k, v in flatten(cfg.privacy, "privacy.").items()]
        params.append(Param("privacy.noise_std", str(s)))
        client(uri).log_batch(run_id, params=params)
    print(f"[flowrail privacy] {cfg.privacy.method}: MLflow run {run_id} at {redact(uri)}", flush=True)
    tcfg = cfg.train
    from pipeline.console import DriverProgress, is_verbose, on_driver, quiet_ray_logs, train_logging_config
    from pipeline.tracking import mark_terminated

    verbose = is_verbose(cfg)
    if not verbose:
        quiet_ray_logs()
    from pipeline.train import user_errors

    marker = user_errors.marker_path(base)
    user_errors.clear(marker)
    progress = DriverProgress(tcfg.steps, f"{cfg.run_name} ({cfg.privacy.method})", enabled=on_driver()).__enter__()
    from pipeline.tracking import metric_spool
    from pipeline.train.fault_injection import loop_config_entries

    run_storage = str(Path(cfg.run_dir) / "ray" / cfg.run_name)
    loop_config = {"cfg": cfg.model_dump(mode="json"), "data": info.to_dict(), "run_id": run_id, "tracking_uri": uri,
                   "noise_std": s, "verbose": verbose, "user_error_marker": marker,
                   "metric_spool": str(metric_spool(base)), "checkpoint_storage": run_storage,
                   **loop_config_entries(cfg.run_dir, cfg.run_name, run_storage)}  # tests' faults only
    trainer = TorchTrainer(
        privacy_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu,
                                               resources_per_worker={"CPU": tcfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=cfg.run_name, storage_path=str(Path(cfg.run_dir) / "ray"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tcfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=tcfg.max_failures),
            callbacks=progress.callbacks, logging_config=train_logging_config(verbose)),
        datasets=datasets,
        # every worker reads the whole sets and keeps its slice of their canonical order (_materialize)
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
        torch_config=TorchConfig(backend="nccl" if tcfg.use_gpu else "gloo"),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001
        progress.__exit__(None, None, None)
        user_error = _unwrap(exc)
        mark_terminated(uri, run_id, "FAILED")  # guarded: a server that is gone too must not hide the error
        if user_error is not None:
            raise user_error from None
        raise
    progress.__exit__(None, None, None)
    if result.checkpoint is None:
        raise FlowrailError(f"privacy run {cfg.run_name} finished without a checkpoint")
    out = TrainResult(run_id=run_id, checkpoint=Path(result.checkpoint.path), metrics=dict(result.metrics or {}),
                      tracking_uri=uri)
    if make_grid:
        log_curves(base, out)
    client(uri).set_tag(run_id, "flowrail.checkpoint", str(out.checkpoint))
    client(uri).set_terminated(run_id, status="FINISHED")
    return out
