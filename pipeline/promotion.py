"""The promotion gate of the model registry, and what a version records about itself.

A fair gate (REFERENCE: selection and promotion use disjoint data):

- **One protocol** (:data:`GATE_SAMPLES`, :data:`GATE_SEEDS`), shared by the sweep's registration and
  ``flowrail register``: sample count, >= 2 sampling seeds, the reference set identified by its manifest's SHA-256
  and the *held-out* half of the validation set (``split=gate``; the sweep selects on the other half,
  ``split=select``, with its own seed, :func:`pipeline.sweep.metric.reference_half`).
- **Re-scored, not remembered**: the current champion and the candidate are scored again, in the same Ray task (or
  process), with the same seeds, sample count and reference (:func:`pipeline.sweep.evaluation.score_pair`); a
  stored number (the minimum over a sweep's trials, selection-biased) is never what the candidate has to beat.
- **Beyond the seeds' spread**: with per-seed values ``c_i`` (candidate) and ``h_i`` (champion), the candidate is
  promoted only if its mean is better than the champion's by more than
  ``spread = max(max_i c_i - min_i c_i, max_i h_i - min_i h_i)``; a tie or a difference inside the sampling noise
  keeps the champion. Both means, the per-seed values and the spread are recorded on the new version.

A first version has nothing to beat; a version forced to ``@champion`` is scored too, so it can be re-scored later.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

# the one protocol default (sweep registration and `flowrail register --promote-on` / `--force-champion`)
GATE_METRIC = "fd_pixels"
GATE_SAMPLES = 256
GATE_SEEDS = (1, 2)  # disjoint from the sweep's selection seed (eval.seed, 1234 by default)


@dataclass
class Score:
    """A model's number on a metric, and the protocol that makes two numbers comparable."""

    metric: str
    value: float  # the mean over ``values`` when those are given
    mode: str  # "min" or "max"
    protocol: dict[str, Any] = field(default_factory=dict)
    values: list[float] = field(default_factory=list)  # one per sampling seed of the protocol

    @classmethod
    def of(cls, metric: str, values: list[float], protocol: dict[str, Any]) -> Score:
        return cls(metric, sum(values) / len(values), metric_mode(metric), protocol, [float(v) for v in values])

    @property
    def spread(self) -> float:
        """max - min over the seeds (0 with one value)."""
        return max(self.values) - min(self.values) if self.values else 0.0

    def protocol_key(self) -> str:
        return json.dumps({"metric": self.metric, "mode": self.mode, **self.protocol}, sort_keys=True, default=str)

    def tags(self) -> dict[str, str]:
        return {"flowrail.metric": self.metric, "flowrail.metric_value": repr(float(self.value)),
                "flowrail.metric_mode": self.mode, "flowrail.protocol": self.protocol_key(),
                "flowrail.metric_values": json.dumps(self.values), "flowrail.metric_spread": repr(self.spread),
                self.metric: repr(float(self.value))}


HIGHER_IS_BETTER = frozenset({"precision", "recall", "classifier_accuracy"})


def metric_mode(metric: str) -> str:
    """``"max"`` for metrics where higher is better (precision, recall, accuracy), else ``"min"`` (FID, fd_*, bpd)."""
    return "max" if metric in HIGHER_IS_BETTER else "min"


def eval_protocol(num_samples: int, seed: int | list[int] | tuple[int, ...], train_config: dict[str, Any],
                  split: str | None = None) -> dict[str, Any]:
    """What makes two numbers of a metric comparable (besides its name and direction): sample count, seed(s), the
    real images they are compared with (the validation shard set, or FID's reference statistics when given)
    identified by path and content hash (its manifest's SHA-256), and which half of it (``split``)."""
    data, ev = train_config["data"], train_config.get("eval", {})
    reference = ev.get("reference_stats") or data.get("val_shards") or data.get("shards")
    seeds = [int(s) for s in seed] if isinstance(seed, (list, tuple)) else int(seed)
    out = {"num_samples": int(num_samples), "seed" if isinstance(seeds, int) else "seeds": seeds,
           "reference": reference, "reference_sha256": reference_sha256(reference)}
    if split:
        out["split"] = split
    return out


