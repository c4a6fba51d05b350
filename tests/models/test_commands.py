"""The train/evaluate subcommands: smoke training runs, evaluation on the fixture, bad input."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from models.__main__ import main


def test_train_segmentation_and_tb_smoke_then_evaluate(fixture_dir, tmp_path, capsys):
    weights = tmp_path / "weights"
    for arch in ("unet", "resunet"):
        out = tmp_path / arch
        assert main(["train", "segmentation", "--data", str(fixture_dir), "--arch", arch, "--epochs", "1",
                     "--size", "64", "--batch-size", "4", "--device", "cpu", "--out", str(out)]) == 0
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in log] == [1] and log[0]["loss"] > 0
        # resume continues from the checkpoint: one more epoch, not a restart
        assert main(["train", "segmentation", "--data", str(fixture_dir), "--arch", arch, "--epochs", "2",
                     "--size", "64", "--batch-size", "4", "--device", "cpu", "--out", str(out), "--resume"]) == 0
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in log] == [1, 2]
        meta = json.loads((out / f"lung-{arch}.json").read_text())
        assert meta["input_size"] == 64 and meta["arch"] == arch and "--epochs 2" in meta["training"]["command"]
    tb_out = tmp_path / "tb"
    assert main(["train", "tb", "--data", str(fixture_dir), "--epochs", "1", "--size", "48", "--batch-size", "3",
                 "--device", "cpu", "--out", str(tb_out), "--segmenter-dir", str(tmp_path / "unet")]) == 0
    meta = json.loads((tb_out / "tb-scorer.json").read_text())
    assert meta["input_size"] == 48 and 0 <= meta["threshold"] <= 1
    # a weights folder made of the smoke outputs works with evaluate (same loader as the node)
    weights.mkdir()
    for src in (tmp_path / "unet", tb_out):
        for f in src.glob("*.pt"):
            shutil.copy(f, weights)
        for f in src.glob("*.json"):
            if f.name != "train_log.jsonl":
                shutil.copy(f, weights)
    (weights / "SHA256SUMS").write_text((tmp_path / "unet" / "SHA256SUMS").read_text() + (tb_out / "SHA256SUMS").read_text())
    capsys.readouterr()
    assert main(["evaluate", "--data", str(fixture_dir), "--weights", str(weights), "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_cases"] == 6 and 0 <= result["lung_dice_mean"] <= 1


@pytest.mark.parametrize("arch", ["unet", "resunet"])
def test_evaluate_shipped_models_on_fixture(fixture_dir, capsys, arch):
    assert main(["evaluate", "--data", str(fixture_dir), "--split", "val", "--arch", arch, "--device", "cpu", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("lung_dice_mean", "lung_jaccard_mean", "lung_hd95_mean", "tb_auc", "tb_auc_ci95", "sensitivity",
                "specificity", "threshold", "who_target_met", "per_source", "n_cases"):
        assert key in r
    assert r["n_cases"] == 6 and r["n_masks"] == 5 and r["n_labelled"] == 6
    assert 0.93 <= r["lung_dice_mean"] <= 1.0
    assert 0.87 <= r["lung_jaccard_mean"] <= 1.0
    assert 0 <= r["lung_hd95_mean"] < 15  # pixels at the fixture's 256 px
    assert set(r["per_source"]) == {"montgomery", "shenzhen"}
    assert r["per_source"]["montgomery"]["lung_dice_mean"] > 0.95
    assert 0.5 <= r["tb_auc"] <= 1.0  # 3 TB vs 3 normal: only a sanity band
    assert r["threshold"] == pytest.approx(json.loads(open("models/weights/tb-scorer.json").read())["threshold"])


def test_evaluate_table(fixture_dir, capsys):
    assert main(["evaluate", "--data", str(fixture_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "montgomery" in out and "Dice" in out and "WHO target" in out


def _copy_fixture(fixture_dir, tmp_path, edit):
    d = tmp_path / "data"
    shutil.copytree(fixture_dir, d)
    rows = list(csv.DictReader((d / "index.csv").open()))
    fields, rows = edit(list(rows[0]), rows)
    with (d / "index.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return d


def test_split_column_optional(fixture_dir, tmp_path, capsys):
    d = _copy_fixture(fixture_dir, tmp_path, lambda f, r: ([c for c in f if c != "split"], r))
    assert main(["evaluate", "--data", str(d), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_cases"] == 6


@pytest.mark.parametrize(
    "argv_tail, edit, message",
    [
        (["--data", "/no/such/folder"], None, "data folder not found"),
        ([], "no_index", "no index.csv"),
        ([], "bad_columns", "missing column(s) tb_label"),
        ([], "bad_label", "tb_label must be 0, 1 or empty"),
        (["--split", "test"], None, "no cases in split 'test'"),
    ],
)
def test_bad_input_is_one_line_error(fixture_dir, tmp_path, argv_tail, edit, message):
    data_dir = fixture_dir
    if edit == "no_index":
        data_dir = tmp_path
    elif edit == "bad_columns":
        data_dir = _copy_fixture(fixture_dir, tmp_path, lambda f, r: ([c for c in f if c != "tb_label"], r))
    elif edit == "bad_label":
        data_dir = _copy_fixture(fixture_dir, tmp_path, lambda f, r: (f, [dict(x, tb_label="yes") for x in r]))
    argv = ["--data", str(data_dir)] + [a for a in argv_tail if a != "--data"]
    if argv_tail[:1] == ["--data"]:
        argv = argv_tail
    for cmd in (["evaluate"], ["train", "segmentation"], ["train", "tb"]):
        if "--split" in argv and cmd != ["evaluate"]:
            continue
        with pytest.raises(SystemExit) as exc:
            main(cmd + argv)
        text = str(exc.value.code)
        assert text.startswith("cxrnode: error: ") and message in text and "\n" not in text


def test_register_does_not_import_torch():
    import subprocess
    import sys

    code = ("import argparse, sys; from models.commands import register; p = argparse.ArgumentParser(); "
            "register(p.add_subparsers()); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_evaluate_overlays_pictures_and_index_worst_first(fixture_dir, tmp_path, capsys):
    import re
    import subprocess

    import numpy as np
    from PIL import Image

    out = tmp_path / "overlays"
    assert main(["evaluate", "--data", str(fixture_dir), "--device", "cpu", "--json", "--overlays", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    index = out / "index.html"
    assert result["overlays_index"] == str(index)
    pictures = sorted(out.glob("*.png"))
    assert len(pictures) == result["n_masks"] == 5  # every case with a reference mask, none without
    page = index.read_text()
    dices = [float(d) for d in re.findall(r"<td>(\d\.\d{4})</td>", page)]
    assert len(dices) == 5 and dices == sorted(dices)
    assert min(dices) == pytest.approx(result["lung_dice_min"], abs=1e-4)
    picture = np.asarray(Image.open(pictures[0]).convert("RGB")).astype(int)
    third = picture.shape[1] // 3
    assert picture.shape[1] == 3 * third  # prediction | reference | difference
    red, green, blue = (picture[..., i] for i in range(3))
    green_fill = (green - np.maximum(red, blue)) > 25
    yellow_fill = (red > blue + 40) & (green > blue + 40)
    assert green_fill[:, :third].sum() > 1000 and green_fill[:, third:].sum() < green_fill[:, :third].sum() / 20
    assert yellow_fill[:, third:2 * third].sum() > 1000
    # The page as a person sees it: headless Chromium renders the table with its pictures.
    shot = tmp_path / "index.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1200,900",
                    f"--screenshot={shot}", index.as_uri()], check=True, capture_output=True, timeout=120)
    rendered = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    rendered_green = (rendered[..., 1] - np.maximum(rendered[..., 0], rendered[..., 2])) > 25
    assert rendered_green.sum() > 500, "the overlay pictures did not render in the page"
    print(f"overlays index: {index}, screenshot: {shot}")


def test_evaluate_per_case_csv_worst_cases_and_calibration(fixture_dir, tmp_path, capsys):
    out = tmp_path / "cases" / "per-case.csv"
    assert main(["evaluate", "--data", str(fixture_dir), "--device", "cpu", "--json", "--per-case", str(out)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["per_case_csv"] == str(out)
    rows = list(csv.DictReader(out.open()))
    assert [row["case_id"] for row in rows] == [row["case_id"] for row in csv.DictReader((fixture_dir / "index.csv").open())]
    assert list(rows[0]) == ["case_id", "source", "tb_label", "tb_score", "tb_call", "plausibility", "dice", "jaccard",
                             "hd95"]
    no_mask = next(row for row in rows if row["case_id"] == "CHNCXR_0065_0")
    assert no_mask["dice"] == no_mask["jaccard"] == no_mask["hd95"] == ""
    for row in rows:
        assert int(row["tb_call"]) == (float(row["tb_score"]) >= r["threshold"])
    # the worst cases are the lowest Dice of the CSV, lowest first
    dices = sorted((float(row["dice"]), row["case_id"]) for row in rows if row["dice"])
    assert [c["case_id"] for c in r["worst_cases"]] == [case for _, case in dices][:5]
    assert r["worst_cases"][0]["dice"] == pytest.approx(dices[0][0], abs=1e-6)
    # plausibility: every case (with a mask or not), the least plausible first, the count below the cut
    scores_p = sorted((float(row["plausibility"]), row["case_id"]) for row in rows)
    assert [c["case_id"] for c in r["least_plausible"]] == [case for _, case in scores_p][:5]
    assert r["plausibility_min"] == pytest.approx(scores_p[0][0], abs=1e-3)
    assert r["n_implausible"] == sum(p < 0.5 for p, _ in scores_p) == 0  # the fixture's lungs are all found
    assert r["plausibility_min"] >= 0.9
    # calibration: every labelled case in one bin, and the error recomputed from the CSV by hand
    cal = r["calibration"]
    assert sum(b["n"] for b in cal["bins"]) == r["n_labelled"] == 6 and len(cal["bins"]) == 10
    scores = np.array([float(row["tb_score"]) for row in rows])
    labels = np.array([int(row["tb_label"]) for row in rows])
    ece = 0.0
    for b in range(10):
        inside = (scores >= b / 10) & ((scores < (b + 1) / 10) | ((b == 9) & (scores <= 1.0)))
        if inside.any():
            ece += inside.mean() * abs(scores[inside].mean() - labels[inside].mean())
    assert cal["ece"] == pytest.approx(ece, abs=1e-4)
    assert set(r["per_source"]["shenzhen"]["calibration"]) == {"ece", "brier", "bins"}


def test_evaluate_table_names_the_worst_cases_and_the_calibration(fixture_dir, capsys):
    assert main(["evaluate", "--data", str(fixture_dir), "--device", "cpu", "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "TB score calibration: expected calibration error" in out and "lowest lung Dice: " in out
