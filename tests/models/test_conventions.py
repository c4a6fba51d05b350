"""The two lung-mask conventions (models/conventions.py) and convention-aware segmenter training
(``cxrnode train segmentation --ignore-disputed``, ``--select last``): synthetic masks for the rule,
the real fixture cases and the shipped weights for the training run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models import conventions, registry
from models.__main__ import main
from models.training import common, segmentation


def _two_lungs(size: int = 100) -> np.ndarray:
    ref = np.zeros((size, size), bool)
    ref[20:80, 10:40] = True  # image-left lung (patient's right)
    ref[20:80, 60:90] = True  # image-right lung, beside the heart
    return ref


def test_disputed_region_is_the_missed_heart_side_grown_and_kept_to_that_half():
    ref = _two_lungs()
    pred = ref.copy()
    pred[60:80, 60:75] = False  # retrocardiac lung the NLM convention leaves out
    pred[20:40, 10:20] = False  # a miss on the other side is not a convention dispute
    bare = conventions.disputed_region(pred, ref, grow=0)
    assert bare.sum() == 20 * 15 and bare[60:80, 60:75].all()
    grown = conventions.disputed_region(pred, ref, grow=2)
    assert grown[bare].all() and grown.sum() > bare.sum()
    assert not grown[:, :50].any()  # never on the image-left half
    assert not grown[:55].any()  # grown by 2 px only
    assert not conventions.disputed_region(ref, ref).any()  # nothing missed, nothing disputed
    with pytest.raises(ValueError, match="grow"):
        conventions.disputed_region(pred, ref, grow=-1)
    with pytest.raises(ValueError, match="same shape"):
        conventions.disputed_region(pred[:50], ref)


def test_cutoff_comes_from_the_defining_source_only():
    shares = [0.01, 0.02, 0.03, 0.5, 0.6]
    sources = ["montgomery", "montgomery", "montgomery", "shenzhen", "shenzhen"]
    cut = conventions.cutoff(shares, sources)
    assert cut == pytest.approx(2 * np.percentile([0.01, 0.02, 0.03], 95))
    assert conventions.label(0.5, cut) == conventions.INCLUDES and conventions.label(0.02, cut) == conventions.NLM
    with pytest.raises(ValueError, match="Montgomery training masks"):
        conventions.cutoff([0.5], ["shenzhen"])
    with pytest.raises(ValueError, match="differ in length"):
        conventions.cutoff([0.5], [])


def test_weighted_loss_ignores_pixels_of_weight_zero_and_equals_the_plain_loss_with_weight_one():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 16, 16, generator=g)
    target = (torch.rand(2, 1, 16, 16, generator=g) > 0.5).float()
    ones = torch.ones_like(target)
    assert torch.allclose(segmentation.seg_loss(logits, target, ones), segmentation.seg_loss(logits, target))
    weight = ones.clone()
    weight[:, :, 8:, 8:] = 0
    changed = logits.clone()
    changed[:, :, 8:, 8:] = -changed[:, :, 8:, 8:] * 5  # any prediction there
    assert torch.allclose(segmentation.seg_loss(logits, target, weight), segmentation.seg_loss(changed, target, weight))
    assert not torch.allclose(segmentation.seg_loss(logits, target), segmentation.seg_loss(changed, target))


class _Yardstick(torch.nn.Module):
    """A stand-in for the initial weights in one unit test: it predicts each case's reference mask
    with the retrocardiac corner of the image-right lung left out (the real network is used in the
    training test below)."""

    def __init__(self, masks: np.ndarray) -> None:
        super().__init__()
        pred = masks.copy()
        pred[:, 60:80, 60:75] = 0
        self.logits = torch.from_numpy(np.where(pred >= 0.5, 10.0, -10.0).astype(np.float32))[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(x)]


def test_disputed_maps_label_the_masks_drawn_the_other_way():
    ref = _two_lungs().astype(np.float32)
    nlm = ref.copy()
    nlm[60:80, 60:75] = 0  # an NLM mask: nothing behind the heart
    masks = np.stack([nlm, nlm * 1, ref, nlm])
    arrays = common.CaseArrays(["m1", "m2", "s-incl", "s-nlm"], ["montgomery", "montgomery", "shenzhen", "shenzhen"],
                               np.zeros_like(masks), masks, np.ones(4, bool), np.zeros(4, np.int64), [None] * 4)
    ignore, summary = segmentation.disputed_maps(_Yardstick(masks), arrays, torch.device("cpu"))
    assert summary["case_ids"] == ["s-incl"] and summary["by_source"] == {"shenzhen": 1}
    assert summary["masks"] == 4 and summary["masks_includes_retrocardiac"] == 1
    assert ignore[2][60:80, 60:75].all() and not ignore[[0, 1, 3]].any()
    assert not ignore[2][:, :50].any()
    with pytest.raises(ValueError, match="--ignore-disputed: no Montgomery"):
        segmentation.disputed_maps(_Yardstick(masks), common.subset(arrays, np.array([0, 0, 1, 1], bool)),
                                   torch.device("cpu"))


def test_training_with_ignore_disputed_and_select_last(fixture_dir: Path, tmp_path: Path, capsys):
    """The shipped UNet as the yardstick on the real fixture cases: the sidecar names the masks it
    left out, and ``--select last`` exports the last epoch whatever its val Dice."""
    out = tmp_path / "conv"
    assert main(["train", "segmentation", "--data", str(fixture_dir), "--init", "shipped", "--arch", "unet",
                 "--ignore-disputed", "--select", "last", "--epochs", "2", "--size", "128", "--batch-size", "4",
                 "--device", "cpu", "--out", str(out), "--version", "9.1.0"]) == 0
    line = capsys.readouterr().out
    assert "last epoch's val Dice" in line and "disputed region carried no loss" in line
    meta = json.loads((out / "lung-unet.json").read_text())
    t = meta["training"]
    conv = t["conventions"]
    assert conv["masks"] == 5 and 0 < conv["masks_includes_retrocardiac"] < 5
    assert all(c.startswith("CHNCXR") for c in conv["case_ids"])  # Montgomery defines the convention
    assert t["selection"].startswith("the last epoch") and t["best_epoch"] == 2
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert t["best_val_dice_network_size"] == log[-1]["val_dice"]
    assert "--ignore-disputed" in t["command"] and "--select last" in t["command"]
    state = common.load_checkpoint(out / "checkpoint.pt")
    exported = registry.load(registry.SEGMENTER_FILES["unet"], "cpu", out).net
    for key, value in exported.state_dict().items():  # the exported weights are the last epoch's
        assert torch.allclose(value.float(), state["model"][key].float(), rtol=1e-2, atol=1e-3), key


def test_ignore_disputed_needs_initial_weights(fixture_dir: Path, tmp_path: Path):
    with pytest.raises(SystemExit, match="--ignore-disputed needs --init"):
        main(["train", "segmentation", "--data", str(fixture_dir), "--ignore-disputed", "--epochs", "1",
              "--size", "64", "--device", "cpu", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="needs --init"):  # the library refuses too
        segmentation.train(segmentation.SegConfig(data=str(fixture_dir), ignore_disputed=True, epochs=1, size=64,
                                                  device="cpu", out=str(tmp_path / "y")))
    with pytest.raises(ValueError, match="select must be one of"):
        segmentation.train(segmentation.SegConfig(data=str(fixture_dir), select="best", epochs=1, size=64,
                                                  device="cpu", out=str(tmp_path / "z")))
    assert not any(tmp_path.iterdir())  # refused before anything is written
