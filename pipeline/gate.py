"""Running the promotion gate (:mod:`pipeline.promotion` states the rule): find the current champion, re-score it
and the candidate together under the one protocol on the held-out reference half, decide.

Used by every path to ``@champion``: ``flowrail register --promote-on`` / ``--force-champion`` and the sweep's
registration of its best row, so both compare under the same protocol (:data:`pipeline.promotion.GATE_SAMPLES`,
:data:`~pipeline.promotion.GATE_SEEDS`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import FlowrailError
from pipeline.promotion import (GATE_SAMPLES, GATE_SEEDS, Decision, Score, current_champion, decide_rescored,
                                eval_protocol)

SETTINGS_TAG = "flowrail.sampler_settings"  # {"sampler": {...}, "guidance": {...}} of a version, as JSON


@dataclass(frozen=True)
class GateSpec:
    metric: str
    num_samples: int = GATE_SAMPLES
    seeds: tuple[int, ...] = GATE_SEEDS
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"
    cpus: float = 1.0
    gpus: float = 0.0
    remote: bool = False  # score in one Ray task (the sweep; `register --eval-gpus`), else in this process
    force: bool = False  # --force-champion: scored and recorded, @champion without a comparison

    def check(self) -> None:
        """One-line refusals of a protocol that cannot tell noise from improvement."""
        if len(set(self.seeds)) < 2:
            raise FlowrailError(f"promotion gate: {len(set(self.seeds))} distinct seed(s) given; it needs >= 2 to "
                                "know the spread of its scores (e.g. --eval-seeds 1 2)")
        if self.num_samples < 2:
            raise FlowrailError(f"promotion gate: {self.num_samples} samples per seed; it needs >= 2")


def champion_source(version: Any) -> tuple[str | None, tuple[dict | None, dict | None], str]:
    """The champion's checkpoint and sampler settings, to re-score it; ``(None, ..., why)`` when it cannot be."""
    tags = dict(version.tags)
    ckpt = tags.get("flowrail.checkpoint")
    if not ckpt or not Path(ckpt).exists():
        return None, (None, None), f"the champion's checkpoint {ckpt or '(none recorded)'} is not readable here, so " \
                                   "it cannot be re-scored"
    settings = json.loads(tags[SETTINGS_TAG]) if SETTINGS_TAG in tags else {}
    return ckpt, (settings.get("sampler"), settings.get("guidance")), ""


def run_gate(ckpt: Path, meta: dict[str, Any], name: str, client: Any, gate: GateSpec,
             sampler: dict[str, Any], guidance: dict[str, Any]) -> tuple[Score, Decision, Score | None]:
    """Score the candidate (and re-score the champion with it) on the held-out half; the decision."""
    from pipeline.sweep.evaluation import score_pair, score_pair_remotely
    from pipeline.train.checkpoint import read_meta

    gate.check()
    protocol = eval_protocol(gate.num_samples, list(gate.seeds), meta["config"], split="gate")
    champion = None if gate.force else current_champion(client, name, gate.champion_alias)
    champ_ckpt, champ_settings, why = (None, (None, None), "") if champion is None else champion_source(champion)
    if champ_ckpt is not None:
        theirs = eval_protocol(gate.num_samples, list(gate.seeds), read_meta(Path(champ_ckpt))["config"],
                               split="gate")
        if theirs["reference_sha256"] != protocol["reference_sha256"]:
            champ_ckpt, why = None, (f"the champion is scored against another reference set ({theirs['reference']}, "
                                     f"manifest sha256 {theirs['reference_sha256'][:12]}): not comparable")
    args = (str(ckpt), champ_ckpt, gate.metric, gate.num_samples, list(gate.seeds), (sampler, guidance),
            champ_settings)
    values = score_pair_remotely(*args, split="gate", cpus=gate.cpus, gpus=gate.gpus) if gate.remote \
        else score_pair(*args, split="gate")
    score = Score.of(gate.metric, values["candidate"], protocol)
    champ_score = Score.of(gate.metric, values["champion"], protocol) if values["champion"] else None
    if gate.force:
        return score, Decision(gate.champion_alias, None, "--force-champion (no gate); scored so it can be "
                                                          "re-scored later"), None
    if champion is not None and champ_score is None:
        return score, Decision(gate.challenger_alias, None, why), None
    return score, decide_rescored(score, champ_score, gate.champion_alias, gate.challenger_alias), champ_score
