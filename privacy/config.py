"""Configuration of ``flowrail privacy train``: a :class:`pipeline.config.TrainJobConfig` plus a ``privacy`` section.

``data.shards`` is filled in from the release (its clean subset), and training runs at the release's stored
resolution: resizing a noisy copy would change its noise law, and with it the time ``t*`` it corresponds to.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from pipeline.config import DataConfig, Section, TrainJobConfig

Method = Literal["clean_only", "noisy_only", "sfbd", "sfbd_flow"]


class PrivacyConfig(Section):
    """SFBD / online SFBD settings (REFERENCE.md 7); steps count optimizer steps of ``train.steps``."""

    release: str = "runs/privacy/release"  # a `flowrail privacy release` output directory
    clean_shards: str | None = None  # clean set to use instead of <release>/clean (e.g. a public set)
    method: Method = "sfbd_flow"
    warmup_steps: int = Field(default=200, ge=0)  # clean-only pretraining before denoised data enter
    rounds: int = Field(default=2, ge=1)  # SFBD: denoise-all + fine-tune rounds after the warm-up
    refresh_every: int = Field(default=20, ge=1)  # SFBD flow: m, steps between pool refreshes
    refresh_size: int | None = Field(default=64, ge=1)  # SFBD flow: samples per worker per refresh; None: whole slice
    ramp_start: int | None = Field(default=None, ge=0)  # SFBD flow: denoised weight 0 here (default: warmup_steps)
    ramp_end: int | None = Field(default=None, ge=0)  # ... and 1 from here (default: halfway to train.steps)
    denoise_steps: int = Field(default=40, ge=1)
    denoise_solver: Literal["euler", "heun", "midpoint", "rk4"] = "heun"
    denoise_with: Literal["ema", "model"] = "ema"
    denoise_batch: int = Field(default=512, ge=1)

    @model_validator(mode="after")
    def _ramp_order(self) -> "PrivacyConfig":
        if self.ramp_start is not None and self.ramp_end is not None and self.ramp_end < self.ramp_start:
            raise ValueError(f"privacy.ramp_end={self.ramp_end} must be >= privacy.ramp_start={self.ramp_start}")
        return self


class PrivacyDataConfig(DataConfig):
    """``data`` for privacy training: no resizing by default, shards filled in from the release."""

    shards: str = ""  # default: <privacy.release>/clean
    val_shards: str | None = None
    image_size: int | None = Field(default=None, ge=2)  # must be null or the release's stored size


class PrivacyTrainConfig(TrainJobConfig):
    """``flowrail privacy train`` settings: every ``flowrail train`` key plus ``privacy.*``."""

    run_name: str = "privacy"
    data: PrivacyDataConfig = PrivacyDataConfig()
    privacy: PrivacyConfig = PrivacyConfig()

    @model_validator(mode="after")
    def _no_auto_batch(self) -> "PrivacyTrainConfig":
        if self.data.batch_size == "auto":  # the privacy loop sizes its clean/poison batches from the number
            raise ValueError("data.batch_size=auto is not available for privacy training; give a number")
        if self.data.read_cpus is not None:  # its sets are read once, whole, through Ray Train's datasets
            raise ValueError(f"data.read_cpus={self.data.read_cpus}: privacy training reads its sets once before "
                             "training, with no per-worker stream to budget; leave it unset")
        return self

    def resolve_paths(self, base: Path | None = None) -> "PrivacyTrainConfig":
        base = base or Path.cwd()
        for name in ("release", "clean_shards"):
            value = getattr(self.privacy, name)
            if value and "://" not in value and not Path(value).is_absolute():
                setattr(self.privacy, name, str((base / value).resolve()))
        if not self.data.shards:
            self.data.shards = self.clean_dir
        super().resolve_paths(base)
        return self

    @property
    def clean_dir(self) -> str:
        return self.privacy.clean_shards or str(Path(self.privacy.release) / "clean")

    @property
    def noisy_dir(self) -> str:
        return str(Path(self.privacy.release) / "noisy")

    def base(self) -> TrainJobConfig:
        """The plain training config (what checkpoints record, so ``load_trained`` and evaluation read them)."""
        return TrainJobConfig.model_validate(self.model_dump(exclude={"privacy"}))