def reference_sha256(reference: str | None) -> str:
    """SHA-256 of a reference set's content: a shard set's manifest (which lists every shard's sha256), or the
    statistics file itself; "" when it cannot be read here."""
    import hashlib
    from pathlib import Path

    if not reference:
        return ""
    try:
        if Path(reference).is_file():
            return hashlib.sha256(Path(reference).read_bytes()).hexdigest()
        from pipeline.data.shards import read_manifest_bytes

        return hashlib.sha256(read_manifest_bytes(reference)).hexdigest()
    except Exception:  # noqa: BLE001 - an unreadable reference is recorded as unknown, not guessed
        return ""


@dataclass
class Decision:
    alias: str
    champion_value: float | None  # the current champion's number on the same protocol (None: no comparable one)
    reason: str


def decide_rescored(candidate: Score, champion: Score | None, champion_alias: str, challenger_alias: str,
                    no_champion: str = "first version: no champion to beat") -> Decision:
    """The gate on numbers scored together: the candidate must beat the champion's mean by more than the seeds'
    spread (see the module docstring). ``champion`` None: nothing to beat (``no_champion`` says why)."""
    if champion is None:
        return Decision(champion_alias, None, no_champion)
    if len(candidate.values) < 2 or len(champion.values) < 2:
        return Decision(challenger_alias, champion.value, "the gate needs >= 2 seeds per model to know its spread")
    sign = 1.0 if candidate.mode == "min" else -1.0
    margin = sign * (champion.value - candidate.value)  # > 0: the candidate is better
    spread = max(candidate.spread, champion.spread)
    numbers = (f"{candidate.metric} {candidate.value:.5g} vs the champion's {champion.value:.5g} re-scored on "
               f"{len(candidate.values)} seeds (spread {spread:.3g})")
    if math.isfinite(candidate.value) and margin > spread:
        return Decision(champion_alias, champion.value, f"{numbers}: better beyond the spread")
    return Decision(challenger_alias, champion.value, f"{numbers}: not better beyond the spread")


def current_champion(client: Any, name: str, alias: str) -> Any | None:
    """The model version under ``alias``, or None when the model or the alias does not exist yet."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def model_card(*, name: str, family: str, meta: dict[str, Any], data_ref: dict[str, Any], sampler: dict[str, Any],
               guidance: dict[str, Any], score: Score | None, run_id: str, decision: Decision | None) -> str:
    """The version's description: data, sampler, metric protocol, training run and promotion decision (markdown)."""
    cfg = meta["config"]
    lines = [f"# {name}: flowrail {cfg['model']['name']} ({family})", "",
             f"- **Training run**: `{run_id}` (MLflow), step {meta['step']}, transport {cfg['transport']['path']} / "
             f"{cfg['transport']['prediction']}",
             f"- **Data**: `{data_ref.get('path')}`, {data_ref.get('num_samples')} samples, kind "
             f"{data_ref.get('kind')}, manifest sha256 `{data_ref.get('sha256', '')[:16]}`",
             f"- **Sampler**: {json.dumps(sampler, sort_keys=True)}; guidance {json.dumps(guidance, sort_keys=True)}"]
    if score is not None:
        per_seed = f", per seed {score.values} (spread {score.spread:.3g})" if score.values else ""
        lines.append(f"- **Metric**: {score.metric} = {score.value:.5g} ({score.mode}){per_seed}, protocol "
                     f"{json.dumps(score.protocol, sort_keys=True, default=str)}")
    if decision is not None:
        champ = "none" if decision.champion_value is None else f"{decision.champion_value:.5g}"
        lines.append(f"- **Promotion**: @{decision.alias} (champion's value {champ}: {decision.reason})")
    if family in ("latent", "flux"):
        lines.append("- **Output**: RGB images decoded by the bundled autoencoder (artifact `autoencoder`)")
    if family == "flux":
        lines.append("- **FLUX**: labels select the bundled caption embeddings (artifact `prompts`); the LoRA adapter "
                     "in diffusers format is artifact `flux_lora`; base weights checked against `flux_base`")
    return "\n".join(lines)
