"""``cxrnode calibrate``: a TB scorer trained on every training case takes the calibration and threshold
of a cross-fitted run of the same recipe (a refit), and refuses pairs that are not that."""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models import networks, onnx_runtime, registry
from models.__main__ import main
from models.training import refit, tb

TB_SMOKE = ["--size", "48", "--batch-size", "3", "--device", "cpu"]


@contextlib.contextmanager
def _tracing(trace: dict[str, Any]) -> Iterator[None]:
    """Record what cross-fitting deals and scores (train tb --folds, or calibrate --lungs-from): the
    labels and folds of :func:`tb.assign_folds`, the out-of-fold logits and fit of
    :func:`tb.cross_fit_calibration`, and the inputs :func:`tb.tb_report` reports the base val split
    on. The callers look these up on the module at call time."""
    assign, fit, report = tb.assign_folds, tb.cross_fit_calibration, tb.tb_report

    def assign_folds(labels, sources, k, seed):
        trace["labels"], trace["folds"] = np.array(labels), assign(labels, sources, k, seed)
        return trace["folds"].copy()

    def cross_fit_calibration(labels, oof, target):
        trace["oof"], result = np.array(oof), fit(labels, oof, target)
        trace["fit"] = copy.deepcopy(result)  # the callers pop from what they get
        return result

    def tb_report(net, sets, device, threshold):
        trace["val_inputs"] = sets[tb.mix.BASE][0].copy()
        return report(net, sets, device, threshold)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tb, "tb_report", tb_report)
        mp.setattr(tb, "assign_folds", assign_folds)
        mp.setattr(tb, "cross_fit_calibration", cross_fit_calibration)
        yield


@pytest.fixture(scope="module")
def cross_fit_trace() -> dict[str, Any]:
    """The folds, labels and out-of-fold logits of the cross-fit in ``runs`` as training dealt and
    scored them (filled by ``runs``)."""
    return {}


@pytest.fixture(scope="module")
def runs(fixture_dir: Path, tmp_path_factory: pytest.TempPathFactory, cross_fit_trace: dict[str, Any]) -> dict[str, Path]:
    """A 1-epoch segmenter, a 2-fold cross-fitted TB run, two refits: one of the same recipe, one not."""
    root = tmp_path_factory.mktemp("refit")
    seg = root / "seg"
    assert main(["train", "segmentation", "--data", str(fixture_dir), "--epochs", "1", "--size", "64",
                 "--batch-size", "4", "--device", "cpu", "--out", str(seg)]) == 0
    out = {"seg": seg, "cross_fit": root / "cf", "refit": root / "refit", "other": root / "other"}
    common = ["--data", str(fixture_dir), "--segmenter-dir", str(seg), *TB_SMOKE]
    with _tracing(cross_fit_trace):
        assert main(["train", "tb", *common, "--folds", "2", "--epochs", "1", "--out", str(out["cross_fit"])]) == 0
    assert main(["train", "tb", *common, "--members", "2", "--epochs", "1", "--out", str(out["refit"])]) == 0
    assert main(["train", "tb", *common, "--members", "2", "--epochs", "2", "--out", str(out["other"])]) == 0
    registry.clear_cache()
    return out


def _calibrate(runs: dict[str, Path], data: Path, out: Path, *, scorer: str = "refit", cross_fit: str = "cross_fit",
               version: str = "1.1.0", json_out: bool = False, lungs_from: Path | None = None) -> int:
    return main(["calibrate", "--scorer", str(runs[scorer]), "--cross-fit", str(runs[cross_fit]), "--data", str(data),
                 "--out", str(out), "--version", version, "--device", "cpu", "--segmenter-dir", str(runs["seg"]),
                 *(["--lungs-from", str(lungs_from)] if lungs_from is not None else []),
                 *(["--json"] if json_out else [])])


def _check_scores_and_val(loaded, plain, x, y, cal, meta, printed) -> None:
    """The loaded model scores slope x the networks' mean logit + intercept, and the sidecar's (and the
    printed) val figures are those scores at the sidecar's threshold."""
    with torch.no_grad():
        t = torch.from_numpy(x)
        assert torch.allclose(loaded.net(t), plain.net(t) * cal["slope"] + cal["intercept"], atol=1e-5)
        scores = torch.sigmoid(loaded.net(t)).numpy().reshape(-1)
    called = scores >= meta["threshold"]
    val = meta["training"]["val"]["base"]
    assert val == printed["val"]["base"]
    assert val["n"] == len(y) and val["n_tb"] == int(y.sum())
    assert val["sensitivity"] == pytest.approx(called[y == 1].mean())
    assert val["specificity"] == pytest.approx((~called[y == 0]).mean())


