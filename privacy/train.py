"""``flowrail privacy train``: SFBD, SFBD flow and their baselines as a Ray Train + DeepSpeed job.

Driver: the release's clean and noisy shard sets become two Ray Datasets (the lead's streaming decoder; noisy
copies are float CHW and pass through unresized), one MLflow run, a ``TorchTrainer``. Worker: the spine's model,
DeepSpeed engine, EMA and checkpoint helpers, with its own loop: each worker keeps its split of the clean set and of
the noisy set in memory (SFBD needs random access to its pool), denoises its own slice when the
:class:`privacy.sfbd.Schedule` says so, and trains on the mixed loss of :mod:`privacy.sfbd`.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import DataError
from privacy.config import PrivacyTrainConfig
from privacy.sfbd import DenoisedPool, Schedule, denoise, mixed_loss, sample_clean


def schedule_for(cfg: PrivacyTrainConfig) -> Schedule:
    p, steps = cfg.privacy, cfg.train.steps
    ramp_start = p.warmup_steps if p.ramp_start is None else p.ramp_start
    ramp_end = p.ramp_end if p.ramp_end is not None else ramp_start + max(0, steps - ramp_start) // 2
    return Schedule(p.method, steps, warmup_steps=p.warmup_steps if p.method in ("sfbd", "sfbd_flow") else 0,
                    rounds=p.rounds, refresh_every=p.refresh_every, ramp_start=ramp_start, ramp_end=ramp_end)


def _materialize(shard: Any, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over this worker's split of a dataset, kept in memory."""
    xs, ys = [], []
    for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=False):
        xs.append(batch["image"].float())
        ys.append(batch["label"].long())
    if not xs:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(xs), torch.cat(ys)


