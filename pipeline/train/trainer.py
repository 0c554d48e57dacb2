"""The driver side of training: dataset, MLflow run, Ray Train ``TorchTrainer`` with DeepSpeed workers, samples."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cluster import init_ray, worker_env  # noqa: F401 - re-exported: callers import them from here
from pipeline.config import TrainJobConfig, tracking_uri
from pipeline.errors import FlowrailError, find_in_chain


@dataclass
class TrainResult:
    run_id: str
    checkpoint: Path
    metrics: dict[str, Any]
    tracking_uri: str
    grid: Path | None = None
    stored_checkpoint: Any = None  # the ``ray.train.Checkpoint`` in the run's storage (``checkpoint`` is local)
    new_checkpoint: bool = True  # False: the run had stored its last checkpoint before this call and trained no step


def _unwrap(exc: BaseException) -> BaseException | None:
    """The user-facing error inside a Ray Train failure, if there is one."""
    return find_in_chain(exc, (FlowrailError, PermissionError, FileNotFoundError))


def fit(cfg: TrainJobConfig, *, tags: dict[str, str] | None = None, make_grid: bool = True,
        callbacks: list[Any] | None = None) -> TrainResult:
    """Train (or resume) the run ``cfg.run_name``; returns its MLflow run id and latest checkpoint.

    ``callbacks``: Ray Train ``UserCallback``s for the run config (a Tune trial passes its report callback).
    """
    from ray.train.torch import TorchTrainer

    from pipeline.console import DriverProgress, is_verbose, on_driver, quiet_ray_logs
    from pipeline.data.storage import check_writable
    from pipeline.data.streaming import describe
    from pipeline.errors import CheckpointError
    from pipeline.tracking import mark_terminated, metric_spool, redact, start_or_resume_run
    from pipeline.train import user_errors
    from pipeline.train.worker import train_loop_per_worker

    from pipeline.objective import validate_settings

    validate_settings(cfg)  # a setting the model family would ignore is refused here, before anything starts
    if cfg.train.engine == "torch":
        from pipeline.train.torch_engine import check_torch_engine

        check_torch_engine(cfg.train, cfg.train.num_workers)
    paths, info = describe(cfg.data.shards, cfg.data.image_size, job="train")
    # once per manifest, in parallel Ray tasks (pipeline/data/verify.py); before the MLflow run exists
    if check_shards(cfg, start_ray=init_ray) == "verified":
        print(f"[flowrail] shard set {cfg.data.shards}: every shard's sha256 checked (cached for this manifest)",
              flush=True)
    if cfg.train.storage_path:  # an s3:// / gs:// store: bucket, endpoint, credentials, before the MLflow run exists
        check_writable(cfg.train.storage_path, "train.storage_path")
    if cfg.init_from and "://" not in cfg.init_from and not Path(cfg.init_from).exists():
        raise CheckpointError(f"init_from={cfg.init_from}: file or directory does not exist")
    from pipeline.train.checkpoint_read import resume_world_size, world_size_error

    # a re-run resumes the run's latest registered checkpoint: refuse another world size before anything starts
    storage, run_storage = checkpoint_storage(cfg)
    resume_from = resume_world_size(run_storage)
    if resume_from is not None and resume_from[1] != cfg.train.num_workers:
        raise world_size_error(*resume_from, cfg.train.num_workers)
    from pipeline.train.init_from import check_init_from, inherited_privacy, log_import_notes

    import_notes = check_init_from(cfg, info.num_classes)  # a checkpoint trained differently is refused here
    if inherited_privacy(cfg):
        import_notes.append("privacy: the weights descend from a privacy-stage checkpoint; this run's checkpoints "
                            "carry its marker and pass `flowrail privacy audit` before a grid or registration")
    uri = tracking_uri(cfg)
    run_id, resumed = start_or_resume_run(cfg, tags)  # an unreachable server fails here, before Ray starts
    print(f"[flowrail] MLflow run {run_id} ({'resumed' if resumed else 'new'}) at {redact(uri)}", flush=True)
    log_import_notes(import_notes, uri, run_id)
    init_ray()
    tcfg = cfg.train
    read_budget = worker_read_budget(cfg, uri, run_id)
    verbose = is_verbose(cfg)
    if not verbose:
        quiet_ray_logs()
    loop_config = {"cfg": cfg.model_dump(mode="json"), "data": info.to_dict(), "paths": paths, "run_id": run_id,
                   "tracking_uri": uri, "metric_spool": str(metric_spool(cfg)), "verbose": verbose,
                   "user_error_marker": user_errors.marker_path(cfg), "checkpoint_storage": run_storage,
                   "read_budget": read_budget}
    user_errors.clear(loop_config["user_error_marker"])
    from pipeline.train.fault_injection import loop_config_entries

    loop_config.update(loop_config_entries(cfg.run_dir, cfg.run_name, run_storage))  # tests' $FLOWRAIL_FAULT_INJECT
    # the progress bar only where a person watches: the driver (a Tune trial's fit runs in a Ray worker)
    progress = DriverProgress(tcfg.steps, cfg.run_name, enabled=on_driver())
    progress.__enter__()
    trainer = TorchTrainer(train_loop_per_worker, train_loop_config=loop_config,
                           **ray_train_configs(cfg, verbose, [*(callbacks or []), *progress.callbacks]))
    from pipeline.train.storage_outage import fit_through_outages

    try:  # an object store that stops answering: fit again from its last stored checkpoint (storage_outage.py)
        result = fit_through_outages(trainer.fit, storage, tcfg.max_failures)
    except Exception as exc:  # noqa: BLE001
        progress.__exit__(None, None, None)
        user_error = _unwrap(exc)
        mark_terminated(uri, run_id, "FAILED")  # guarded: a server that is gone too must not hide the error
        if user_error is not None:
            raise user_error from None
        raise
    progress.__exit__(None, None, None)
    if result.checkpoint is None:
        raise FlowrailError(f"run {cfg.run_name} finished without a checkpoint")
    checkpoint = local_checkpoint(result.checkpoint, Path(cfg.run_dir) / "checkpoints" / cfg.run_name)
    out = TrainResult(run_id=run_id, checkpoint=checkpoint, metrics=dict(result.metrics or {}), tracking_uri=uri,
                      stored_checkpoint=result.checkpoint,
                      new_checkpoint=resume_from is None
                      or _dir_name(result.checkpoint.path) != _dir_name(resume_from[0]))
    finish_run(cfg, out, make_grid)
    return out


def check_shards(cfg: TrainJobConfig, start_ray: Any = None) -> str | None:
    """Every shard's sha256 against the manifest when ``data.verify_checksums`` (``"verified"``, or ``"cached"``
    for a manifest already checked; a corrupt shard is one :class:`DataError` line); None when off."""
    from pipeline.data.verify import ensure_verified

    return ensure_verified(cfg.data.shards, start_ray=start_ray) if cfg.data.verify_checksums else None


def checkpoint_storage(cfg: TrainJobConfig) -> tuple[str, str]:
    """Ray Train's storage (``train.storage_path``, else ``run_dir/ray``) and this run's folder in it."""
    storage = cfg.train.storage_path or str(Path(cfg.run_dir) / "ray")
    return storage, f"{storage.rstrip('/')}/{cfg.run_name}"


def ray_train_configs(cfg: TrainJobConfig, verbose: bool, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """The ``TorchTrainer`` keyword arguments built from the config: workers and their resources
    (ScalingConfig), the run's name, storage, kept checkpoints, restarts and console level (RunConfig), and the
    collective backend (TorchConfig: nccl on GPUs, gloo on CPUs). Building them starts nothing."""
    import ray.train
    from ray.train.torch import TorchConfig

    from pipeline.console import train_logging_config

    tcfg = cfg.train
    return {
        "scaling_config": ray.train.ScalingConfig(num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu,
                                                  resources_per_worker={"CPU": tcfg.cpus_per_worker},
                                                  placement_strategy=tcfg.placement_strategy),
        "run_config": ray.train.RunConfig(
            name=cfg.run_name, storage_path=checkpoint_storage(cfg)[0],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tcfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=tcfg.max_failures),
            callbacks=list(callbacks or []), logging_config=train_logging_config(verbose)),
        "torch_config": TorchConfig(backend="nccl" if tcfg.use_gpu else "gloo"),
    }


def _dir_name(location: str) -> str:
    """``checkpoint_2026-...`` of a local path, ``s3://bucket/run/checkpoint_...`` or ``bucket/run/checkpoint_...``."""
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def budget_for(cfg: TrainJobConfig, cluster: dict[str, float]) -> Any:
    """:func:`~pipeline.data.read_budget.read_budget` of ``cluster`` (``ray.cluster_resources()``) for this config's
    workers (``train.num_workers`` x ``train.cpus_per_worker``) and ``data.read_cpus``."""
    from pipeline.data.read_budget import read_budget

    return read_budget(cluster, num_workers=cfg.train.num_workers, cpus_per_worker=cfg.train.cpus_per_worker,
                       read_cpus=cfg.data.read_cpus)


