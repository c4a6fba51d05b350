"""Simulated acquisition shifts (models/shifts.py), the training hook and ``cxrnode evaluate --shift``."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest

from models import shifts

NAMES = shifts.names()
RANDOM_NAMES = tuple(n for n in NAMES if n != "invert")  # invert draws nothing


def _texture(shape=(96, 128), seed=0, lo=0.2, hi=0.8) -> np.ndarray:
    """A smooth-ish random float image in [lo, hi] with a fixed range (corners pinned)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(lo, hi, size=shape)
    x[0, 0], x[-1, -1] = lo, hi
    return x


def _chest_like(shape=(240, 200)) -> np.ndarray:
    """uint8 image: bright body, two dark 'lungs', a little texture, full 0..255 range."""
    h, w = shape
    rr, cc = np.mgrid[0:h, 0:w]
    img = np.full(shape, 200.0)
    for c0 in (0.3 * w, 0.7 * w):
        img[((rr - 0.5 * h) / (0.3 * h)) ** 2 + ((cc - c0) / (0.15 * w)) ** 2 < 1] = 60
    img += np.random.default_rng(1).normal(0, 8, shape)
    img[0, 0], img[-1, -1] = 0, 255
    return np.clip(img, 0, 255).astype(np.uint8)


def _hf_energy(x: np.ndarray) -> float:
    lap = 4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]
    return float(np.mean(lap.astype(np.float64) ** 2))


# ------------------------------------------------------------------------------ registry and contract


def test_registry_lists_every_shift_with_a_one_line_docstring_and_a_default_strength():
    assert NAMES == ("gamma", "blur", "noise", "border", "text", "crop", "invert", "film")
    for name in NAMES:
        shift = shifts.get(name)
        assert shift.name == name and shift.default_strength >= 0
        assert shift.mimics and "\n" not in shift.mimics and len(shift.mimics) > 30
        public = getattr(shifts, name)
        assert public.__doc__.splitlines()[0] == shift.mimics
    assert [n for n in NAMES if shifts.get(n).geometric] == ["crop"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "image, expected_range",
    [
        (_chest_like(), (0, 255)),
        (_chest_like().astype(np.float32), (0.0, 255.0)),
        (_texture(shape=(197, 231), lo=0.1, hi=0.9), (0.1, 0.9)),
        ((_chest_like((200, 256)).astype(np.uint16) * 16), (0, 4080)),
    ],
    ids=["uint8", "float32-0-255", "float64-odd-shape", "uint16-12bit"],
)
def test_shape_dtype_and_value_range_are_kept(name, image, expected_range):
    out = shifts.apply(name, image, np.random.default_rng(3))
    assert out.shape == image.shape and out.dtype == image.dtype
    lo, hi = expected_range
    assert out.min() >= lo and out.max() <= hi
    assert not np.array_equal(out, image)


def test_uint8_stays_in_0_255_even_when_the_image_does_not_use_the_whole_range():
    img = np.full((50, 60), 100, np.uint8)
    img[10:20, 10:30] = 120
    assert shifts.value_range_of(img) == (0.0, 255.0)
    out = shifts.apply("invert", img, np.random.default_rng(0))
    assert out.dtype == np.uint8 and np.array_equal(out, 255 - img)


@pytest.mark.parametrize("name", RANDOM_NAMES)
def test_deterministic_given_the_generator_and_different_for_another_seed(name):
    img = _chest_like()
    a = shifts.apply(name, img, np.random.default_rng(11))
    b = shifts.apply(name, img, np.random.default_rng(11))
    c = shifts.apply(name, img, np.random.default_rng(12))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("name", NAMES)
def test_apply_with_mask_gives_the_same_image_as_apply(name):
    img, mask = _chest_like(), _chest_like() < 100
    alone = shifts.apply(name, img, np.random.default_rng(5))
    shifted, moved = shifts.apply_with_mask(name, img, mask, np.random.default_rng(5))
    assert np.array_equal(alone, shifted) and moved.dtype == bool and moved.shape == mask.shape
    if not shifts.get(name).geometric:
        assert np.array_equal(moved, mask)


def test_case_rng_is_fixed_by_seed_case_and_label():
    def draw(*a):
        return shifts.case_rng(*a).random(4)

    assert np.array_equal(draw(1, "CHNCXR_0001_0", "blur"), draw(1, "CHNCXR_0001_0", "blur"))
    assert not np.array_equal(draw(1, "CHNCXR_0001_0", "blur"), draw(1, "CHNCXR_0002_0", "blur"))
    assert not np.array_equal(draw(1, "CHNCXR_0001_0", "blur"), draw(1, "CHNCXR_0001_0", "blur:0.01"))
    assert not np.array_equal(draw(1, "CHNCXR_0001_0", "blur"), draw(2, "CHNCXR_0001_0", "blur"))


