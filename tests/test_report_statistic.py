"""The report judges a point by the statistic its task declares (`Task.quality`, recorded as
results.json's `task.quality`), on a sweep written by hand (results.json and examples.parquet, no
training), so every figure is known in advance.

A tests-only classification task whose headline is macro-F1, reached as any user's task is, by its
`module:Class` path. Two seeds, each an FP32 point and a PTQ point, on 300 examples of three
classes: 140 of class 0, 140 of class 1 and 20 of class 2.

- FP32 confuses classes 0 and 1 on k examples each way (k = 20 for seed 0, 18 for seed 1) and gets
  class 2 right: per-class F1 (140 − k)/140, (140 − k)/140 and 1; macro-F1 19/21 and 32/35.
- PTQ confuses nothing but calls every class-2 example class 0: F1 14/15, 1 and 0; macro-F1 29/45.
- The PTQ point also tested its own FP32 model, the same fine-tune as the FP32 point's.

PTQ is 2k − 20 examples more accurate (6.7 and 5.3 points: `better` by accuracy), while its
macro-F1 is 82/315 and 85/315 lower (26 and 27 F1 points: `worse`); so a report that read accuracy,
or the other seed's FP32, would give other deltas and verdicts.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import toy_plugins
from test_report_seeds import _write_point
from torchmetrics.classification import MulticlassF1Score

from qatflash.report import write_report
from qatflash.report.quality import REFERENCE_MODEL, STATISTICS, Margins
from qatflash.report.stats import IDENTICAL, Interval, macro_f1, macro_f1_delta, permutation
from qatflash.results import QUANTIZED
from qatflash.tasks import TASKS


class MacroF1Task(toy_plugins.MacroF1Task):
    """toy_plugins' classification task with the macro-F1 headline, declaring macro-F1 as the
    statistic of its intervals and verdicts."""

    quality = "macro_f1"


TASK = f"{__name__}:{MacroF1Task.__name__}"
REFERENCE_QUANT = "fp32"  # the reference point's quant choice (its quant_method is none)
T_1 = 12.706205  # t(0.975, 1): two seeds
SIZES = (140, 140, 20)  # examples per class
CONFUSED = {0: 20, 1: 18}  # per seed: FP32's class-0/1 confusions each way
REFERENCE_F1 = {0: 19 / 21, 1: 32 / 35}
PTQ_F1 = 29 / 45
DELTA = {0: -82 / 315, 1: -85 / 315}


def _describe(task: str) -> dict[str, Any]:
    """The task section a job records for `task=<task>`."""
    return TASKS.load(task)(SimpleNamespace(task=SimpleNamespace(name=task))).describe()


def _predictions(confused: int, class_2_as: int) -> tuple[np.ndarray, np.ndarray]:
    """Targets, and predictions that swap `confused` examples each way between classes 0 and 1 and
    call every class-2 example `class_2_as`."""
    target = np.repeat([0, 1, 2], SIZES)
    prediction = target.copy()
    prediction[:confused] = 1
    prediction[SIZES[0] : SIZES[0] + confused] = 0
    prediction[target == 2] = class_2_as
    return target, prediction


def _examples(**predictions_of: tuple[np.ndarray, np.ndarray]) -> pd.DataFrame:
    return pd.concat(
        pd.DataFrame(
            {"model": model, "index": range(len(target)), "target": target, "prediction": prediction}
        )
        for model, (target, prediction) in predictions_of.items()
    )


def _sweep(root: Path) -> Path:
    for seed, confused in CONFUSED.items():
        reference = _predictions(confused, class_2_as=2)
        ptq = {REFERENCE_MODEL: reference, QUANTIZED: _predictions(0, class_2_as=0)}
        _write_point(
            root / f"quant={REFERENCE_QUANT},seed={seed}",
            REFERENCE_QUANT,
            seed,
            _describe(TASK),
            _examples(**{REFERENCE_MODEL: reference}),
        )
        _write_point(
            root / f"quant=ptq_dynamic,seed={seed}", "ptq_dynamic", seed, _describe(TASK), _examples(**ptq)
        )
    return root


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _sweep(tmp_path_factory.mktemp("f1"))


@pytest.fixture(scope="module")
def report(sweep: Path) -> Path:
    write_report([sweep], sweep / "report")
    return sweep / "report"


def test_the_task_records_its_statistic_for_the_report() -> None:
    assert _describe(TASK)["quality"] == "macro_f1"
    assert {name: TASKS.load(name).quality for name in TASKS.names()} == {
        "classification": "accuracy",
        "causal_lm": "ppl",
    }


def test_every_statistic_has_a_margin_of_its_own() -> None:
    assert [f.name for f in dataclasses.fields(Margins)] == list(STATISTICS)
    assert Margins() == Margins(**{name: s.margin for name, s in STATISTICS.items()})
    assert Margins(macro_f1=0.5).describe() == "accuracy 1 pt, ppl 2 %, macro_f1 0.5 pt"


def test_a_macro_f1_task_gets_macro_f1_deltas_tests_and_verdicts_per_seed(report: Path) -> None:
    """Each PTQ seed against its own seed's FP32 point: macro-F1 and its delta as worked out above,
    each inside its CI; the paired permutation p; `worse` at the 1-point margin (by accuracy, 6.7
    and 5.3 points better). The PTQ point's own FP32 model predicts as the FP32 point's: delta 0."""
    seeds = pd.read_csv(report / "quality_per_seed.csv")
    assert {"macro_f1", "macro_f1_low", "macro_f1_high", "permutation_p"} <= set(seeds)
    assert not {"accuracy", "mcnemar_p", "ppl"} & set(seeds)
    for row in seeds.to_dict("records"):
        assert row["macro_f1_low"] <= row["macro_f1"] <= row["macro_f1_high"]
    reference = seeds[seeds["quant"] == REFERENCE_QUANT].sort_values("seed")
    assert list(reference["macro_f1"]) == pytest.approx(list(REFERENCE_F1.values()))
    assert reference["delta"].isna().all() and reference["verdict"].isna().all()
    ptq = seeds[(seeds["quant"] == "ptq_dynamic") & (seeds["model"] == QUANTIZED)].sort_values("seed")
    assert list(ptq["macro_f1"]) == pytest.approx([PTQ_F1, PTQ_F1])
    assert list(ptq["delta"]) == pytest.approx(list(DELTA.values()))
    assert ((ptq["delta_low"] <= ptq["delta"]) & (ptq["delta"] <= ptq["delta_high"])).all()
    assert (ptq["delta_high"] < -0.01).all() and (ptq["permutation_p"] < 0.001).all()
    assert list(ptq["verdict"]) == ["worse", "worse"] and ptq["significant"].all()
    twin = seeds[(seeds["quant"] == "ptq_dynamic") & (seeds["model"] == REFERENCE_MODEL)]
    assert (
        twin[["delta", "delta_low", "delta_high", "permutation_p"]].to_numpy().tolist() == [[0, 0, 0, 1]] * 2
    )
    assert set(twin["note"]) == {IDENTICAL} and set(twin["verdict"]) == {"non-inferior"}


def test_a_macro_f1_task_gets_macro_f1_intervals_and_verdicts_over_seeds(report: Path) -> None:
    """quality.csv: PTQ's macro-F1 is 29/45 in both seeds (an interval of width 0, cut to [0, 1] or
    not); its deltas −82/315 and −85/315 give −83.5/315 ± t(0.975, 1) × 1.5/315, all of it below
    the 1-point margin: worse. The markdown's quality tables head their figure `macro_f1`."""
    groups = pd.read_csv(report / "quality.csv")
    assert "accuracy" not in groups and "mcnemar_p" not in groups
    (ptq,) = groups[groups["model"] == QUANTIZED].to_dict("records")
    mean, half = np.mean(list(DELTA.values())), T_1 * abs(DELTA[0] - DELTA[1]) / 2
    expected = {
        "seeds": 2,
        "macro_f1": PTQ_F1,
        "macro_f1_low": PTQ_F1,
        "macro_f1_high": PTQ_F1,
        "delta": mean,
        "delta_low": mean - half,
        "delta_high": mean + half,
    }
    assert {k: ptq[k] for k in expected} == pytest.approx(expected)
    assert ptq["macro_f1_interval"] == "t over 2 seeds" and ptq["delta_interval"] == "t over 2 seeds"
    assert ptq["verdict"] == "worse" and ptq["significant"]
    assert all(float(p) < 0.001 for p in ptq["permutation_p"].split(", "))
    markdown = (report / "report.md").read_text()
    headers = [_header(markdown, title) for title in ("Quality over seeds", "Quality per seed")]
    for header in headers:
        assert (
            re.search(r"\|\s+macro_f1\s+\|", header)
            and "permutation_p" in header
            and "accuracy" not in header
        )


