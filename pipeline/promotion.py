"""The promotion gate of the model registry, and what a version records about itself.

A new version becomes ``@champion`` only if it beats the current champion on the same metric under the same
protocol (metric name, direction, sample count, seed, and whatever else the protocol names); otherwise it becomes
``@challenger``. A first version has nothing to beat. Both numbers are recorded on the new version as tags
(``flowrail.metric_value``, ``flowrail.champion_metric_value``) with the decision (``flowrail.promotion``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Score:
    """A model's number on a metric, and the protocol that makes two numbers comparable."""

    metric: str
    value: float
    mode: str  # "min" or "max"
    protocol: dict[str, Any] = field(default_factory=dict)

    def protocol_key(self) -> str:
        return json.dumps({"metric": self.metric, "mode": self.mode, **self.protocol}, sort_keys=True, default=str)

    def tags(self) -> dict[str, str]:
        return {"flowrail.metric": self.metric, "flowrail.metric_value": repr(float(self.value)),
                "flowrail.metric_mode": self.mode, "flowrail.protocol": self.protocol_key(),
                self.metric: repr(float(self.value))}

    def beats(self, other: float) -> bool:
        if not math.isfinite(self.value):
            return False
        return self.value < other if self.mode == "min" else self.value > other


HIGHER_IS_BETTER = frozenset({"precision", "recall", "classifier_accuracy"})


def metric_mode(metric: str) -> str:
    """``"max"`` for metrics where higher is better (precision, recall, accuracy), else ``"min"`` (FID, fd_*, bpd)."""
    return "max" if metric in HIGHER_IS_BETTER else "min"


def eval_protocol(num_samples: int, seed: int, train_config: dict[str, Any]) -> dict[str, Any]:
    """What makes two numbers of a metric comparable (besides its name and direction): sample count, seed and the
    real images they are compared with (the validation shard set; FID's reference statistics when given)."""
    data, ev = train_config["data"], train_config.get("eval", {})
    return {"num_samples": int(num_samples), "seed": int(seed),
            "reference": ev.get("reference_stats") or data.get("val_shards") or data.get("shards")}


@dataclass
class Decision:
    alias: str
    champion_value: float | None  # the current champion's number on the same protocol (None: no comparable one)
    reason: str


def decide(score: Score | None, champion_tags: dict[str, str] | None, champion_alias: str,
           challenger_alias: str) -> Decision:
    """Where the new version goes, given the current champion's tags (``None``: there is no champion)."""
    if champion_tags is None:
        return Decision(champion_alias, None, "first version: no champion to beat")
    if score is None:
        return Decision(challenger_alias, None, "no metric recorded: cannot be compared with the champion")
    if champion_tags.get("flowrail.protocol") != score.protocol_key():
        return Decision(challenger_alias, None, "the champion was scored under another metric or protocol")
    try:
        theirs = float(champion_tags["flowrail.metric_value"])
    except (KeyError, ValueError):
        return Decision(challenger_alias, None, "the champion has no metric value")
    if score.beats(theirs):
        return Decision(champion_alias, theirs, f"{score.metric} {score.value:.5g} beats the champion's {theirs:.5g}")
    return Decision(challenger_alias, theirs, f"{score.metric} {score.value:.5g} does not beat the champion's "
                                              f"{theirs:.5g}")


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
        lines.append(f"- **Metric**: {score.metric} = {score.value:.5g} ({score.mode}), protocol "
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
