"""The hand-made-feature TB baseline (models/experiments) computes what its card figures claim."""

from __future__ import annotations

import numpy as np
import pytest

from models import data, metrics
from models.experiments import tb_texture_baseline as tb


def test_features_of_a_real_radiograph_follow_its_lungs(fixture_dir):
    case = next(c for c in data.read_index(fixture_dir) if c.case_id == "MCUCXR_0017_0")
    image, mask = data.load_image(case.image_path), data.load_mask(case.mask_path)
    f = tb.case_features(image, mask.astype(np.float32))
    assert f.shape == (4 + 3 * 3 * (9 * 7 + 10),) and np.all(np.isfinite(f))
    # shape features: lung share of the image and left/right balance from the given lungs
    assert f[0] == pytest.approx(mask.mean(), abs=0.01)
    assert f[2] + f[3] == pytest.approx(f[0], abs=1e-6)
    assert 0.6 < f[1] < 1.6
    # a local-binary-pattern histogram sums to one in every zone
    per_zone = 9 * 7 + 10
    first_hist = f[4 + 9 * 7 : 4 + per_zone]
    assert first_hist.sum() == pytest.approx(1.0)
    # no lungs: shape features are zero and nothing breaks
    empty = tb.case_features(image, np.zeros_like(mask, dtype=np.float32))
    assert empty[0] == 0 and np.all(np.isfinite(empty))


def test_stratified_folds_deal_each_stratum_evenly():
    strata = ["a:0"] * 23 + ["a:1"] * 7 + ["b:1"] * 11
    fold = tb.stratified_folds(strata, 5, seed=3)
    keys = np.asarray(strata)
    for s in set(strata):
        counts = np.bincount(fold[keys == s], minlength=5)
        assert counts.max() - counts.min() <= 1
    assert np.array_equal(fold, tb.stratified_folds(strata, 5, seed=3))


def test_logistic_model_learns_a_separable_signal_and_ignores_noise():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 60)
    x = rng.normal(size=(120, 5))
    x[:, 2] += 3.0 * y  # one informative feature
    model = tb.LogisticModel(x[::2], y[::2], penalty=1e-2)
    assert metrics.roc_auc(y[1::2], model.logits(x[1::2])) > 0.95
    assert abs(model.w.detach().numpy()[2]) > 3 * np.abs(np.delete(model.w.detach().numpy(), 2)).max()


def test_unusable_data_is_a_readable_error(fixture_dir, tmp_path, capsys):
    # the fixture is all val
    assert tb.main(["--data", str(fixture_dir)]) == 2
    assert "split column with train and val cases" in capsys.readouterr().err
    # half of it train: too few cases per class to cross-validate
    rows = (fixture_dir / "index.csv").read_text().splitlines()
    body = [r.rsplit(",", 1)[0] + ("," + ("train" if i % 2 else "val")) for i, r in enumerate(rows[1:])]
    (tmp_path / "index.csv").write_text("\n".join([rows[0], *body]) + "\n")
    for sub in ("images", "masks"):
        (tmp_path / sub).symlink_to(fixture_dir / sub)
    assert tb.main(["--data", str(tmp_path)]) == 2
    assert "train cases per class" in capsys.readouterr().err
