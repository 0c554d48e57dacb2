"""benchmarks/flow_maps/run.py: one results file per invocation, a merge that refuses files whose settings differ,
and the table's mean ± sd over training seeds (of the per-seed mean over evaluation seeds)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from benchmarks.flow_maps.run import BenchmarkError, aggregate, check_settings, main, write_record


def record(label: str, kind: str = "flow_map", half: str = "test", steps: int = 1200, seeds=(0, 1, 2),  # noqa: ANN001
           fds=((5.0, 6.0), (7.0, 8.0), (9.0, 10.0))) -> dict:
    return {"label": label, "kind": kind,
            "settings": {"half": half, "per_class": 50, "eval_seeds": [0, 1], "teacher": "/runs/teacher",
                         "train_steps": steps, "train_seeds": list(seeds), "flow_map": None},
            "rows": [{"steps": 1, "sampler": "flow_map",
                      "models": [{"checkpoint": f"c{s}", "train_seed": s, "train_steps": steps,
                                  "fd_digits": list(fd), "classifier_accuracy": [0.9, 0.9]}
                                 for s, fd in zip(seeds, fds)]}]}


def test_mean_and_sd_are_over_training_seeds() -> None:
    (cell,) = aggregate([record("dmf")])
    assert cell["fd_digits"] == pytest.approx(7.5)
    assert cell["fd_digits_sd"] == pytest.approx(statistics.stdev([5.5, 7.5, 9.5]))  # not over the 6 evaluations
    assert cell["train_seeds"] == 3


@pytest.mark.parametrize("other, message", [
    (record("split", half="validation"), "split has half=validation but dmf has test"),
    (record("split", steps=600), "flow map split has train_steps=600 but dmf has 1200"),
    (record("split", seeds=(0, 1, 3)), "flow map split has train_seeds=[0, 1, 3]"),
    (record("dmf"), "a label appears twice"),
])
def test_merge_refuses_files_whose_settings_differ(other: dict, message: str) -> None:
    check_settings([record("dmf"), record("split"), record("teacher", kind="teacher", steps=1200)])
    with pytest.raises(BenchmarkError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_settings([record("dmf"), other])


def test_each_invocation_writes_its_own_file_and_merge_writes_the_table(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    a = write_record(record("dmf"), tmp_path)
    b = write_record(record("dmf"), tmp_path)
    c = write_record(record("split", fds=((6.0, 6.0), (6.0, 6.0), (6.0, 6.0))), tmp_path)
    assert len({a, b, c}) == 3 and json.loads(a.read_text())["label"] == "dmf"
    assert main(["--merge", str(a), str(c), "--out", str(tmp_path)]) == 0
    table = (tmp_path / "table-test.md").read_text()
    assert "| dmf | flow_map | 1 | 7.50 ± 2.00 |" in table and "| split | flow_map | 1 | 6.00 ± 0.00 |" in table
    bad = write_record(record("split2", steps=600), tmp_path)
    assert main(["--merge", str(a), str(bad), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "train_steps=600" in err and "\n" not in err