def _reversioned_copy(seg_dir: Path, out: Path, version: str) -> Path:
    """The same segmenter weights under another version: ``SHA256SUMS`` and the sidecar's sha256
    cover only the .pt, so a copy whose sidecar says another version still verifies."""
    out.mkdir(parents=True)
    shutil.copy(seg_dir / "lung-unet.pt", out)
    meta = json.loads((seg_dir / "lung-unet.json").read_text())
    (out / "lung-unet.json").write_text(json.dumps(dict(meta, version=version), indent=2, sort_keys=True) + "\n")
    registry.write_sums(out, {"lung-unet.pt": registry.read_sums(seg_dir)["lung-unet.pt"]})
    registry.verify("lung-unet", out)
    return out


def _perturbed(seg_dir: Path, out: Path, version: str) -> Path:
    """A different segmenter of the same arch (its weights shifted by seeded noise), as a fine-tune would be."""
    meta = json.loads((seg_dir / "lung-unet.json").read_text())
    net = registry.load("lung-unet", "cpu", seg_dir).net
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3 * (p.std() if p.numel() > 1 else 0.1))
    keep = {k: v for k, v in meta.items() if k not in ("sha256", "weights_file", "storage_dtype")}
    registry.save(net, dict(keep, version=version), "lung-unet", out)
    registry.clear_cache()  # the training segmenter's cached network was changed in place
    return out