def _header(markdown: str, title: str) -> str:
    """The header row of the Markdown table under the section whose title starts with `title`."""
    section = markdown.split(f"## {title}", 1)[1]
    return next(line for line in section.splitlines() if line.startswith("|"))


def test_a_macro_f1_verdict_reads_the_macro_f1_margin(sweep: Path, tmp_path: Path) -> None:
    """At a 40-point F1 margin the 26-point loss is non-inferior; an accuracy margin changes nothing."""
    write_report([sweep], tmp_path / "f1", Margins(macro_f1=40.0))
    write_report([sweep], tmp_path / "acc", Margins(accuracy=40.0))
    verdicts = {
        margin: pd.read_csv(tmp_path / margin / "quality_per_seed.csv").query(f"model == {QUANTIZED!r}")[
            "verdict"
        ]
        for margin in ("f1", "acc")
    }
    assert set(verdicts["f1"]) == {"non-inferior"} and set(verdicts["acc"]) == {"worse"}


def test_a_statistic_the_report_does_not_compute_is_noted_not_fatal(tmp_path: Path) -> None:
    """A results file naming an unknown statistic, or one whose columns its examples lack, gets a
    row saying why; the report is still written, with the other points' figures."""
    target, prediction = _predictions(0, class_2_as=2)
    examples = _examples(**{REFERENCE_MODEL: (target, prediction)})
    for seed, quality in enumerate(("f1", "ppl", "macro_f1")):
        task = {**_describe(TASK), "quality": quality}
        _write_point(tmp_path / quality, REFERENCE_QUANT, seed, task, examples)
    write_report([tmp_path], tmp_path / "report")
    notes = pd.read_csv(tmp_path / "report" / "quality_per_seed.csv").set_index("seed")["note"]
    assert notes[0] == (
        "no interval: task.quality='f1' is not a statistic of this report; "
        "it computes ['accuracy', 'ppl', 'macro_f1']"
    )
    assert notes[1] == (
        "no interval: task.quality='ppl' reads the columns ['nll', 'tokens'], which its examples.parquet lacks"
    )
    assert pd.isna(notes[2])


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_macro_f1_is_the_jobs_test_f1(classes: int) -> None:
    """The job's `test/f1` is torchmetrics' macro F1 over its declared classes, which leaves out a
    class no example has nor is predicted (here the last two); the report's is the same figure."""
    rng = np.random.default_rng(classes)
    target = rng.integers(0, classes, 200)
    prediction = np.where(rng.random(200) < 0.7, target, rng.integers(0, classes, 200))
    metric = MulticlassF1Score(num_classes=classes + 2, average="macro")
    recorded = metric(torch.from_numpy(prediction), torch.from_numpy(target)).item()
    measured = macro_f1(target, prediction)
    assert measured.estimate == pytest.approx(recorded, abs=1e-6)
    assert measured.low < measured.estimate < measured.high


