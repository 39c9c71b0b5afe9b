"""Recovery over PTQ, (PTQ − QAT) / (PTQ − float), on a sweep written by hand (results.json and
examples.parquet, no training), so every figure is known in advance; and the scheme key that pairs
a QAT point with its PTQ point.

400 examples, every target 1. Per seed: float right on 360 (90 %); scheme A's PTQ right on 300 for
seed 0 (75 %) and 310 for seed 1 (77.5 %), its QAT on 345 (86.25 %: recovery (75 − 86.25) /
(75 − 90) = 0.75) and 330 (82.5 %: (77.5 − 82.5) / (77.5 − 90) = 0.4); a QAT read against the
other seed's PTQ would get other numbers. Scheme B: PTQ right on 359 (its change's interval
contains 0: nothing to recover). Scheme C: a QAT with no PTQ point of its scheme.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_report_seeds import _windows, _write_point
from test_report_statistic import _describe, _predictions

from qatflash.config import to_config
from qatflash.models import declared_config, model_on_meta
from qatflash.quant import make_recipe
from qatflash.report import stats, write_report
from qatflash.report.quality import STATISTICS
from qatflash.report.recovery import NO_PTQ
from qatflash.report.stats import Interval
from qatflash.tasks import TASKS

EXAMPLES = 400
RIGHT = {
    "float": 360,
    "ptq_a": {0: 300, 1: 310},
    "qat_a": {0: 345, 1: 330},
    "ptq_b": 359,
    "qat_b": 350,
    "qat_c": 340,
}
T_1 = 12.706205  # t(0.975, 1): two seeds


def _examples(model: str, right: int) -> pd.DataFrame:
    """The first `right` examples right, the rest wrong: each model's errors nest in the worse one's."""
    prediction = np.where(np.arange(EXAMPLES) < right, 1, 0)
    return pd.DataFrame({"model": model, "index": range(EXAMPLES), "target": 1, "prediction": prediction})


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("recovery")
    task = _describe("classification")
    for seed in (0, 1):
        points = {
            "fp32": ("none", None, [_examples("float", RIGHT["float"])]),
            "ptq_static": ("ptq_static", "A", [_examples("quantized", RIGHT["ptq_a"][seed])]),
            "qat_x86": ("qat", "A", [_examples("quantized", RIGHT["qat_a"][seed])]),
            "ptq_dynamic": ("ptq_dynamic", "B", [_examples("quantized", RIGHT["ptq_b"])]),
            "qat_b": ("qat", "B", [_examples("quantized", RIGHT["qat_b"])]),
            "qat_x86_a8w7": ("qat", "C", [_examples("quantized", RIGHT["qat_c"])]),
        }
        for quant, (method, scheme, frames) in points.items():
            _write_point(
                root / f"quant={quant},seed={seed}",
                quant,
                seed,
                task,
                pd.concat(frames),
                params={"seed": seed, "quant_method": method},
                model={"scheme": scheme} if scheme else {},
            )
        # ptq_static calibrated on other batches: the same scheme and quant choice, another configuration
        _write_point(
            root / f"quant=ptq_static,calibration_batches=8,seed={seed}",
            "ptq_static",
            seed,
            task,
            _examples("quantized", RIGHT["ptq_a"][seed]),
            params={"seed": seed, "quant_method": "ptq_static"},
            model={"scheme": "A"},
            seed_group_hash="config-ptq_static-calibration_batches=8",
        )
    write_report([root], root / "report")
    return root


def test_recovery_is_read_between_ptq_and_qat_of_one_scheme_with_its_interval(report: Path) -> None:
    table = pd.read_csv(report / "report" / "recovery_per_seed.csv")
    # each QAT seed pairs with both PTQ configurations of its scheme, and only with its own seed's
    pairs = table[table["quant"] == "qat_x86"].groupby("seed")["ptq_seed_group_hash"].apply(sorted)
    assert pairs.to_dict() == {
        s: ["config-ptq_static", "config-ptq_static-calibration_batches=8"] for s in (0, 1)
    }
    rows = table[table["ptq_seed_group_hash"] != "config-ptq_static-calibration_batches=8"].set_index(
        ["quant", "seed"]
    )
    for seed, ptq_delta, expected in ((0, -0.15, 0.75), (1, -0.125, 0.4)):
        row = rows.loc[("qat_x86", seed)]
        assert row["ptq_quant"] == "ptq_static" and row["statistic"] == "accuracy" and pd.isna(row["note"])
        assert row["ptq_delta"] == pytest.approx(ptq_delta) and row["recovery"] == pytest.approx(expected)
        # QAT against PTQ itself, paired: the difference of their right answers over the examples
        gained = (RIGHT["qat_a"][seed] - RIGHT["ptq_a"][seed]) / EXAMPLES
        assert (
            row["qat_vs_ptq"] == pytest.approx(gained)
            and row["qat_vs_ptq_low"] < gained < row["qat_vs_ptq_high"]
        )
        # paired: the same resampled examples for the three models, checked against a bootstrap
        # written here; one that draws each model's examples apart is far wider
        rights = (RIGHT["float"], RIGHT["ptq_a"][seed], RIGHT["qat_a"][seed])
        low, high = _bootstrap(*rights, paired=True)
        assert (row["recovery_low"], row["recovery_high"]) == pytest.approx((low, high), abs=0.03)
        apart = _bootstrap(*rights, paired=False)
        assert row["recovery_high"] - row["recovery_low"] < 0.75 * (apart[1] - apart[0])
    assert rows.loc[("qat_b", 0), "note"].startswith("no recovery to measure: PTQ's change [")
    assert np.isnan(rows.loc[("qat_b", 0), "recovery"])
    assert rows.loc[("qat_x86_a8w7", 0), "note"] == NO_PTQ


def _bootstrap(float_right: int, ptq_right: int, qat_right: int, paired: bool) -> tuple[float, float]:
    """The 95 % percentile interval of the recovery over 4,000 resamples of the examples, drawn once
    for all three models (paired) or for each apart."""
    rng = np.random.default_rng(1)
    index = np.arange(EXAMPLES)
    draws = [rng.integers(0, EXAMPLES, size=(4000, EXAMPLES)) for _ in range(1 if paired else 3)] * (
        3 if paired else 1
    )
    f, p, q = (
        (index < right)[d].mean(axis=1)
        for right, d in zip((float_right, ptq_right, qat_right), draws, strict=True)
    )
    ratios = (p - q) / (p - f)
    return float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


def test_recovery_over_seeds_is_the_mean_with_its_t_interval(report: Path) -> None:
    groups = pd.read_csv(report / "report" / "recovery.csv").set_index(["quant", "ptq_seed_group_hash"])
    # one row per PTQ configuration, each over its two seeds (not the four pairs pooled)
    assert groups.loc["qat_x86"]["seeds"].to_dict() == {
        "config-ptq_static": 2,
        "config-ptq_static-calibration_batches=8": 2,
    }
    groups = groups.reset_index().drop_duplicates("quant").set_index("quant")
    row = groups.loc["qat_x86"]
    half = T_1 * 0.175  # the standard error of 0.75 and 0.4: their difference / 2
    assert (row["seeds"], row["seeds_without"]) == (2, 0)
    assert (row["recovery"], row["recovery_low"], row["recovery_high"]) == pytest.approx(
        (0.575, 0.575 - half, 0.575 + half)
    )
    # QAT's paired change against PTQ over the same seeds: (345 − 300) / 400 and (330 − 310) / 400
    half = T_1 * (0.1125 - 0.05) / 2
    assert (row["qat_vs_ptq"], row["qat_vs_ptq_low"], row["qat_vs_ptq_high"]) == pytest.approx(
        (0.08125, 0.08125 - half, 0.08125 + half)
    )
    assert row["qat_vs_ptq_interval"] == "t over 2 seeds"
    assert groups.loc["qat_b", "seeds_without"] == 2
    # no recovery to measure, but the change against PTQ is still given: (350 − 359) / 400 twice
    assert groups.loc["qat_b", "qat_vs_ptq"] == pytest.approx(-0.0225)
    assert np.isnan(groups.loc["qat_b", "recovery"])
    markdown = (report / "report" / "report.md").read_text()
    assert "## Recovery over PTQ of the same scheme, over seeds" in markdown
    assert "57.5 [" in markdown  # the mean recovery in percent with its interval


@pytest.mark.parametrize(
    ("one", "other", "same"),
    [
        ("qat_x86", "ptq_static", True),  # observer kinds differ, the numbers do not
        (
            "qat_x86 quant.fake_quant_start_step=0.5 quant.freeze_observers_step=0.9",
            "ptq_static quant.calibration_batches=8",
            True,
        ),
        ("qat_x86", "ptq_dynamic", False),  # dynamic activations
        ("qat_x86_a8w7", "ptq_static", False),  # 7-bit weights, 8-bit activations without reduce_range
        ("qad_x86", "ptq_static", True),  # distillation changes how scales are found only
        ("qat_x86_lsq", "ptq_static", True),  # so do learned ranges
        ("qat_x86_lora", "ptq_static", True),  # and LoRA's adapters, merged before conversion
        ("qat_torchao_8da4w", "ptq_torchao_8da4w", False),  # the PTQ keeps its embeddings float
    ],
)
def test_a_scheme_key_is_shared_by_ptq_and_qat_of_the_same_numbers_only(
    make_cfg, one: str, other: str, same: bool
) -> None:
    def key(quant: str) -> str:
        choice, *overrides = quant.split()
        config = to_config(make_cfg(f"quant={choice}", *overrides))
        recipe = make_recipe(config.quant)
        recipe.select_targets(
            model_on_meta(declared_config(config.model), TASKS.load("classification").auto_model)
        )
        return recipe.product_record()["scheme"]

    assert (key(one) == key(other)) is same


def test_each_statistic_reads_recovery_off_its_own_figure() -> None:
    """Perplexity's from the windows' perplexities (not their mean NLL), macro-F1's from the three
    models' macro-F1 in the order float, PTQ, QAT."""
    f, p, q = (
        _windows(model, scale) for model, scale in (("float", 1.0), ("quantized", 1.2), ("quantized", 1.05))
    )
    assert STATISTICS["ppl"].recovery(f, p, q).estimate == pytest.approx((1.2 - 1.05) / (1.2 - 1.0))

    def frame(confused: int, class_2_as: int) -> pd.DataFrame:
        target, prediction = _predictions(confused, class_2_as)
        return pd.DataFrame({"target": target, "prediction": prediction})

    # macro-F1: float 19/21, PTQ 29/45 (gives class 2 up), QAT 20/21 (10 confusions each way)
    found = STATISTICS["macro_f1"].recovery(frame(20, 2), frame(0, 0), frame(10, 2))
    assert found.estimate == pytest.approx((29 / 45 - 20 / 21) / (29 / 45 - 19 / 21))
    assert found.low < found.estimate < found.high