@pytest.fixture(scope="module")
def lungs(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Segmenter folders for --lungs-from: the training segmenter's own weights under another version,
    a different segmenter of the same arch, and an (untrained) segmenter of the other arch."""
    root = tmp_path_factory.mktemp("lungs")
    other_arch = root / "resunet"
    registry.save(networks.build_segmenter("resunet"), {"name": "cxrnode-lung-resunet", "version": "1.1.0",
                                                        "kind": "segmentation", "arch": "resunet", "network": {},
                                                        "input_size": 64}, "lung-resunet", other_arch)
    return {"same_weights": _reversioned_copy(runs["seg"], root / "same", "1.0.0-copy"),
            "new": _perturbed(runs["seg"], root / "new", "1.1.0"), "other_arch": other_arch}


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
    # the val figures are those of the recalibrated scores at the cross-fit's threshold
    _check_scores_and_val(loaded, plain, x, y, cross["calibration"], meta, printed)
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


def _members_on(runs: dict[str, Path], seg_dir: Path, folds: np.ndarray, fixture_dir: Path) -> np.ndarray:
    """Each training case scored by the cross-fit member of its fold (``folds``) on ``seg_dir``'s lungs."""
    cpu = torch.device("cpu")
    members = registry.load("tb-scorer", "cpu", runs["cross_fit"]).net.net.members  # Calibrated(Ensemble)
    x, _ = tb._inputs(tb.mix.read_split(fixture_dir, "train"), registry.load("lung-unet", "cpu", seg_dir), 64, cpu, 48)
    logits = np.zeros(len(x), np.float32)
    for k, member in enumerate(members):
        logits[folds == k] = tb.predict_logits(member, x[folds == k], cpu)
    return logits


def test_lungs_from_the_training_segmenters_weights_reproduces_the_cross_fit(runs, cross_fit_trace, lungs, fixture_dir,
                                                                            tmp_path, capsys):
    """Recomputed on the very lungs the cross-fit used (the same weights under another version), the
    folds are those train tb dealt, the out-of-fold logits those it scored (up to the float16 storage
    of the members), and so the calibration and threshold are the cross-fit's own."""
    out, trace = tmp_path / "calibrated", {}
    capsys.readouterr()
    with _tracing(trace):
        assert _calibrate(runs, fixture_dir, out, lungs_from=lungs["same_weights"]) == 0
    assert "re-scored out of fold on the lungs of cxrnode-lung-unet 1.0.0-copy" in capsys.readouterr().out
    np.testing.assert_array_equal(trace["labels"], cross_fit_trace["labels"])
    np.testing.assert_array_equal(trace["folds"], cross_fit_trace["folds"])
    assert len(set(trace["folds"].tolist())) == 2
    np.testing.assert_allclose(trace["oof"], cross_fit_trace["oof"], rtol=1e-3, atol=1e-5)
    cross = json.loads((runs["cross_fit"] / "tb-scorer.json").read_text())
    meta = json.loads((out / "tb-scorer.json").read_text())
    assert meta["calibration"]["slope"] == pytest.approx(cross["calibration"]["slope"], abs=1e-4)
    assert meta["calibration"]["intercept"] == pytest.approx(cross["calibration"]["intercept"], abs=1e-4)
    assert meta["threshold"] == pytest.approx(cross["threshold"], abs=1e-4)
    recomputed, stored = meta["training"]["cross_fit"]["oof"], cross["training"]["cross_fit"]["oof"]
    assert set(recomputed) == set(stored)
    assert (recomputed["n"], recomputed["n_tb"], recomputed["auc"]) == (stored["n"], stored["n_tb"], stored["auc"])
    assert meta["calibrated_on_lungs_of"] == "cxrnode-lung-unet 1.0.0-copy"
    registry.clear_cache()


def test_lungs_from_a_new_segmenter_derives_the_operating_point_on_its_lungs(runs, cross_fit_trace, lungs, fixture_dir,
                                                                            tmp_path, capsys):
    out, trace = tmp_path / "calibrated", {}
    capsys.readouterr()
    with _tracing(trace):
        assert _calibrate(runs, fixture_dir, out, lungs_from=lungs["new"], json_out=True) == 0
    printed = json.loads(capsys.readouterr().out)
    scorer = json.loads((runs["refit"] / "tb-scorer.json").read_text())
    cross = json.loads((runs["cross_fit"] / "tb-scorer.json").read_text())
    new = json.loads((lungs["new"] / "lung-unet.json").read_text())
    meta = json.loads((out / "tb-scorer.json").read_text())
    # the networks are the refit's, byte for byte, still trained on the old segmenter's lungs
    assert (out / "tb-scorer.pt").read_bytes() == (runs["refit"] / "tb-scorer.pt").read_bytes()
    assert meta["sha256"] == scorer["sha256"] == printed["sha256"]
    assert meta["segmenter_used_for_training"] == scorer["segmenter_used_for_training"]
    assert meta["calibrated_on_lungs_of"] == printed["calibrated_on_lungs_of"] == f"{new['name']} 1.1.0"
    op = meta["training"]["operating_point"]
    assert op["lungs_from"] == {"name": new["name"], "version": "1.1.0", "sha256": new["sha256"]}
    assert op["refit_of"]["sha256"] == cross["sha256"] and "--lungs-from " in op["command"]
    assert "recomputed on the lungs of " + meta["calibrated_on_lungs_of"] in meta["calibration"]["fitted_on"]
    assert "recomputed on the lungs of " + meta["calibrated_on_lungs_of"] in meta["training"]["threshold_rule"]
    # out of fold on the new lungs: each training case scored by the member that never saw it, in the
    # folds training dealt; those logits are not the ones on the old lungs
    on_new = _members_on(runs, lungs["new"], cross_fit_trace["folds"], fixture_dir)
    on_old = _members_on(runs, runs["seg"], cross_fit_trace["folds"], fixture_dir)
    np.testing.assert_allclose(trace["oof"], on_new, rtol=0, atol=1e-7)
    assert np.abs(on_new - on_old).max() > 1e-6
    # the operating point and the out-of-fold figures are the fit on them, not the cross-fit's
    fit, cal = trace["fit"], meta["calibration"]
    assert (cal["slope"], cal["intercept"], meta["threshold"]) == (fit["slope"], fit["intercept"], fit["threshold"])
    assert (cal["slope"], cal["intercept"]) != (cross["calibration"]["slope"], cross["calibration"]["intercept"])
    assert set(meta["training"]["cross_fit"]) == {"oof", "val_ece", "val_brier"}
    assert meta["training"]["cross_fit"]["oof"] == printed["cross_fit"]["oof"] == json.loads(json.dumps(fit["oof"]))
    assert meta["training"]["cross_fit"]["oof"] != cross["training"]["cross_fit"]["oof"]
    # the node's loader applies it to the refit ensemble's mean logit; val is reported on the new lungs
    loaded = registry.load("tb-scorer", "cpu", out)
    plain = registry.load("tb-scorer", "cpu", runs["refit"])
    x, y = tb._inputs(tb.mix.read_split(fixture_dir, "val"), registry.load("lung-unet", "cpu", lungs["new"]), 64,
                      torch.device("cpu"), 48)
    x_old, _ = tb._inputs(tb.mix.read_split(fixture_dir, "val"), registry.load("lung-unet", "cpu", runs["seg"]), 64,
                          torch.device("cpu"), 48)
    np.testing.assert_array_equal(trace["val_inputs"], x)
    assert np.abs(x[:, 1] - x_old[:, 1]).mean() > 1e-2  # the new segmenter draws other lungs
    _check_scores_and_val(loaded, plain, x, y, cal, meta, printed)
    registry.clear_cache()


@pytest.mark.parametrize("which, message", [
    ("training", "--lungs-from .* holds .* 1.0.0, the segmenter the networks were trained on: .*--lungs-from is pointless"),
    ("other_arch", "--lungs-from .* holds no lung-unet.* but a segmenter of another architecture: resunet"),
])
def test_lungs_from_refuses_the_training_segmenter_and_another_arch(runs, lungs, fixture_dir, tmp_path, which, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=f"cxrnode: error: {message}"):
        _calibrate(runs, fixture_dir, out, lungs_from=runs["seg"] if which == "training" else lungs[which])
    assert not (out / "tb-scorer.json").exists()