def privacy_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point: :func:`_privacy_loop` under the user-error record (a bad input is not retried)."""
    from pipeline.train import user_errors

    user_errors.run_recorded(_privacy_loop, loop_config)


def _privacy_loop(loop_config: dict[str, Any]) -> None:
    import ray.train

    from pipeline.data.streaming import DataInfo
    from pipeline.tracking import MetricLogger
    from pipeline.train import checkpoint as ckpt_io
    from pipeline.train.collectives import all_reduce_sum, step_flags
    from pipeline.train.worker import TooManyBadSteps
    from pipeline.train.worker_setup import set_up_worker

    cfg = PrivacyTrainConfig.model_validate(loop_config["cfg"])
    base = cfg.base()
    if not loop_config.get("verbose"):
        from pipeline.console import quiet_ray_logs

        quiet_ray_logs()
    info = DataInfo(**loop_config["data"])
    s = float(loop_config["noise_std"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tcfg, pcfg = cfg.train, cfg.privacy
    sched = schedule_for(cfg)

    setup = set_up_worker(base, info, micro_batch=cfg.data.batch_size, world=world, rank=rank)
    engine, ema, objective, device, autocast, state = (setup.engine, setup.ema, setup.objective, setup.device,
                                                       setup.autocast, setup.state)
    torch.manual_seed(cfg.seed * 1009 + rank + 7919 * state.step)
    gen = torch.Generator().manual_seed(cfg.seed * 104729 + rank + 7919 * state.step)

    clean_x, clean_y = _materialize(ray.train.get_dataset_shard("clean")) if sched.uses_clean else (None, None)
    noisy_x, noisy_y = _materialize(ray.train.get_dataset_shard("noisy")) if sched.uses_pool else (None, None)
    n_clean_local = 0 if clean_x is None else clean_x.shape[0]
    n_pool_local = 0 if noisy_x is None else noisy_x.shape[0]
    n_clean, n_pool = (int(v) for v in all_reduce_sum([n_clean_local, n_pool_local]))
    if sched.uses_clean and n_clean_local == 0:
        raise DataError(f"worker {rank} got no clean samples from {cfg.clean_dir} (too few for {world} workers)")
    if sched.uses_pool and n_pool_local == 0:
        raise DataError(f"worker {rank} got no noisy samples from {cfg.noisy_dir} (too few for {world} workers)")
    pool = DenoisedPool(noisy_x, noisy_y, keep_noisy=not sched.denoises) if sched.uses_pool else None

    logger = MetricLogger(loop_config["tracking_uri"], loop_config["run_id"], cfg.tracking.on_unreachable) \
        if rank == 0 and loop_config.get("run_id") else None
    window = {"loss": 0.0, "n": 0, "samples": 0, "t0": time.perf_counter(), "denoise_s": 0.0}
    denoise_nfe = 0
    # compute spent by this worker in this process: sample-gradients (samples in a backward pass) and
    # denoising sample-evaluations (samples x NFE, forward only)
    compute = {"sample_gradients": 0, "denoise_sample_nfe": 0}

    def refresh(kind: str) -> None:
        nonlocal denoise_nfe
        assert pool is not None
        t0 = time.perf_counter()
        idx = pool.next_indices(None if kind == "full" else pcfg.refresh_size)
        net = ema.model if pcfg.denoise_with == "ema" else engine.module
        net.eval()
        with autocast:
            x_hat, denoise_nfe = denoise(objective, net, pool.noisy[idx].to(device), s, pool.labels[idx].to(device),
                                         steps=pcfg.denoise_steps, solver=pcfg.denoise_solver,
                                         batch_size=pcfg.denoise_batch)
        engine.module.train()
        pool.update(idx, x_hat.float().cpu().clamp(-1.5, 1.5))
        compute["denoise_sample_nfe"] += int(idx.numel()) * int(denoise_nfe)
        window["denoise_s"] += time.perf_counter() - t0

    def checkpoint_and_report(metrics: dict[str, float]) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f"flowrail-privacy-ckpt-r{rank}-"))
        try:
            ckpt_io.save(tmp, engine=engine, ema=ema, state=state, cfg=base, info=info, rank=rank,
                         extra={"mlflow_run_id": loop_config.get("run_id"),
                                "privacy": pcfg.model_dump(mode="json")})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    resumed_mid_run = sched.denoises and state.step > sched.warmup_steps
    while state.step < tcfg.steps:
        step = state.step
        kind = "full" if resumed_mid_run else sched.refresh(step)
        resumed_mid_run = False
        if kind is not None:
            refresh(kind)
        w = sched.weight(step)
        with autocast:
            loss_c = objective.loss(engine, {k: v.to(device) for k, v in sample_clean(
                clean_x, clean_y, cfg.data.batch_size, gen).items()}) if sched.uses_clean else None
            loss_p = objective.loss(engine, {k: v.to(device) for k, v in pool.sample(
                cfg.data.batch_size, gen).items()}) if pool is not None and w > 0 else None
            loss = mixed_loss(loss_c, loss_p, n_clean, n_pool, w)
        if step_flags(loss, ran_out=False)[0]:  # every rank skips together
            state.bad_steps += 1
            engine.zero_grad() if hasattr(engine, "zero_grad") else None
            if state.bad_steps > tcfg.max_bad_steps:
                raise TooManyBadSteps(f"loss was NaN/Inf in {state.bad_steps} steps "
                                      f"(train.max_bad_steps={tcfg.max_bad_steps}); last step {state.step}")
            continue
        engine.backward(loss)
        engine.step()
        ema.update(engine.module)
        state.step += 1
        window["loss"] += loss.detach().float()  # on the device: no host sync per step
        window["n"] += 1
        window["samples"] += cfg.data.batch_size * (int(loss_c is not None) + int(loss_p is not None))
        compute["sample_gradients"] += cfg.data.batch_size * (int(loss_c is not None) + int(loss_p is not None))

        last = state.step >= tcfg.steps
        if state.step % tcfg.log_every == 0 or last or state.step % tcfg.checkpoint_every == 0:
            loss_sum, n, samples, den_s, grads, den_nfe = all_reduce_sum(
                [float(window["loss"]), window["n"], window["samples"], window["denoise_s"],
                 compute["sample_gradients"], compute["denoise_sample_nfe"]])
            elapsed = time.perf_counter() - window["t0"]
            metrics = {"loss": loss_sum / max(n, 1), "samples_per_s": samples / max(elapsed, 1e-9),
                       "denoised_weight": w, "denoise_seconds": den_s / world, "step": state.step,
                       "bad_steps": state.bad_steps, "sample_gradients": grads, "denoise_sample_nfe": den_nfe}
            if pool is not None:
                refreshes, change = all_reduce_sum([pool.refreshes, 0.0 if pool.last_change != pool.last_change
                                                    else pool.last_change])
                metrics.update({"pool_refreshes": refreshes / world, "pool_change": change / world,
                                "denoise_nfe": denoise_nfe})
            if logger is not None:
                logger.log({k: v for k, v in metrics.items() if k != "step"}, step=state.step)
                print(f"[flowrail privacy] {pcfg.method} step {state.step}/{tcfg.steps}  loss {metrics['loss']:.4f}  "
                      f"w {w:.2f}  {metrics['samples_per_s']:.0f} samples/s", flush=True)
            window.update(loss=0.0, n=0, samples=0, t0=time.perf_counter(), denoise_s=0.0)
            if state.step % tcfg.checkpoint_every == 0 or last:
                checkpoint_and_report(metrics)
            else:
                ray.train.report(metrics)
    if logger is not None and not logger.flush():
        print(f"[flowrail privacy] {len(logger.pending)} metrics could not be logged: tracking server unreachable")


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
    trainer = TorchTrainer(
        privacy_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "data": info.to_dict(), "run_id": run_id,
                           "tracking_uri": uri, "noise_std": s, "verbose": verbose, "user_error_marker": marker},
        scaling_config=ray.train.ScalingConfig(num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu,
                                               resources_per_worker={"CPU": tcfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=cfg.run_name, storage_path=str(Path(cfg.run_dir) / "ray"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tcfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=tcfg.max_failures),
            callbacks=progress.callbacks, logging_config=train_logging_config(verbose)),
        datasets=datasets,
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