def worker_read_budget(cfg: TrainJobConfig, uri: str, run_id: str) -> dict[str, float]:
    """Each training worker's Ray Data resource limits from the running cluster and the config
    (:func:`pipeline.data.read_budget.read_budget`); a config that leaves no CPU for reading marks the new MLflow
    run FAILED and is refused in one line."""
    import ray

    from pipeline.config import ConfigError
    from pipeline.tracking import mark_terminated

    try:
        return budget_for(cfg, ray.cluster_resources()).to_dict()
    except ConfigError:
        mark_terminated(uri, run_id, "FAILED")
        raise


def finish_run(cfg: TrainJobConfig, out: TrainResult, make_grid: bool = True) -> None:
    """After training: FLUX export or the sample grid, then the run's checkpoint tag and FINISHED status.

    A tracking server that went away meanwhile gives one line naming it (the checkpoint is already saved)."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    from pipeline.tracking import TrackingError, client, redact

    uri, run_id, checkpoint = out.tracking_uri, out.run_id, out.checkpoint
    try:
        if cfg.model.name.lower() == "flux":
            from pipeline.flux.export import export_finetuned, log_finetuned

            exported = export_finetuned(checkpoint, Path(cfg.run_dir) / "export" / cfg.run_name, cfg)
            log_finetuned(exported, cfg.flux.mode, uri, run_id)
            print(f"[flowrail] FLUX {cfg.flux.mode} fine-tune exported to {exported}", flush=True)
        elif make_grid:
            out.grid = log_samples_and_curves(cfg, out)
        client(uri).set_tag(run_id, "flowrail.checkpoint", str(checkpoint))
        client(uri).set_terminated(run_id, status="FINISHED")
    except (MlflowException, RequestException, ConnectionError) as exc:  # the server went away after training
        raise TrackingError(f"training finished and its checkpoint is kept at {checkpoint}, but the MLflow server "
                            f"{redact(uri)} did not take the run's final artifacts and status "
                            f"({type(exc).__name__})") from None


def local_checkpoint(checkpoint: Any, download_dir: Path) -> Path:
    """The checkpoint as a local directory: its path on a local/shared filesystem, else (s3://, gs://) only what
    the driver reads downloaded: ``flowrail.json`` and ``ema.safetensors`` (the grid, FLUX export, registration),
    never the ZeRO engine state (for a 12 B full fine-tune ~170 GB the 4-CPU head node has no use for)."""
    import shutil

    import pyarrow.fs

    from pipeline.train.checkpoint_read import EMA_FILE, META

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return Path(checkpoint.path)
    target = download_dir / Path(checkpoint.path).name
    if (target / META).is_file():
        return target
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name in (EMA_FILE, META):  # the metadata last: a directory with it is complete
        with checkpoint.filesystem.open_input_stream(f"{str(checkpoint.path).rstrip('/')}/{name}") as src, \
                open(partial / name, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
    shutil.rmtree(target, ignore_errors=True)
    partial.replace(target)
    return target


FINAL_GRID_MAX_IMAGES = 64  # the final grid's samples at most: ImageNet's 1,000 classes x 8 would be 8,000


def grid_classes(num_classes: int, per_class: int, max_images: int = FINAL_GRID_MAX_IMAGES) -> tuple[list[int], int]:
    """``(classes, per_class)`` of a final grid of at most ``max_images`` samples: ``per_class' = min(per_class,
    max_images)`` and ``k = clamp(max_images // per_class', 1, C)`` classes spread evenly, ``c_i = floor(i C / k)``
    (all classes when they fit; class 0 only for an unconditional model)."""
    per_class = max(1, min(per_class, max_images))
    total = max(num_classes, 1)
    k = max(1, min(total, max_images // per_class))
    return [i * total // k for i in range(k)], per_class


def final_grid(trained, path: Path, samples: Any) -> tuple[Path, int]:  # noqa: ANN001
    """A labelled grid of ``samples.per_class`` samples per class of :func:`grid_classes`, drawn with
    ``samples.seed``; returns its path and the NFE per sample."""
    import torch

    from pipeline.images import save_grid
    from pipeline.sampling import sample_classes

    classes, per_class = grid_classes(trained.num_classes, samples.per_class)
    labels = torch.tensor(classes).repeat_interleave(per_class)
    out = sample_classes(trained, labels, samples.seed)
    names = [str(c) for c in classes] if trained.num_classes else None
    return save_grid(out.x, path, rows=len(classes), row_labels=names), out.nfe


def log_samples_and_curves(cfg: TrainJobConfig, result: TrainResult) -> Path:
    """Sample a labelled grid (at most :data:`FINAL_GRID_MAX_IMAGES` samples) from the EMA weights and log it, with
    the loss/throughput curves, as images."""
    from pipeline.images import save_curves
    from pipeline.tracking import client
    from pipeline.train.checkpoint import load_trained

    trained = load_trained(result.checkpoint)
    out_dir = Path(cfg.run_dir) / "samples" / cfg.run_name
    grid, nfe = final_grid(trained, out_dir / f"samples_step{trained.step:07d}.png", cfg.samples)
    c = client(result.tracking_uri)
    c.log_artifact(result.run_id, str(grid), artifact_path="samples")
    history = {name: [(m.step, m.value) for m in c.get_metric_history(result.run_id, name)]
               for name in ("loss", "samples_per_s")}
    curves = save_curves(history, out_dir / "curves.png", title=cfg.run_name)
    c.log_artifact(result.run_id, str(curves), artifact_path="curves")
    c.log_metric(result.run_id, "sample_nfe", nfe, step=trained.step)
    print(f"[flowrail] sample grid: {grid}", flush=True)
    return grid