def test_unknown_names_and_bad_arguments_are_refused():
    img = _chest_like()
    with pytest.raises(ValueError, match="unknown acquisition shift 'sepia'; known: gamma, blur, noise, border"):
        shifts.apply("sepia", img, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown acquisition shift 'foo'"):
        shifts.parse_specs("blur,foo")
    with pytest.raises(ValueError, match=">= 0"):
        shifts.apply("blur", img, np.random.default_rng(0), strength=-1)
    with pytest.raises(ValueError, match="must be a number"):
        shifts.parse_specs("blur:strong")
    with pytest.raises(ValueError, match="no acquisition shift named"):
        shifts.parse_specs(" , ")
    with pytest.raises(ValueError, match="2-D"):
        shifts.apply("blur", np.zeros((4, 4, 3)), np.random.default_rng(0))
    with pytest.raises(ValueError, match="integer or float"):
        shifts.apply("blur", np.zeros((4, 4), bool), np.random.default_rng(0))
    with pytest.raises(TypeError, match="Generator"):
        shifts.apply("blur", img, 42)


def test_parse_specs_keeps_order_drops_repeats_and_reads_strengths():
    specs = shifts.parse_specs("none, Blur ,blur, crop:0.05,invert")
    assert [s.label for s in specs] == ["none", "blur", "crop:0.05", "invert"]
    assert specs[2].strength == pytest.approx(0.05)
    assert [s.label for s in shifts.parse_specs(["gamma", "noise,film"])] == ["gamma", "noise", "film"]


def test_flat_image_comes_back_unchanged():
    flat = np.full((20, 30), 7.5, np.float32)
    for name in NAMES:
        assert np.array_equal(shifts.apply(name, flat, np.random.default_rng(0)), flat)


def test_zero_strength_is_the_identity_for_the_photometric_shifts():
    img = _texture()
    for name in ("gamma", "blur", "noise", "crop"):
        out = shifts.apply(name, img, np.random.default_rng(0), strength=0.0, value_range=(0.0, 1.0))
        np.testing.assert_allclose(out, img, atol=1e-6, err_msg=name)


# ------------------------------------------------------------------------------ each shift does what it says


def test_invert_is_perfectly_anticorrelated():
    img = _chest_like().astype(np.float32)
    out = shifts.apply("invert", img, np.random.default_rng(0))
    assert np.corrcoef(img.ravel(), out.ravel())[0, 1] == pytest.approx(-1.0, abs=1e-6)
    np.testing.assert_allclose(out, 255.0 - img)


def test_blur_removes_high_frequencies_and_keeps_the_mean():
    img = _texture(shape=(200, 200))
    out = shifts.apply("blur", img, np.random.default_rng(0), value_range=(0.0, 1.0))
    assert _hf_energy(out) < 0.2 * _hf_energy(img)
    assert out.mean() == pytest.approx(img.mean(), abs=0.01)
    # sigma is relative to the image: a stronger blur removes more
    stronger = shifts.apply("blur", img, np.random.default_rng(0), strength=0.02, value_range=(0.0, 1.0))
    assert _hf_energy(stronger) < _hf_energy(out)


def test_noise_is_signal_dependent_and_of_the_requested_size():
    img = np.full((200, 200), 0.2)
    img[:, 100:] = 0.8
    img[0, 0], img[-1, -1] = 0.0, 1.0
    stds_dark, stds_bright = [], []
    for seed in range(5):
        out = shifts.apply("noise", img, np.random.default_rng(seed), value_range=(0.0, 1.0))
        stds_dark.append((out - img)[5:-5, 5:95].std())
        stds_bright.append((out - img)[5:-5, 105:-5].std())
        ratio = stds_bright[-1] / stds_dark[-1]
        assert ratio == pytest.approx(np.sqrt((0.3 + 1.4 * 0.8) / (0.3 + 1.4 * 0.2)), rel=0.1)
    # level at mid-grey is drawn in 0.5-1 x strength (0.04): at 0.2 the std is sqrt(0.58) of it
    assert 0.5 * 0.04 * np.sqrt(0.58) * 0.95 <= min(stds_dark) and max(stds_dark) <= 0.04 * np.sqrt(0.58) * 1.05


def test_border_sides_are_constant_bands_and_nothing_else_changes():
    seen_sides, seen_values = set(), set()
    for seed in range(30):
        img = _texture(shape=(100, 150), seed=seed)
        out = shifts.apply("border", img, np.random.default_rng(seed), value_range=(0.0, 1.0))
        changed = out != img
        assert changed.any()
        values = np.unique(out[changed])
        assert len(values) == 1 and values[0] in (0.0, 1.0)
        seen_values.add(float(values[0]))
        band = np.zeros_like(changed)
        for side, edge, length in (("top", out[0, :], 100), ("bottom", out[-1, :], 100),
                                   ("left", out[:, 0], 150), ("right", out[:, -1], 150)):
            if np.all(edge == values[0]):
                seen_sides.add(side)
                strip = {"top": out, "bottom": out[::-1], "left": out.T, "right": out.T[::-1]}[side]
                width = int(np.argmax(~np.all(strip == values[0], axis=1)))
                assert 1 <= width <= round(0.08 * length)  # default strength: at most 8 % of that side
                view = {"top": band, "bottom": band[::-1], "left": band.T, "right": band.T[::-1]}[side]
                view[:width] = True
        assert np.array_equal(changed, band)  # the changed pixels are exactly the bands
    assert seen_sides == {"top", "bottom", "left", "right"} and seen_values == {0.0, 1.0}


def test_text_changes_only_a_small_area_to_black_or_white():
    img = _texture(shape=(256, 256))
    for seed in range(10):
        out = shifts.apply("text", img, np.random.default_rng(seed), value_range=(0.0, 1.0))
        changed = out != img
        assert 0 < changed.mean() < 0.06
        assert set(np.unique(out[changed])) <= {0.0, 1.0}
        rows = np.flatnonzero(changed.any(axis=1))
        assert rows.size <= 4 * round(1.25 * 0.04 * 256)  # at most 4 strings of at most 1.25 x strength high
    # larger strength, larger text
    small = shifts.apply("text", img, np.random.default_rng(1), strength=0.03, value_range=(0.0, 1.0)) != img
    large = shifts.apply("text", img, np.random.default_rng(1), strength=0.1, value_range=(0.0, 1.0)) != img
    assert large.sum() > 4 * small.sum()


def test_crop_moves_a_known_square_as_predicted_and_the_mask_with_it():
    h, w = 200, 160
    img = np.full((h, w), 0.2)
    img[80:120, 60:100] = 0.9
    img[0, 0], img[-1, -1] = 0.0, 1.0
    mask = np.zeros((h // 2, w // 2), bool)  # the mask at half the image's resolution
    mask[40:60, 30:50] = True
    for seed in range(6):
        top, bottom, left, right = shifts.crop_fractions(np.random.default_rng(seed), 0.15)
        out, moved = shifts.apply_with_mask("crop", img, mask, np.random.default_rng(seed), value_range=(0.0, 1.0))

        def predicted(a, b, size, t, e):
            return (a - t * size) * size / (size * (1 - t - e)), (b - t * size) * size / (size * (1 - t - e))

        square = out > 0.55
        rows, cols = np.flatnonzero(square.any(axis=1)), np.flatnonzero(square.any(axis=0))
        r0, r1 = predicted(80, 120, h, top, bottom)
        c0, c1 = predicted(60, 100, w, left, right)
        assert abs(rows[0] - r0) <= 1.5 and abs(rows[-1] + 1 - r1) <= 1.5
        assert abs(cols[0] - c0) <= 1.5 and abs(cols[-1] + 1 - c1) <= 1.5
        assert (r1 - r0) > 40  # it grew (a crop zooms in)
        # the mask, at its own size, went where the square went
        up = np.kron(moved, np.ones((2, 2), bool))
        assert (up & square).sum() / (up | square).sum() > 0.9
        assert moved.sum() > mask.sum()


def test_gamma_lut_is_monotone_and_keeps_black_and_white():
    ramp = np.tile(np.linspace(0.0, 1.0, 256), (8, 1))
    moved = []
    for seed in range(25):
        out = shifts.apply("gamma", ramp, np.random.default_rng(seed))
        assert np.all(np.diff(out, axis=1) >= -1e-12)
        assert out[:, 0] == pytest.approx(0.0, abs=1e-9) and out[:, -1] == pytest.approx(1.0, abs=1e-9)
        moved.append(np.abs(out - ramp).max())
    assert min(moved) > 0.02 and np.median(moved) > 0.08  # every draw is a visible change of the grey levels
    x = np.linspace(0, 1, 101)
    for k, c in ((0.5, 0.5), (6.0, 0.4), (12.0, 0.6)):
        y = shifts.s_curve(x, k, c)
        assert np.all(np.diff(y) > 0)
        np.testing.assert_allclose(shifts.s_curve(y, k, c, inverse=True), x, atol=1e-6)


def test_film_flattens_the_whites_adds_a_frame_and_keeps_the_range():
    img = _chest_like((160, 128))
    for seed in range(5):
        out = shifts.apply("film", img, np.random.default_rng(seed))
        edges = [out[0, :], out[-1, :], out[:, 0], out[:, -1]]
        assert any(np.all(e == e[0]) and e[0] in (0, 255) for e in edges)  # a scanner frame
        inside = out[20:-20, 20:-20].astype(float)
        assert inside.min() > 0  # base + fog: nothing inside is fully black
        assert np.corrcoef(inside.ravel(), img[20:-20, 20:-20].ravel().astype(float))[0, 1] > 0.8


# ------------------------------------------------------------------------------ cxrnode evaluate --shift


def test_evaluate_help_names_every_shift():
    from models.commands import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    action = next(a for a in parser._subparsers._group_actions[0].choices["evaluate"]._actions
                  if "--shift" in a.option_strings)
    for name in NAMES:
        assert name in action.help


def test_evaluate_unknown_shift_is_a_one_line_error(fixture_dir):
    from models.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--data", str(fixture_dir), "--device", "cpu", "--shift", "blur,sepia"])
    text = str(exc.value.code)
    assert text.startswith("cxrnode: error: unknown acquisition shift 'sepia'; known: gamma") and "\n" not in text


def test_evaluate_shift_invert_blur_on_the_fixture(fixture_dir, tmp_path, capsys):
    from models.__main__ import main
    from models.evaluation import evaluate, format_table

    per_case = tmp_path / "per-case.csv"
    assert main(["evaluate", "--data", str(fixture_dir), "--split", "val", "--device", "cpu", "--json",
                 "--shift", "invert,blur", "--per-case", str(per_case), "--overlays", str(tmp_path / "pictures")]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["shifts"] == ["none", "invert", "blur"] and list(r["results"]) == r["shifts"]
    assert r["shift_seed"] == 20240611 and r["split"] == "val" and "not data from other sources" in r["note"]
    assert [c["shift"] for c in r["comparison"]] == r["shifts"]
    for label, res in r["results"].items():
        assert res["shift"] == label and res["n_cases"] == 6 and res["n_masks"] == 5
        assert res["threshold"] == r["threshold"] and set(res["per_source"]) == {"montgomery", "shenzhen"}
        row = next(c for c in r["comparison"] if c["shift"] == label)
        assert row["tb_auc"] == res["tb_auc"] and row["ece"] == res["calibration"]["ece"]
        assert row["lung_dice_mean"] == res["lung_dice_mean"]
    assert r["results"]["blur"]["shift_strength"] == shifts.get("blur").default_strength
    for label in r["shifts"]:  # one picture folder per shift, each with its index page
        assert r["results"][label]["overlays_index"] == str(tmp_path / "pictures" / label / "index.html")
        assert len(list((tmp_path / "pictures" / label).glob("*.png"))) == 5
    assert r["results"]["invert"]["shift_mimics"] == shifts.get("invert").mimics
    # "none" is the plain evaluation, figure for figure
    none = r["results"]["none"]
    plain = evaluate(fixture_dir, split="val", device="cpu", progress=False)
    for key, value in plain.items():
        if key not in ("arch", "split", "segmenter", "tb_model"):
            assert none[key] == value, key
    assert 0.93 <= none["lung_dice_mean"] <= 1.0 and none["shift_name"] == "none"
    # the shifts move the figures: inverted polarity wrecks the segmentation; blur moves the scores
    assert r["results"]["invert"]["lung_dice_mean"] < none["lung_dice_mean"] - 0.2
    # ... and the plausibility check, which needs no reference mask, sees it
    assert none["n_implausible"] == 0 and r["results"]["invert"]["n_implausible"] >= 4
    assert [c["n_implausible"] for c in r["comparison"]] == [r["results"][s]["n_implausible"] for s in r["shifts"]]
    rows = list(csv.DictReader(per_case.open()))
    assert next(iter(rows[0])) == "shift" and len(rows) == 18
    scores = {s: [float(x["tb_score"]) for x in rows if x["shift"] == s] for s in r["shifts"]}
    assert scores["blur"] != scores["none"] and scores["invert"] != scores["none"]
    assert [x["case_id"] for x in rows if x["shift"] == "blur"] == [x["case_id"] for x in rows if x["shift"] == "none"]
    table = format_table(r)
    assert "simulated acquisition shifts" in table
    assert [line.split()[0] for line in table.splitlines()[3:6]] == ["none", "invert", "blur"]
