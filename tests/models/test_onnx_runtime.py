"""``runtime = "onnx"``: the shipped networks exported to ONNX and run by onnxruntime agree with torch.

Real networks, real images (the fixture's six cases), on the CPU. Measured on this project's machine
(torch 2.13, onnxruntime 1.32, opset 17): the lung probabilities differ by at most 1.3e-5 (unet) and
4.1e-5 (resunet), the masks not by one pixel, the TB score by at most 3e-7; the tolerances below
leave a margin of 2.5x and more over that, and an export that dropped or changed a layer would miss
them by orders of magnitude. Also: the export is cached and reused, a damaged cache file is exported
again, a wrapped module is exported as it is, and a node worker with ``runtime = "onnx"`` analyses a job.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import torch

from models import data, metrics, onnx_runtime, registry, transforms
from models.inference import LungAnalyzer

PROB_TOLERANCE = 1e-4  # max |p_torch - p_onnx| of a segmenter's lung probabilities, per pixel
TB_TOLERANCE = 1e-5  # |score_torch - score_onnx| of the TB scorer
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def images(fixture_dir: Path) -> list[tuple[str, np.ndarray]]:
    return [(c.case_id, data.load_image(c.image_path)) for c in data.read_index(fixture_dir)]


@pytest.fixture(scope="module")
def pair(cache: Path):
    """(torch analyzer, onnx analyzer) per segmenter architecture, loaded once."""
    loaded: dict[str, tuple[LungAnalyzer, LungAnalyzer]] = {}

    def get(arch: str) -> tuple[LungAnalyzer, LungAnalyzer]:
        if arch not in loaded:
            loaded[arch] = (LungAnalyzer.load(arch, "cpu"),
                            LungAnalyzer.load(arch, "cpu", runtime="onnx", onnx_cache=cache))
        return loaded[arch]

    return get


@pytest.mark.parametrize("arch", ["unet", "resunet"])
def test_segmenters_agree_with_torch_on_real_images(pair, images, arch: str) -> None:
    ref, onnx = pair(arch)
    assert (ref.runtime, onnx.runtime, onnx.device) == ("torch", "onnx", "cpu")
    assert onnx.segmenter_identity == ref.segmenter_identity and onnx.tb_identity == ref.tb_identity
    worst = 0.0
    for case_id, image in images:
        net_image = transforms.preprocess(image, ref.seg_size)
        p_ref, p_onnx = ref.lung_probabilities(net_image), onnx.lung_probabilities(net_image)
        assert p_onnx.shape == p_ref.shape == (ref.seg_size, ref.seg_size) and p_onnx.dtype == p_ref.dtype == np.float32
        worst = max(worst, float(np.abs(p_ref - p_onnx).max()))
        a, b = ref.analyze(image), onnx.analyze(image)
        for name in ("lung_mask", "image_left", "image_right"):
            m_ref, m_onnx = getattr(a, name), getattr(b, name)
            assert m_onnx.shape == m_ref.shape == image.shape and m_onnx.dtype == m_ref.dtype == bool
            assert metrics.dice(m_ref, m_onnx) > 0.999, (case_id, name)
        assert isinstance(b.tb_score, float) and abs(a.tb_score - b.tb_score) < TB_TOLERANCE, case_id
        assert (b.segmenter, b.tb_model) == (a.segmenter, a.tb_model)
    assert worst < PROB_TOLERANCE, f"{arch}: lung probabilities differ by up to {worst:.2e}"


def test_the_tb_scorer_agrees_with_torch_on_real_images(pair, images) -> None:
    ref, onnx = pair("unet")
    for case_id, image in images:
        net_image = transforms.preprocess(image, ref.seg_size)
        prob = ref.lung_probabilities(net_image)  # one input for both: the TB networks alone are compared
        a, b = ref.tb_probability(net_image, prob), onnx.tb_probability(net_image, prob)
        assert 0.0 <= b <= 1.0 and abs(a - b) < TB_TOLERANCE, (case_id, a, b)


def test_a_batch_runs_through_the_dynamic_batch_axis(pair, images) -> None:
    ref, onnx = pair("unet")
    batch = np.stack([transforms.preprocess(img, ref.seg_size) for _, img in images[:3]])[:, None]
    with torch.inference_mode():
        expected = ref._seg.net(torch.from_numpy(batch)).numpy()
    got = onnx._seg_onnx(batch)
    assert got.shape == expected.shape == (3, 1, ref.seg_size, ref.seg_size)
    assert np.abs(torch.sigmoid(torch.from_numpy(got)).numpy() - torch.sigmoid(torch.from_numpy(expected)).numpy()).max() \
        < PROB_TOLERANCE


def unet_model() -> registry.LoadedModel:
    return registry.load(registry.SEGMENTER_FILES["unet"], "cpu")


SHAPE = (1, 1, 256, 256)


def cached_files(folder: Path) -> tuple[Path, Path]:
    (onnx_file,) = folder.glob("cxrnode-lung-unet-*.onnx")
    return onnx_file, onnx_file.with_suffix(".json")


def test_the_export_is_cached_and_reused(tmp_path: Path) -> None:
    model = unet_model()
    onnx_runtime.clear_cache()
    before = onnx_runtime.export_count()
    first = onnx_runtime.network_for(model, SHAPE, tmp_path)
    assert onnx_runtime.export_count() == before + 1
    assert onnx_runtime.network_for(model, SHAPE, tmp_path) is first  # this process's session
    onnx_file, record_file = cached_files(tmp_path)
    assert first.path == onnx_file and onnx_file.name.startswith(f"cxrnode-lung-unet-{model.meta['sha256'][:12]}-")
    record = json.loads(record_file.read_text())
    assert record["weights_sha256"] == model.meta["sha256"] and record["torch"] == torch.__version__
    assert record["opset"] == onnx_runtime.OPSET and record["key"] == first.key
    assert record["check_max_abs_diff"] < 1e-3
    assert not list(tmp_path.glob("*.part"))  # written atomically: no temporary file left
    stamp = onnx_file.stat().st_mtime_ns

    onnx_runtime.clear_cache()  # as a new process: the file is loaded, not exported again
    second = onnx_runtime.network_for(model, SHAPE, tmp_path)
    assert second is not first and second.key == first.key
    assert onnx_runtime.export_count() == before + 1 and onnx_file.stat().st_mtime_ns == stamp
    x = np.random.default_rng(1).random(SHAPE, dtype=np.float32)
    assert np.array_equal(first(x), second(x))


@pytest.fixture(scope="module")
def unet_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding a good export of the shipped unet (copied by the tests that damage it)."""
    folder = tmp_path_factory.mktemp("unet-export")
    onnx_runtime.network_for(unet_model(), SHAPE, folder)
    return folder


