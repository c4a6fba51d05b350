"""``cxrnode train tb --also-lungs-from``: training samples take the lungs of more than one segmenter,
so the TB scorer does not hang on one segmenter's outline; the real fixture cases and shipped weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models import registry
from models.__main__ import main
from models.training import common, mix, tb

SMOKE = ["--size", "48", "--batch-size", "3", "--device", "cpu", "--epochs", "2", "--members", "1"]


def test_training_samples_draw_their_lungs_from_both_segmenters(fixture_dir: Path, tmp_path: Path, monkeypatch):
    seen: list[np.ndarray] = []
    affine = common.random_affine

    def record(x, aug, g):  # the batch as drawn, before augmentation
        seen.extend(x.detach().cpu().numpy())
        return affine(x, aug, g)

    monkeypatch.setattr(tb.common, "random_affine", record)
    out = tmp_path / "tb"
    assert main(["train", "tb", "--data", str(fixture_dir), *SMOKE, "--also-lungs-from", "resunet",
                 "--out", str(out)]) == 0
    cases = mix.read_split(fixture_dir, "train")
    dev = torch.device("cpu")
    lungs = {arch: tb._inputs(cases, registry.load(registry.SEGMENTER_FILES[arch], "cpu"), 256, dev, 48)[0]
             for arch in ("unet", "resunet")}
    assert not np.allclose(lungs["unet"][:, 1], lungs["resunet"][:, 1])  # the two draw other lungs

    def source(x: np.ndarray) -> str:
        hits = [arch for arch, xs in lungs.items() if any(np.array_equal(x, row) for row in xs)]
        assert len(hits) == 1, "every sample is one case's input with one segmenter's lungs"
        return hits[0]

    drawn = [source(x) for x in seen]
    assert set(drawn) == {"unet", "resunet"}
    meta = json.loads((out / "tb-scorer.json").read_text())
    shipped = {arch: f"cxrnode-lung-{arch} {registry.read_meta(registry.SEGMENTER_FILES[arch])['version']}"
               for arch in ("unet", "resunet")}
    assert meta["also_lungs_of"] == [shipped["resunet"]]
    assert meta["segmenter_used_for_training"] == shipped["unet"]
    assert meta["training"]["config"]["also_lungs"] == ["resunet"]
    assert "--also-lungs-from resunet" in meta["training"]["command"]


def test_also_lungs_refuses_the_main_segmenter_repeats_and_unknown_folders(fixture_dir: Path, tmp_path: Path):
    main_seg = registry.load(registry.SEGMENTER_FILES["unet"], "cpu")
    dev = torch.device("cpu")
    with pytest.raises(ValueError, match="already a source of lungs"):
        tb.load_also_lungs(["unet"], main_seg, dev)
    with pytest.raises(ValueError, match="already a source of lungs"):
        tb.load_also_lungs(["resunet", "resunet"], main_seg, dev)
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("lung-resunet.pt", "lung-resunet.json", "SHA256SUMS"):
        shutil.copy(registry.WEIGHTS_DIR / name, copy / name)
    assert [s.identity.name for s in tb.load_also_lungs([str(copy)], main_seg, dev)] == ["cxrnode-lung-resunet"]
    with pytest.raises(ValueError, match="exactly one lung-<arch>"):
        tb.load_also_lungs([str(tmp_path)], main_seg, dev)
    with pytest.raises(SystemExit, match="already a source of lungs"):
        main(["train", "tb", "--data", str(fixture_dir), *SMOKE, "--also-lungs-from", "unet",
              "--out", str(tmp_path / "x")])
