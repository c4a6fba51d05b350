"""The promotion gate (models.gate): paired bootstrap, same-model comparisons, a degraded challenger."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.catalog import ModelRegistry, RegistryError
from models.gate import _Scores, compare, format_report, paired_bootstrap, summary
from tests.models.catalog_helpers import (
    clone_version,
    degraded_segmenter,
    later_version,
    shipped_ref,
    small_reference_set,
)

DEGRADED = "lung-unet@1.0.1-degraded"
UNET, TB = shipped_ref("lung-unet"), shipped_ref("tb-scorer")
#: the shipped weights again under a version above the shipped one (``reg`` registers them)
UNET_CLONE, TB_CLONE = f"lung-unet@{later_version('lung-unet')}", f"tb-scorer@{later_version('tb-scorer')}"


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    root = tmp_path_factory.mktemp("gate")
    reg = ModelRegistry(root / "registry")
    reg.register(clone_version("lung-unet", later_version("lung-unet"), root / "unet-clone"), "lung-unet")
    reg.register(clone_version("tb-scorer", later_version("tb-scorer"), root / "tb-clone"), "tb-scorer")
    degraded_segmenter(root / "degraded")
    reg.register(root / "degraded", "lung-unet")
    return reg


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four fixture cases (2 TB, 2 normal, all with masks): every gated metric, CPU-fast."""
    return small_reference_set(tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def degraded_report(reg: ModelRegistry, small: Path) -> dict:
    return compare(reg, DEGRADED, small, device="cpu", n_boot=1000)


def rows(dice: list[float | None], labels: list[int | None], scores: list[float]) -> list[dict]:
    out = []
    for d, y, s in zip(dice, labels, scores, strict=True):
        row = {"case_id": "c", "label": y, "score": s}
        if d is not None:
            row["dice"] = d
        out.append(row)
    return out


def test_paired_bootstrap_of_a_constant_shift_is_exactly_that_shift() -> None:
    rng = np.random.default_rng(1)
    dice = list(rng.uniform(0.9, 0.99, 40))
    labels = [int(v) for v in rng.integers(0, 2, 40)]
    scores = list(rng.uniform(0, 1, 40))
    a = _Scores(rows(dice, labels, scores), 0.5)
    same = paired_bootstrap(a, _Scores(rows(dice, labels, scores), 0.5), ("lung_dice", "tb_auc", "sensitivity"), 300)
    for name, st in same.items():
        assert st["difference"] == 0.0 and st["ci95"] == [0.0, 0.0], name
        assert st["resamples"] == 300
    # every case's Dice 0.01 lower, the same cases drawn for both: the interval is the shift itself
    b = _Scores(rows([d - 0.01 for d in dice], labels, scores), 0.5)
    shifted = paired_bootstrap(a, b, ("lung_dice",), 300)["lung_dice"]
    assert shifted["difference"] == pytest.approx(-0.01)
    assert shifted["ci95"] == pytest.approx([-0.01, -0.01])
    # unpaired noise: a real interval around the point estimate
    c = _Scores(rows(list(np.clip(np.array(dice) + rng.normal(0, 0.02, 40), 0, 1)), labels,
                     list(np.clip(np.array(scores) + rng.normal(0, 0.2, 40), 0, 1))), 0.5)
    for name, st in paired_bootstrap(a, c, ("lung_dice", "tb_auc", "sensitivity", "specificity"), 2000).items():
        lo, hi = st["ci95"]
        assert lo <= st["difference"] <= hi, (name, st)
        if name in ("lung_dice", "tb_auc"):  # continuous: a real interval (threshold metrics may not move)
            assert lo < st["difference"] < hi, (name, st)


def test_undefined_metrics_are_nan_not_zero() -> None:
    a = _Scores(rows([None, None], [1, 1], [0.2, 0.9]), 0.5)  # no masks, one TB class
    st = paired_bootstrap(a, a, ("lung_dice", "tb_auc", "sensitivity", "specificity"), 100)
    assert math.isnan(st["lung_dice"]["difference"]) and math.isnan(st["tb_auc"]["difference"])
    assert st["lung_dice"]["resamples"] == 0 and math.isnan(st["specificity"]["against"])
    assert st["sensitivity"]["against"] == 0.5


def test_the_same_weights_loaded_twice_differ_by_exactly_zero(reg: ModelRegistry, small: Path) -> None:
    # UNET_CLONE holds the shipped bytes in another folder: loaded and run separately
    report = compare(reg, UNET_CLONE, small, device="cpu", n_boot=500)
    assert report["against"]["ref"] == UNET and report["challenger"]["tb"] == TB
    assert [m["metric"] for m in report["metrics"]] == ["lung_dice", "tb_auc", "sensitivity", "specificity"]
    for m in report["metrics"]:
        assert m["difference"] == 0.0 and m["ci95"] == [0.0, 0.0] and m["verdict"] == "pass", m
    assert report["passed"] and report["failed"] == []
    assert report["data"] == {"folder": str(small.resolve()), "split": None, "n_cases": 4, "n_masks": 4,
                              "n_labelled": 4, "n_tb": 2}
    for case in report["cases"]:
        assert case["dice_against"] == case["dice_challenger"] and case["score_against"] == case["score_challenger"]
    dice = next(m for m in report["metrics"] if m["metric"] == "lung_dice")
    assert 0.93 < dice["against"] <= 1.0  # the shipped segmenter on the fixture (as cxrnode evaluate)


def test_a_tb_challenger_is_compared_on_tb_metrics_with_the_lungs_in_service(reg: ModelRegistry,
                                                                              small: Path) -> None:
    report = compare(reg, TB_CLONE, small, device="cpu", n_boot=200)
    assert report["slot"] == "tb" and [m["metric"] for m in report["metrics"]] == ["tb_auc", "sensitivity",
                                                                                 "specificity"]
    assert report["challenger"]["segmenter"] == report["against"]["segmenter"] == UNET
    assert all(m["difference"] == 0.0 for m in report["metrics"]) and report["passed"]
    with pytest.raises(RegistryError, match="compare models of one slot"):
        compare(reg, TB_CLONE, small, against=UNET, device="cpu", n_boot=100)


def test_a_degraded_segmenter_fails_on_dice(degraded_report: dict) -> None:
    r = degraded_report
    dice = {m["metric"]: m for m in r["metrics"]}["lung_dice"]
    assert dice["difference"] < -0.005 and dice["drop"] == pytest.approx(-dice["difference"])
    assert dice["verdict"] == "fail" and "lung Dice" in r["failed"] and not r["passed"]
    for m in r["metrics"]:  # every interval holds its point estimate
        lo, hi = m["ci95"]
        assert lo <= m["difference"] <= hi, m
    assert dice["ci95"][1] < 0  # the whole interval is a loss
    masked = [c for c in r["cases"] if c["dice_against"] is not None]
    assert len(masked) == 4 and all(c["dice_challenger"] < c["dice_against"] for c in masked)
    # the TB scorer (the one in service on both sides) saw the degraded lungs
    assert r["challenger"]["tb"] == r["against"]["tb"] == TB
    assert any(c["score_challenger"] != c["score_against"] for c in r["cases"])
    text = format_report(r)
    assert "gate: FAILED on lung Dice" in text and DEGRADED in text
    assert "cases" not in summary(r) and summary(r)["metrics"] == r["metrics"]


def test_a_metric_the_data_cannot_measure_does_not_pass(reg: ModelRegistry, fixture_dir: Path,
                                                        tmp_path: Path) -> None:
    data = tmp_path / "no-masks"
    shutil.copytree(fixture_dir, data)
    with (fixture_dir / "index.csv").open() as fh:
        cases = list(csv.DictReader(fh))
    with (data / "index.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(cases[0]))
        writer.writeheader()
        writer.writerows([{**c, "mask_path": ""} for c in cases[:2]])  # one normal, one TB
    report = compare(reg, UNET_CLONE, data, device="cpu", n_boot=100)
    dice = report["metrics"][0]
    assert dice["verdict"] == "unmeasured" and dice["difference"] is None and dice["ci95"] == [None, None]
    assert report["failed"] == ["lung Dice"] and not report["passed"]
