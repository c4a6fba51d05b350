"""The TB lungs-shift experiment (models/experiments/tb_lungs_shift.py) on the real fixture cases:
a challenger that is the cross-fit's own member gives the same figures, and bad arguments are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from models import registry
from models.__main__ import main as cxrnode
from models.experiments import tb_lungs_shift

SMOKE = ["--size", "48", "--batch-size", "3", "--device", "cpu", "--epochs", "1"]


@pytest.fixture(scope="module")
def cross_fit(fixture_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tbshift") / "cf"
    assert cxrnode(["train", "tb", "--data", str(fixture_dir), *SMOKE, "--folds", "2", "--out", str(out)]) == 0
    registry.clear_cache()
    return out


def test_the_cross_fits_own_member_as_challenger_gives_the_same_figures(fixture_dir, cross_fit, capsys):
    lungs = ["--lungs", f"unet={registry.WEIGHTS_DIR}", "--lungs", f"resunet={registry.WEIGHTS_DIR}"]
    assert tb_lungs_shift.main(["--data", str(fixture_dir), "--cross-fit", str(cross_fit), "--challenger",
                                str(cross_fit / "checkpoint.pt"), "--fold", "1", *lungs]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fold"] == 1 and result["n"] == 3 and result["reference_lungs"] == "unet"
    assert result["lungs"] == {arch: f"cxrnode-lung-{arch} {registry.read_meta(registry.SEGMENTER_FILES[arch])['version']}"
                               for arch in ("unet", "resunet")}
    a, b = result["cross-fit"], result["challenger"]
    # the exported member is the checkpoint's, stored in float16: the figures agree
    assert a["threshold"] == pytest.approx(b["threshold"], abs=1e-3)
    for lungs_name in ("unet", "resunet"):
        for key in ("sensitivity", "specificity"):
            assert a[lungs_name][key] == b[lungs_name][key]
    assert "logit_shift_mean" in a["resunet"] and "logit_shift_mean" not in a["unet"]


def test_refusals(fixture_dir, cross_fit, tmp_path, capsys):
    base = ["--data", str(fixture_dir), "--cross-fit", str(cross_fit), "--challenger", str(cross_fit / "checkpoint.pt")]
    assert tb_lungs_shift.main([*base, "--lungs", f"unet={registry.WEIGHTS_DIR}"]) == 2
    assert "at least two --lungs" in capsys.readouterr().err
    assert tb_lungs_shift.main([*base, "--fold", "2", "--lungs", f"unet={registry.WEIGHTS_DIR}",
                                "--lungs", f"resunet={registry.WEIGHTS_DIR}"]) == 2
    assert "folds 0..1" in capsys.readouterr().err
    assert tb_lungs_shift.main([*base, "--lungs", "unet", "--lungs", f"resunet={registry.WEIGHTS_DIR}"]) == 2
    assert "expected NAME=DIR" in capsys.readouterr().err
    plain = tmp_path / "plain"
    shutil.copytree(cross_fit, plain)
    meta = json.loads((plain / "tb-scorer.json").read_text())
    meta["training"]["config"]["folds"] = 0
    (plain / "tb-scorer.json").write_text(json.dumps(meta))
    assert tb_lungs_shift.main(["--data", str(fixture_dir), "--cross-fit", str(plain), "--challenger",
                                str(cross_fit / "checkpoint.pt"), "--lungs", f"unet={registry.WEIGHTS_DIR}",
                                "--lungs", f"resunet={registry.WEIGHTS_DIR}"]) == 2
    assert "not a cross-fitted run" in capsys.readouterr().err