def _accuracy_recovery(ptq_wrong: list[int], qat_wrong: list[int]) -> Interval:
    """Recovery on 10 examples the float model gets all right, PTQ and QAT wrong where listed."""
    correct = {}
    for name, wrong in (("ptq", ptq_wrong), ("qat", qat_wrong)):
        correct[name] = np.ones(10)
        correct[name][wrong] = 0
    return stats.recovery(
        (np.ones(10), correct["ptq"], correct["qat"]), lambda *c, axis: [x.mean(axis) for x in c]
    )


def test_a_resample_with_no_loss_to_recover_is_left_out_of_the_interval() -> None:
    """PTQ wrong on examples 0 and 1, QAT on 0: a resample's recovery is (its 1s) / (its 0s and 1s),
    in [0, 1]; the ~11 % of resamples holding neither are 0/0, left out rather than voiding the CI."""
    found = _accuracy_recovery([0, 1], [0])
    assert found.estimate == pytest.approx(0.5)
    assert (found.low, found.high) == (0.0, 1.0)


def test_a_denominator_at_zero_on_a_resample_widens_the_interval_to_infinity() -> None:
    """PTQ wrong on example 0, QAT on 1: 1 − (its 1s) / (its 0s); a third of the resamples miss
    example 0 and hold example 1 (QAT's loss over PTQ's none: +inf): the upper bound is +inf, not
    the NaN an interpolation between two infinite resamples gives."""
    found = _accuracy_recovery([0], [1])
    assert found.estimate == 0.0
    assert found.high == np.inf and np.isfinite(found.low)
