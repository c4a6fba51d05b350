"""``cxrnode calibrate``: a TB scorer trained on every training case takes the calibration and threshold
of a cross-fitted run of the same recipe (a refit), and refuses pairs that are not that."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from models import networks, onnx_runtime, registry
from models.__main__ import main
from models.training import refit, tb

TB_SMOKE = ["--size", "48", "--batch-size", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(fixture_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 1-epoch segmenter, a 2-fold cross-fitted TB run, two refits: one of the same recipe, one not."""
    root = tmp_path_factory.mktemp("refit")
    seg = root / "seg"
    assert main(["train", "segmentation", "--data", str(fixture_dir), "--epochs", "1", "--size", "64",
                 "--batch-size", "4", "--device", "cpu", "--out", str(seg)]) == 0
    out = {"seg": seg, "cross_fit": root / "cf", "refit": root / "refit", "other": root / "other"}
    common = ["--data", str(fixture_dir), "--segmenter-dir", str(seg), *TB_SMOKE]
    assert main(["train", "tb", *common, "--folds", "2", "--epochs", "1", "--out", str(out["cross_fit"])]) == 0
    assert main(["train", "tb", *common, "--members", "2", "--epochs", "1", "--out", str(out["refit"])]) == 0
    assert main(["train", "tb", *common, "--members", "2", "--epochs", "2", "--out", str(out["other"])]) == 0
    registry.clear_cache()
    return out


def _calibrate(runs: dict[str, Path], data: Path, out: Path, *, scorer: str = "refit", cross_fit: str = "cross_fit",
               version: str = "1.1.0", json_out: bool = False) -> int:
    return main(["calibrate", "--scorer", str(runs[scorer]), "--cross-fit", str(runs[cross_fit]), "--data", str(data),
                 "--out", str(out), "--version", version, "--device", "cpu", "--segmenter-dir", str(runs["seg"]),
                 *(["--json"] if json_out else [])])