def test_macro_f1_delta_and_permutation_test_by_hand() -> None:
    """Four examples, a perfect model against one wrong on all: macro-F1 1 against 0. The exact
    permutation test swaps each example's two predictions over all 16 ways: only keeping all or
    swapping all gives a difference as large, so p = 2/16. Identical predictions: delta 0, p = 1."""
    target = np.array([0, 0, 1, 1])
    wrong = 1 - target
    assert macro_f1_delta(target, target, wrong).estimate == 1.0
    assert permutation(target, target, wrong) == pytest.approx(0.125)
    assert permutation(target, wrong, wrong) == 1.0
    assert macro_f1_delta(target, wrong, wrong) == Interval(0.0, 0.0, 0.0)


def test_a_macro_f1_points_error_bars_are_its_shipped_models_macro_f1_interval(report: Path) -> None:
    """The Pareto plot's bars (results.csv's headline_low/high) read the declared statistic's
    interval of the model each point ships: macro-F1's, not accuracy's or none."""
    table = pd.read_csv(report / "results.csv")
    seeds = pd.read_csv(report / "quality_per_seed.csv")
    shipped = seeds[(seeds["model"] == QUANTIZED) | (seeds["quant"] == REFERENCE_QUANT)]
    bounds = {
        Path(p).name: (lo, hi) for p, lo, hi in shipped[["point", "macro_f1_low", "macro_f1_high"]].to_numpy()
    }
    got = {
        Path(p).name: (lo, hi) for p, lo, hi in table[["point", "headline_low", "headline_high"]].to_numpy()
    }
    assert len(got) == 4 and got.keys() == bounds.keys()
    assert all(got[point] == pytest.approx(bounds[point]) for point in got)