def flip_bytes(path: Path) -> None:
    with path.open("r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        fh.write(b"\xa5" * 16)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


@pytest.mark.parametrize(("damage", "reason"), [
    (flip_bytes, "has sha256"),
    (truncate, "has sha256"),
    (lambda path: path.with_suffix(".json").unlink(), None),  # a crash between the file and its record
    (lambda path: path.with_suffix(".json").write_text("{"), "cannot be read"),
])
def test_a_damaged_cache_file_is_exported_again(unet_export: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                               damage, reason: str | None) -> None:
    model = unet_model()
    for path in cached_files(unet_export):
        shutil.copy2(path, tmp_path / path.name)
    onnx_file, record_file = cached_files(tmp_path)
    damage(onnx_file)
    onnx_runtime.clear_cache()
    before = onnx_runtime.export_count()
    caplog.set_level(logging.WARNING, logger="models.onnx_runtime")
    network = onnx_runtime.network_for(model, SHAPE, tmp_path)
    assert onnx_runtime.export_count() == before + 1
    if reason is not None:
        assert any(reason in m and "exporting cxrnode-lung-unet again" in m for m in caplog.messages), caplog.messages
    assert json.loads(record_file.read_text())["onnx_sha256"] == registry.sha256_file(onnx_file)
    x = np.random.default_rng(2).random(SHAPE, dtype=np.float32)
    with torch.inference_mode():
        expected = model.net(torch.from_numpy(x)).numpy()
    assert np.abs(network(x) - expected).max() < 1e-3  # logits


class Calibrated(torch.nn.Module):
    """A network wrapped as a calibration layer would wrap it: logit * a + b."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.a = torch.nn.Parameter(torch.tensor(0.5))
        self.b = torch.nn.Parameter(torch.tensor(-1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.a + self.b


def test_a_wrapped_module_is_exported_as_it_is_under_its_own_key(tmp_path: Path) -> None:
    model = unet_model()
    wrapped = registry.LoadedModel(net=Calibrated(model.net).eval(), meta=model.meta, identity=model.identity,
                                   device="cpu")
    onnx_runtime.clear_cache()
    plain = onnx_runtime.network_for(model, SHAPE, tmp_path)
    calibrated = onnx_runtime.network_for(wrapped, SHAPE, tmp_path)
    assert calibrated.key != plain.key  # same weights file, other module: never the stale export
    x = np.random.default_rng(3).random(SHAPE, dtype=np.float32)
    with torch.inference_mode():
        expected = wrapped.net(torch.from_numpy(x)).numpy()
    assert np.abs(calibrated(x) - expected).max() < 1e-3
    assert np.abs(calibrated(x) - (plain(x) * 0.5 - 1.0)).max() < 1e-4


def test_onnx_runs_on_the_cpu_only() -> None:
    with pytest.raises(ValueError, match="runtime 'onnx' runs on the CPU"):
        LungAnalyzer.load("unet", device="cuda", runtime="onnx")
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        LungAnalyzer.load("unet", device="cpu", runtime="tensorrt")


def test_evaluate_with_the_onnx_runtime_reports_the_torch_figures(fixture_dir: Path, tmp_path: Path, capsys) -> None:
    from models.__main__ import main

    reports = {}
    for runtime in ("torch", "onnx"):
        assert main(["evaluate", "--data", str(fixture_dir), "--device", "cpu", "--json", "--runtime", runtime,
                     "--onnx-cache", str(tmp_path / "cache")]) == 0
        reports[runtime] = json.loads(capsys.readouterr().out)
    assert list((tmp_path / "cache").glob("*.onnx"))  # --onnx-cache was used
    torch_r, onnx_r = reports["torch"], reports["onnx"]
    assert onnx_r["n_cases"] == torch_r["n_cases"] == 6
    assert onnx_r["lung_dice_mean"] == pytest.approx(torch_r["lung_dice_mean"], abs=1e-4)
    assert onnx_r["tb_auc"] == torch_r["tb_auc"]
    assert (onnx_r["sensitivity"], onnx_r["specificity"]) == (torch_r["sensitivity"], torch_r["specificity"])


def test_a_worker_with_runtime_onnx_processes_a_job(tmp_path: Path) -> None:
    from node.settings import load_settings
    from node.worker.pipeline import Pipeline
    from tests.dicom_factory import make_dx

    radiograph = tmp_path / "dx.dcm"
    make_dx(REPO / "tests" / "data" / "MCUCXR_0017_0.png", size=(512, 512)).save_as(radiograph, enforce_file_format=True)
    env = {"CXRNODE_NODE_DATA_DIR": str(tmp_path / "var"), "CXRNODE_WORKER_RUNTIME": "onnx"}
    settings = load_settings(REPO / "config" / "cxrnode.toml", env=env)
    pipeline = Pipeline.load(settings)
    assert pipeline.analyzer.runtime == "onnx" and pipeline.analyzer.device == "cpu"
    assert len(list((tmp_path / "var" / "cache" / "onnx").glob("*.onnx"))) == 2  # segmenter and TB scorer
    outcome = pipeline.run(radiograph)
    assert {r.kind for r in outcome.results} == {"seg", "sr"}

    reference = Pipeline(load_settings(REPO / "config" / "cxrnode.toml",
                                       env={"CXRNODE_NODE_DATA_DIR": str(tmp_path / "var"), "CXRNODE_WORKER_DEVICE": "cpu"}),
                         LungAnalyzer.load("unet", device="cpu")).run(radiograph)
    assert outcome.tb_score == pytest.approx(reference.tb_score, abs=TB_TOLERANCE)
    seg, ref_seg = (hd.seg.segread(io.BytesIO(o.result("seg").data)) for o in (outcome, reference))
    assert metrics.dice(seg.pixel_array > 0, ref_seg.pixel_array > 0) > 0.999