def test_the_refit_networks_take_the_cross_fit_operating_point(runs, fixture_dir, tmp_path, capsys):
    out = tmp_path / "calibrated"
    capsys.readouterr()
    assert _calibrate(runs, fixture_dir, out, json_out=True) == 0
    printed = json.loads(capsys.readouterr().out)
    scorer = json.loads((runs["refit"] / "tb-scorer.json").read_text())
    cross = json.loads((runs["cross_fit"] / "tb-scorer.json").read_text())
    meta = json.loads((out / "tb-scorer.json").read_text())
    # the networks are the refit's, byte for byte; the operating point is the cross-fit's
    assert (out / "tb-scorer.pt").read_bytes() == (runs["refit"] / "tb-scorer.pt").read_bytes()
    assert meta["sha256"] == scorer["sha256"] == printed["sha256"]
    assert (out / "SHA256SUMS").read_text() == f"{scorer['sha256']}  tb-scorer.pt\n"
    assert meta["version"] == "1.1.0" and meta["members"] == 2
    assert meta["threshold"] == cross["threshold"]
    assert (meta["calibration"]["slope"], meta["calibration"]["intercept"]) == \
        (cross["calibration"]["slope"], cross["calibration"]["intercept"])
    op = meta["training"]["operating_point"]
    assert op["refit_of"]["sha256"] == cross["sha256"] and op["networks"]["sha256"] == scorer["sha256"]
    assert op["command"].startswith("cxrnode calibrate --scorer ") and "--version 1.1.0" in op["command"]
    assert "taken from the cross-fitted run" in meta["training"]["threshold_rule"]
    assert meta["training"]["cross_fit"]["oof"] == cross["training"]["cross_fit"]["oof"]
    # the node's loader applies the calibration to the refit ensemble's mean logit
    loaded = registry.load("tb-scorer", "cpu", out)
    plain = registry.load("tb-scorer", "cpu", runs["refit"])
    assert isinstance(loaded.net, networks.Calibrated) and not isinstance(plain.net, networks.Calibrated)
    segmenter = registry.load("lung-unet", "cpu", runs["seg"])
    cases = tb.mix.read_split(fixture_dir, "val")
    x, y = tb._inputs(cases, segmenter, 64, torch.device("cpu"), 48)
    with torch.no_grad():
        t = torch.from_numpy(x)
        assert torch.allclose(loaded.net(t), plain.net(t) * cross["calibration"]["slope"]
                              + cross["calibration"]["intercept"], atol=1e-5)
        scores = torch.sigmoid(loaded.net(t)).numpy().reshape(-1)
    # the val figures are those of the recalibrated scores at the cross-fit's threshold
    called = scores >= meta["threshold"]
    val = meta["training"]["val"]["base"]
    assert val == printed["val"]["base"]
    assert val["n"] == len(y) and val["n_tb"] == int(y.sum())
    assert val["sensitivity"] == pytest.approx(called[y == 1].mean())
    assert val["specificity"] == pytest.approx((~called[y == 0]).mean())
    assert 0 <= meta["training"]["cross_fit"]["val_ece"] <= 1
    registry.clear_cache()
    # a weights folder with it: evaluate uses its threshold and calibration
    weights = tmp_path / "weights"
    weights.mkdir()
    for f in [*runs["seg"].glob("lung-unet.*"), *out.glob("tb-scorer.*")]:
        shutil.copy(f, weights)
    (weights / "SHA256SUMS").write_text((runs["seg"] / "SHA256SUMS").read_text() + (out / "SHA256SUMS").read_text())
    capsys.readouterr()
    assert main(["evaluate", "--data", str(fixture_dir), "--weights", str(weights), "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["threshold"] == pytest.approx(meta["threshold"])
    registry.clear_cache()


def _drop_one_training_case(fixture_dir: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(fixture_dir, data)
    index = data / "index.csv"
    header, *rows = index.read_text().splitlines()
    index.write_text("\n".join([header, *rows[:-2], rows[-1]]) + "\n")  # a labelled case fewer
    return data


@pytest.mark.parametrize("case, message", [
    ("recipe", "is not a refit of .* epochs 2 vs 1"),
    ("calibrated_scorer", "already has a calibration"),
    ("not_cross_fitted", "is not a cross-fitted run"),
    ("same_version", "needs a new version"),
    ("other_data", "not the same training split"),
    ("bad_version", "--version"),
])
def test_calibrate_refuses_what_is_not_a_refit(runs, fixture_dir, tmp_path, case, message):
    kwargs: dict = {}
    data = fixture_dir
    if case == "recipe":
        kwargs["scorer"] = "other"
    elif case == "calibrated_scorer":
        kwargs["scorer"] = "cross_fit"
    elif case == "not_cross_fitted":
        kwargs["cross_fit"] = "refit"
    elif case == "same_version":
        kwargs["version"] = "1.0.0"
    elif case == "other_data":
        data = _drop_one_training_case(fixture_dir, tmp_path)
    elif case == "bad_version":
        kwargs["version"] = "1 1"
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=f"cxrnode: error: .*{message}"):
        _calibrate(runs, data, out, **kwargs)
    assert not (out / "tb-scorer.json").exists()  # nothing half-written


def test_older_sidecars_count_missing_settings_as_the_defaults():
    """1.0.0's sidecar predates --folds, --shift-copies and --extra: its recipe reads them as off."""
    shipped = registry.read_meta("tb-scorer")
    recipe = refit.recipe_of(shipped)
    assert set(recipe) == set(refit.RECIPE)
    assert recipe["shift_copies"] == 0 and recipe["extra"] is None and recipe["shifts"] == []


def test_the_onnx_cache_tells_calibrations_of_the_same_weights_apart():
    net = networks.build_tb_scorer("smallcnn")
    a, b = networks.Calibrated(net, 0.8, 0.0), networks.Calibrated(net, 0.9, 0.0)
    assert onnx_runtime.module_digest(a) != onnx_runtime.module_digest(b)
    assert onnx_runtime.module_digest(a) == onnx_runtime.module_digest(networks.Calibrated(net, 0.8, 0.0))
    assert "slope=0.8" in repr(a)


def test_train_tb_refit_cross_fits_refits_and_attaches_the_operating_point(runs, fixture_dir, tmp_path, capsys):
    """``train tb --folds 2 --refit --members 2``: the cross-fit into OUT/cross-fit, the refit into OUT/refit,
    and in OUT the refit's networks with the cross-fit's calibration and threshold."""
    out = tmp_path / "tb"
    capsys.readouterr()
    assert main(["train", "tb", "--data", str(fixture_dir), "--segmenter-dir", str(runs["seg"]), *TB_SMOKE,
                 "--folds", "2", "--refit", "--members", "2", "--epochs", "1", "--version", "2.0.0",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "a refit" in printed and "chosen out of fold" in printed
    for sub in ("cross-fit", "refit"):
        assert (out / sub / "tb-scorer.pt").is_file() and (out / sub / "tb-scorer.json").is_file()
    assert (out / "tb-scorer.pt").read_bytes() == (out / "refit" / "tb-scorer.pt").read_bytes()
    meta = json.loads((out / "tb-scorer.json").read_text())
    cross = json.loads((out / "cross-fit" / "tb-scorer.json").read_text())
    scorer = json.loads((out / "refit" / "tb-scorer.json").read_text())
    assert meta["version"] == "2.0.0" and cross["version"] == "2.0.0-cross-fit" and scorer["version"] == "2.0.0-refit"
    assert meta["threshold"] == cross["threshold"]
    assert (meta["calibration"]["slope"], meta["calibration"]["intercept"]) == \
        (cross["calibration"]["slope"], cross["calibration"]["intercept"])
    assert meta["members"] == 2 and cross["training"]["config"]["folds"] == 2
    assert scorer["training"]["config"]["folds"] == 0 and "calibration" not in scorer
    op = meta["training"]["operating_point"]
    assert op["refit_of"]["sha256"] == cross["sha256"] and op["networks"]["sha256"] == scorer["sha256"] == meta["sha256"]
    for command in (meta["training"]["command"], op["command"]):
        assert command.startswith("cxrnode train tb ") and "--members 2 --folds 2 --refit " in command
    registry.clear_cache()
    # --refit needs --folds, and refuses what the operating point could not be carried over to
    for extra, message in ((["--refit"], "--refit needs --folds"),
                           (["--folds", "2", "--refit", "--init", "shipped"], "--refit cannot start from --init"),
                           (["--folds", "2", "--refit", "--extra", str(fixture_dir)], "--refit cannot mix in --extra")):
        with pytest.raises(SystemExit, match=f"cxrnode: error: {message}"):
            main(["train", "tb", "--data", str(fixture_dir), "--device", "cpu", "--out", str(tmp_path / "o"), *extra])
    assert not (tmp_path / "o").exists()
