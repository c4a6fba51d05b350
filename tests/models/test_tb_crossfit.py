"""TB scorer cross-fitting: folds, Platt scaling, a calibrated sidecar, and the threshold chosen out of fold."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from models import metrics, networks, registry
from models.__main__ import main
from models.training import tb


def test_fit_platt_recovers_known_calibration():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 2, 40_000)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-(0.5 * z - 0.8)))).astype(int)
    slope, intercept = metrics.fit_platt(y, z)
    assert slope == pytest.approx(0.5, abs=0.03) and intercept == pytest.approx(-0.8, abs=0.05)
    # an over-confident score (logits twice too large) is shrunk, and the ECE drops
    over = 2 * (0.5 * z - 0.8)
    a, b = metrics.fit_platt(y, over)
    assert a == pytest.approx(0.5, abs=0.03)
    fitted = 1 / (1 + np.exp(-(a * over + b)))
    assert metrics.calibration(y, fitted)["ece"] < 0.02 < metrics.calibration(y, 1 / (1 + np.exp(-over)))["ece"]


def test_fit_platt_refuses_one_class():
    with pytest.raises(ValueError, match="both classes"):
        metrics.fit_platt(np.ones(5), np.arange(5.0))


def test_assign_folds_is_stratified_and_seeded():
    sources = ["montgomery"] * 30 + ["shenzhen"] * 70
    labels = np.array([0] * 17 + [1] * 13 + [0] * 36 + [1] * 34)
    folds = tb.assign_folds(labels, sources, 5, seed=7)
    assert set(folds.tolist()) == {0, 1, 2, 3, 4}
    assert np.array_equal(folds, tb.assign_folds(labels, sources, 5, seed=7))
    assert not np.array_equal(folds, tb.assign_folds(labels, sources, 5, seed=8))
    assert np.bincount(folds).tolist() == [20] * 5  # strata chained round-robin: even folds
    src = np.array(sources)
    for key in {(s, y) for s, y in zip(sources, labels.tolist())}:
        counts = np.bincount(folds[(src == key[0]) & (labels == key[1])], minlength=5)
        assert counts.max() - counts.min() <= 1, key  # each stratum spread evenly
    with pytest.raises(ValueError, match="at least 2"):
        tb.assign_folds(labels, sources, 1, seed=0)


def test_calibrated_wrapper_and_registry(tmp_path):
    net = networks.build_tb_scorer("smallcnn")
    meta = registry.save(net, {"name": "cal-test", "version": "0", "kind": "tb", "arch": "smallcnn", "network": {},
                               "input_size": 32, "threshold": 0.4}, "tb-scorer", tmp_path)
    x = torch.rand(2, 2, 32, 32)
    registry.clear_cache()
    plain = registry.load("tb-scorer", "cpu", tmp_path).net
    with torch.no_grad():
        raw = plain(x)
    sidecar = tmp_path / "tb-scorer.json"
    sidecar.write_text(json.dumps(dict(meta, calibration={"method": "platt", "slope": 0.5, "intercept": -1.25})))
    registry.clear_cache()
    loaded = registry.load("tb-scorer", "cpu", tmp_path)
    assert isinstance(loaded.net, networks.Calibrated)
    with torch.no_grad():
        assert torch.allclose(loaded.net(x), 0.5 * raw - 1.25, atol=1e-5)
    for bad, why in (({"method": "isotonic"}, "unknown calibration"), ({"method": "platt", "slope": -1, "intercept": 0},
                                                                       "must be positive"),
                     ({"method": "platt", "slope": "x", "intercept": 0}, "numeric")):
        sidecar.write_text(json.dumps(dict(meta, calibration=bad)))
        registry.clear_cache()
        with pytest.raises(registry.WeightsError, match=why):
            registry.load("tb-scorer", "cpu", tmp_path)
    registry.clear_cache()


def test_train_tb_folds_chooses_threshold_out_of_fold(fixture_dir, tmp_path, capsys):
    """A 2-fold smoke run: the sidecar's calibration and threshold are exactly what the members'
    out-of-fold logits give, and the loaded model scores with that calibration."""
    seg = tmp_path / "seg"
    assert main(["train", "segmentation", "--data", str(fixture_dir), "--epochs", "1", "--size", "64",
                 "--batch-size", "4", "--device", "cpu", "--out", str(seg)]) == 0
    out = tmp_path / "tb"
    capsys.readouterr()
    assert main(["train", "tb", "--data", str(fixture_dir), "--folds", "2", "--epochs", "2", "--size", "48",
                 "--batch-size", "3", "--device", "cpu", "--out", str(out), "--segmenter-dir", str(seg)]) == 0
    assert "chosen out of fold" in capsys.readouterr().out
    meta = json.loads((out / "tb-scorer.json").read_text())
    assert meta["members"] == 2 and "--folds 2" in meta["training"]["command"]
    cal, cross = meta["calibration"], meta["training"]["cross_fit"]
    assert cal["method"] == "platt" and cal["slope"] > 0
    assert "out-of-fold" in meta["training"]["threshold_rule"] and "val split chose nothing" in meta["training"]["threshold_rule"]
    assert cross["oof"]["n"] == 6 and cross["oof"]["n_tb"] == 3
    # recompute: the folds, each member's logits on the fold it never trained on, Platt, threshold
    segmenter = registry.load("lung-unet", "cpu", seg)
    cases = tb.mix.read_split(fixture_dir, "train")
    x, y = tb._inputs(cases, segmenter, 64, torch.device("cpu"), 48)
    folds = tb.assign_folds(y, [c.source for c in cases], 2, 20240611)
    registry.clear_cache()
    loaded = registry.load("tb-scorer", "cpu", out)
    assert isinstance(loaded.net, networks.Calibrated)
    ensemble = loaded.net.net
    oof = np.zeros(len(y), np.float32)
    for k in range(2):
        oof[folds == k] = tb.predict_logits(ensemble.members[k], x[folds == k], torch.device("cpu"))
    again = tb.cross_fit_calibration(y, oof, 0.9)
    assert again["slope"] == pytest.approx(cal["slope"], rel=1e-4)
    assert again["intercept"] == pytest.approx(cal["intercept"], rel=1e-4, abs=1e-5)
    assert again["threshold"] == pytest.approx(meta["threshold"], rel=1e-4)
    assert again["oof"]["sensitivity"] >= 0.9
    # the loaded (calibrated) network gives sigmoid(slope * mean logit + intercept)
    with torch.no_grad():
        t = torch.from_numpy(x)
        expected = cal["slope"] * ensemble(t) + cal["intercept"]
        assert torch.allclose(loaded.net(t), expected, atol=1e-5)
    registry.clear_cache()
    # a weights folder with the calibrated scorer works with evaluate, whose threshold is the sidecar's
    weights = tmp_path / "weights"
    weights.mkdir()
    for f in [*seg.glob("lung-unet.*"), *out.glob("tb-scorer.*")]:
        shutil.copy(f, weights)
    (weights / "SHA256SUMS").write_text((seg / "SHA256SUMS").read_text() + (out / "SHA256SUMS").read_text())
    capsys.readouterr()
    assert main(["evaluate", "--data", str(fixture_dir), "--weights", str(weights), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["threshold"] == pytest.approx(meta["threshold"])
    registry.clear_cache()


@pytest.mark.parametrize("extra, message", [
    (["--folds", "1"], "at least 2 folds"),
    (["--folds", "3", "--members", "2"], "one member per fold"),
    (["--folds", "2", "--init", "shipped"], "cannot start from --init"),
])
def test_train_tb_folds_refuses_bad_settings(fixture_dir, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        main(["train", "tb", "--data", str(fixture_dir), "--device", "cpu", "--out", str(tmp_path / "o"), *extra])


def test_train_tb_with_shifted_copies(fixture_dir, tmp_path):
    """Shift augmentation: each training case gets shifted versions built from its raw image through the
    segmenter and crop; the sidecar records the draws; settings are checked."""
    seg = tmp_path / "seg"
    assert main(["train", "segmentation", "--data", str(fixture_dir), "--epochs", "1", "--size", "64",
                 "--batch-size", "4", "--device", "cpu", "--out", str(seg)]) == 0
    segmenter = registry.load("lung-unet", "cpu", seg)
    cases = tb.mix.read_split(fixture_dir, "train")
    plain, _ = tb._inputs(cases, segmenter, 64, torch.device("cpu"), 48)
    shifted, drawn = tb.shifted_inputs(cases, segmenter, 64, torch.device("cpu"), 48, ("invert", "crop"), 2, seed=5)
    assert shifted.shape == (6, 2, 2, 48, 48) and all(len(d) == 2 and set(d) <= {"invert", "crop"} for d in drawn)
    again, drawn_again = tb.shifted_inputs(cases, segmenter, 64, torch.device("cpu"), 48, ("invert", "crop"), 2, seed=5)
    assert drawn == drawn_again and np.array_equal(shifted, again)  # seeded
    for i, names in enumerate(drawn):
        for c, name in enumerate(names):
            if name == "invert":  # the image channel is the inverted radiograph: anti-correlated with the plain one
                a, b = plain[i, 0].ravel(), shifted[i, c, 0].ravel()
                assert np.corrcoef(a, b)[0, 1] < 0
    out = tmp_path / "tb"
    assert main(["train", "tb", "--data", str(fixture_dir), "--epochs", "1", "--size", "48", "--batch-size", "3",
                 "--device", "cpu", "--out", str(out), "--segmenter-dir", str(seg), "--shift-copies", "2",
                 "--shifts", "invert,crop", "--p-shift", "1"]) == 0
    meta = json.loads((out / "tb-scorer.json").read_text())
    assert meta["training"]["config"]["shift_copies"] == 2 and meta["training"]["config"]["p_shift"] == 1.0
    assert sum(meta["training"]["shift_copies_drawn"].values()) == 12
    assert "--shift-copies 2" in meta["training"]["command"]
    registry.clear_cache()
    with pytest.raises(SystemExit, match="unknown acquisition shift"):
        main(["train", "tb", "--data", str(fixture_dir), "--device", "cpu", "--out", str(tmp_path / "x"),
              "--shift-copies", "1", "--shifts", "sepia"])
    with pytest.raises(SystemExit, match="need --shift-copies"):
        main(["train", "tb", "--data", str(fixture_dir), "--device", "cpu", "--out", str(tmp_path / "y"), "--p-shift", "0.3"])
