"""The worker serves the model registry's champions and switches between two jobs when they change.

The real Pipeline and the real networks on the CPU, on a 512 x 512 DX from the repository's own
Montgomery case: the SEG and SR name the exact model version and weights checksum that made them,
for the shipped weights and for a registered (deliberately degraded) model alike.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from models import registry
from models.catalog import ModelRegistry
from node.http import metrics
from node.settings import load_settings
from node.worker.pipeline import Outcome, Pipeline
from tests.dicom_factory import make_dx
from tests.models.catalog_helpers import (
    clone_version,
    degraded_segmenter,
    later_version,
    shipped_ref,
)
from tests.unit.test_results import find_items

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "tests" / "data" / "MCUCXR_0017_0.png"
SHIPPED_UNET = registry.read_meta("lung-unet")
SHIPPED_TB = registry.read_meta("tb-scorer")
UNET, TB = shipped_ref("lung-unet"), shipped_ref("tb-scorer")
DEGRADED = "lung-unet@1.0.1-degraded"


@pytest.fixture()
def settings(tmp_path: Path):
    return load_settings(REPO / "config" / "cxrnode.toml",
                         env={"CXRNODE_NODE_DATA_DIR": str(tmp_path / "var"), "CXRNODE_WORKER_DEVICE": "cpu"})


@pytest.fixture()
def radiograph(tmp_path: Path) -> Path:
    path = tmp_path / "dx.dcm"
    make_dx(IMAGE, size=(512, 512)).save_as(path, enforce_file_format=True)
    return path


def identities(outcome: Outcome) -> dict[str, object]:
    """What the SEG and the SR say made them."""
    seg = hd.seg.segread(io.BytesIO(outcome.result("seg").data))
    algorithm = seg.get_segment_description(1).algorithm_identification[0]
    sr = pydicom.dcmread(io.BytesIO(outcome.result("sr").data))
    return {
        "seg": (algorithm.AlgorithmName, algorithm.AlgorithmVersion, algorithm.AlgorithmParameters),
        "seg_uid": seg.SOPInstanceUID,
        "lung_pixels": int(np.count_nonzero(seg.pixel_array)),
        "sr_names": {i.TextValue for i in find_items(sr, "111001")},
        "sr_versions": {i.TextValue for i in find_items(sr, "111003")},
        "sr_parameters": {i.TextValue for i in find_items(sr, "111002")},
    }


def test_a_promotion_takes_effect_at_the_next_job_and_a_rollback_restores(
        settings, radiograph: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pipeline = Pipeline.load(settings)
    reg = ModelRegistry(settings.models_registry_path)
    assert reg.root == tmp_path / "var" / "models" and pipeline.analyzer.refs == (UNET, TB)

    first = identities(pipeline.run(radiograph))
    assert first["seg"] == ("cxrnode-lung-unet", SHIPPED_UNET["version"], f"weights_sha256={SHIPPED_UNET['sha256']}")
    assert first["sr_names"] == {"cxrnode-lung-unet", "cxrnode-tb-scorer"}
    assert first["sr_versions"] == {SHIPPED_UNET["version"], SHIPPED_TB["version"]}
    assert {f"weights_sha256={SHIPPED_UNET['sha256']}", f"weights_sha256={SHIPPED_TB['sha256']}"} <= first["sr_parameters"]
    assert pipeline.refresh() is False  # nothing changed: no reload

    meta = degraded_segmenter(tmp_path / "run")
    reg.register(tmp_path / "run", "lung-unet")
    assert pipeline.refresh() is False  # registered is not in service
    reg.promote(DEGRADED, by="test", why="promotion while serving", force=True)
    caplog.set_level(logging.INFO, logger="node.worker.pipeline")
    second = identities(pipeline.run(radiograph))
    assert f"models: now {DEGRADED} (was {UNET})" in caplog.messages
    assert second["seg"] == ("cxrnode-lung-unet", "1.0.1-degraded", f"weights_sha256={meta['sha256']}")
    assert second["sr_versions"] == {"1.0.1-degraded", SHIPPED_TB["version"]}  # new segmenter, same TB scorer
    assert f"weights_sha256={meta['sha256']}" in second["sr_parameters"]
    assert second["seg_uid"] != first["seg_uid"]  # other algorithm, other result UIDs
    assert second["lung_pixels"] < first["lung_pixels"]  # it really is the other network
    assert metrics.loaded_models()["segmenter_version"] == "1.0.1-degraded"
    assert metrics.loaded_models()["segmenter_sha256"] == meta["sha256"]

    reg.rollback("segmenter", by="test", why="back")
    third = identities(pipeline.run(radiograph))
    assert third == first  # the same model, the same deterministic result UIDs and pixels
    assert f"models: now {UNET} (was {DEGRADED})" in caplog.messages


def test_new_champions_that_cannot_load_leave_the_old_ones_serving(
        settings, radiograph: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pipeline = Pipeline.load(settings)
    reg = ModelRegistry(settings.models_registry_path)
    entry = reg.register(clone_version("lung-resunet", later_version("lung-resunet"), tmp_path / "run"), "lung-resunet")
    reg.promote(entry.ref, by="test", why="x", force=True)
    with entry.weights_path.open("r+b") as fh:  # damaged after the promotion checked it
        fh.seek(4096)
        fh.write(b"\xff" * 8)
    caplog.set_level(logging.INFO, logger="node.worker.pipeline")
    outcome = pipeline.run(radiograph)
    assert identities(outcome)["seg"][1] == SHIPPED_UNET["version"] and pipeline.analyzer.refs[0] == UNET
    assert any("models: cannot load the new champions" in m and "checksum mismatch" in m for m in caplog.messages)
    assert pipeline.refresh() is False  # not retried on every job; the next registry change is


def test_a_pipeline_built_with_an_analyzer_keeps_it(settings, radiograph: Path) -> None:
    from models.inference import LungAnalyzer

    analyzer = LungAnalyzer.load("resunet", device="cpu")
    pipeline = Pipeline(settings, analyzer)
    assert pipeline.refresh() is False and pipeline.analyzer is analyzer and pipeline.registry is None
    assert identities(pipeline.run(radiograph))["seg"][0] == "cxrnode-lung-resunet"
    assert np.isfinite(pipeline.tb_threshold)


@pytest.mark.parametrize("configured, expected", [(None, f"{float(SHIPPED_TB['threshold']):g}"), ("0.4", "0.4")])
def test_the_model_info_names_the_runtime_and_the_threshold_in_use(
        tmp_path: Path, configured: str | None, expected: str) -> None:
    """What an admin reads in Prometheus: the operating threshold the SRs are written with (the TB
    scorer's own, or [worker] tb_threshold), and whether the networks run in torch or ONNX."""
    env = {"CXRNODE_NODE_DATA_DIR": str(tmp_path / "var"), "CXRNODE_WORKER_DEVICE": "cpu"}
    if configured is not None:
        env["CXRNODE_WORKER_TB_THRESHOLD"] = configured
    previous = metrics.loaded_models()
    try:
        pipeline = Pipeline.load(load_settings(REPO / "config" / "cxrnode.toml", env=env))
        info = metrics.loaded_models()
        assert info["tb_threshold"] == expected == f"{pipeline.tb_threshold:g}"
        assert info["runtime"] == "torch" and info["tb_model_version"] == SHIPPED_TB["version"]
    finally:
        metrics.MODEL_INFO.labels = previous
