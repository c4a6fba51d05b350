"""``cxrnode train --init/--extra/--register``: fine-tuning, data mixing, registration (CPU, tiny sets)."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models import data, networks, registry, transforms
from models.__main__ import main
from models.training import finetune, mix
from tests.models.catalog_helpers import later_version, shipped_ref, shipped_version

REPO = Path(__file__).resolve().parents[2]
CITATIONS = ("doi:10.1109/TMI.2013.2284099", "doi:10.1109/TMI.2013.2290491", "Quant Imaging Med Surg",
             "doi:10.1109/ELNANO.2018.8477564", "CC BY-NC-SA 4.0")
UNET, TB = shipped_ref("lung-unet"), shipped_ref("tb-scorer")
#: the version a fine-tune of the shipped UNet gets: the shipped one with a ``+ft.<UTC minute>`` part
UNET_FT_VERSION = re.escape(shipped_version("lung-unet")) + r"\+ft\.\d{12}"
COLUMNS = ["case_id", "source", "image_path", "mask_path", "tb_label", "split", "label_source", "label_quality",
           "tb_label_source"]

#: base data: the fixture with a train/val split; 2 masked train cases, 3 masked val cases, TB labels 0/1 on both
BASE_SPLIT = {"MCUCXR_0017_0": "train", "CHNCXR_0327_1": "train", "CHNCXR_0065_0": "train",
              "MCUCXR_0182_1": "val", "CHNCXR_0005_0": "val", "CHNCXR_0333_1": "val"}
#: an export-like extra set: (case, fixture image, mask?, tb_label, split, label_source, label_quality, tb source)
EXTRA_ROWS = [
    ("X1", "CHNCXR_0327_1", True, "1", "train", "manual", "", "csv"),
    ("X2", "MCUCXR_0017_0", True, "", "train", "pseudo", "0.900", ""),  # blank TB label
    ("X3", "CHNCXR_0005_0", True, "0", "train", "pseudo", "0.300", "report"),  # pseudo-label under the floor
    ("X4", "CHNCXR_0065_0", False, "0", "train", "", "", "csv"),  # blank mask
    ("X5", "MCUCXR_0182_1", True, "1", "val", "manual", "", "report"),
    ("X6", "CHNCXR_0333_1", True, "0", "val", "pseudo", "0.800", "csv"),
    ("X7", "CHNCXR_0005_0", True, "", "test", "pseudo", "0.950", ""),  # test split: never used
]


@pytest.fixture()
def base_dir(fixture_dir, tmp_path) -> Path:
    d = tmp_path / "base"
    shutil.copytree(fixture_dir, d)
    rows = list(csv.DictReader((d / "index.csv").open()))
    for r in rows:
        r["split"] = BASE_SPLIT[r["case_id"]]
    with (d / "index.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return d


@pytest.fixture()
def extra_dir(fixture_dir, tmp_path) -> Path:
    """A folder in the layout of ``cxrnode dataset export`` (extra columns, blank mask/TB label)."""
    d = tmp_path / "export"
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    rows = []
    for case, src, has_mask, tb, split, label_source, quality, tb_source in EXTRA_ROWS:
        shutil.copy(fixture_dir / "images" / f"{src}.png", d / "images" / f"{case}.png")
        if has_mask:
            shutil.copy(fixture_dir / "masks" / f"{src}.png", d / "masks" / f"{case}.png")
        rows.append(dict(zip(COLUMNS, [case, "SITE_AE", f"images/{case}.png", f"masks/{case}.png" if has_mask else "",
                                       tb, split, label_source, quality, tb_source])))
    with (d / "index.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return d


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_export_columns_are_read_and_blank_labels_tolerated(extra_dir):
    cases = {c.case_id: c for c in data.read_index(extra_dir)}
    assert cases["X1"].label_source == "manual" and cases["X1"].label_quality is None
    assert cases["X1"].tb_label_source == "csv"
    assert cases["X2"].label_source == "pseudo" and cases["X2"].label_quality == pytest.approx(0.9)
    assert cases["X2"].tb_label is None  # blank TB label
    assert cases["X4"].mask_path is None and cases["X4"].label_source is None  # blank mask
    # a bad quality value is one readable error
    text = (extra_dir / "index.csv").read_text().replace("0.900", "high")
    (extra_dir / "index.csv").write_text(text)
    with pytest.raises(data.DataError, match="label_quality must be a number in 0..1"):
        data.read_index(extra_dir)


def _uncalibrated(net: torch.nn.Module) -> torch.nn.Module:
    """The network under a loaded TB scorer's Platt calibration (the network itself if it has none)."""
    return net.net if isinstance(net, networks.Calibrated) else net


def test_init_shipped_loads_the_shipped_weights_exactly(fixture_dir):
    image = transforms.preprocess(data.load_image(fixture_dir / "images" / "CHNCXR_0005_0.png"), 256)
    x = torch.from_numpy(image)[None, None]
    for kind, stem in (("segmentation", "lung-unet"), ("tb", "tb-scorer")):
        init = finetune.resolve_init("shipped", kind)
        assert (init.origin, init.stem, init.ref) == ("shipped", stem, shipped_ref(stem))
        net = finetune.build_initial(init).eval()
        shipped = registry.load(stem, "cpu").net
        assert net is not shipped  # a fresh copy: training never touches the node's cached network
        inp = x if kind == "segmentation" else torch.from_numpy(np.stack([
            transforms.tb_input(image, np.ones_like(image) * 0.9, init.size)]))
        with torch.no_grad():
            # training starts from the networks; a calibration (fitted for exactly these weights) is not trained
            assert torch.equal(net(inp), _uncalibrated(shipped)(inp))
            assert torch.equal(registry.calibrate(net, init.meta)(inp), shipped(inp))
    # an ensemble's members come apart in order
    tb = finetune.resolve_init("shipped", "tb")
    states = finetune.member_states(tb)
    assert len(states) == tb.members == 5
    shipped = _uncalibrated(registry.load("tb-scorer", "cpu").net)
    for state, member in zip(states, shipped.members):
        assert all(torch.equal(state[k], v.float()) for k, v in member.state_dict().items())


def test_first_training_forward_pass_is_the_shipped_models(base_dir, tmp_path, monkeypatch):
    """Through the training loop: the logits of the very first batch (before any optimiser step) are the
    shipped network's on the same (augmented) input, and the logged epoch-0 Dice is the shipped model's."""
    from models.training import segmentation

    seen = []
    real_loss = segmentation.seg_loss

    def spy(logits, target):
        if not seen:
            seen.append(logits.detach().clone())
        return real_loss(logits, target)

    captured = []
    real_affine = segmentation.common.random_intensity

    def capture(img, cfg, g):
        out = real_affine(img, cfg, g)
        if not captured:
            captured.append(out.detach().clone())
        return out

    monkeypatch.setattr(segmentation, "seg_loss", spy)
    monkeypatch.setattr(segmentation.common, "random_intensity", capture)
    out = tmp_path / "run"
    assert main(["train", "segmentation", "--data", str(base_dir), "--init", "shipped", "--epochs", "1",
                 "--device", "cpu", "--out", str(out)]) == 0
    shipped = registry.load("lung-unet", "cpu").net
    with torch.no_grad():
        expected = shipped(captured[0])
    assert seen[0].shape == expected.shape
    assert torch.allclose(seen[0], expected, atol=1e-5)
    # epoch 0 of the log: the initial weights on the base val split, equal to the shipped model's Dice
    val = common_arrays(base_dir, "val")
    d = segmentation.dice_per_case(shipped, val, torch.device("cpu"))
    log = _log(out)
    assert log[0]["epoch"] == 0 and log[0]["init"] == UNET
    assert log[0]["val_dice"] == pytest.approx(float(np.mean(d)), abs=1e-9)
    meta = json.loads((out / "lung-unet.json").read_text())
    assert meta["input_size"] == 256 and meta["training"]["init"]["sha256"] == registry.read_meta("lung-unet")["sha256"]
    # fine-tune defaults when not given: lr a tenth of scratch; the version names the run
    assert meta["training"]["config"]["lr"] == finetune.FINETUNE_LR["segmentation"]
    assert re.fullmatch(UNET_FT_VERSION, meta["version"])
    assert "--init shipped" in meta["training"]["command"]


def common_arrays(folder: Path, split: str):
    from models.training import common

    return common.load_cases([c for c in mix.read_split(folder, split) if c.mask_path is not None], 256)


@pytest.mark.parametrize("argv, message", [
    (["segmentation", "--init", UNET, "--arch", "resunet"], f"--arch resunet does not match the initial weights {UNET} (unet)"),
    (["segmentation", "--init", "{shipped_unet_json}", "--arch", "resunet"], "--arch resunet does not match"),
    (["tb", "--init", "shipped", "--size", "128"], f"--size 128 does not match the initial weights {TB} (224 px)"),
    (["tb", "--init", "shipped", "--arch", "densenet121"], f"--arch densenet121 does not match the initial weights {TB}"),
    (["tb", "--init", "shipped", "--members", "2"], f"--members 2 does not match the initial weights {TB} (5 members)"),
    (["segmentation", "--init", TB], f"{TB} is a tb model, not a segmentation model"),
    (["segmentation", "--init", "lung-nothing@9"], "no registered model 'lung-nothing@9'"),
    (["segmentation", "--init", "/no/such/weights"], "--init /no/such/weights: no such folder or file"),
])
def test_mismatching_init_is_refused_before_training(base_dir, tmp_path, argv, message):
    argv = [a.replace("{shipped_unet_json}", str(registry.WEIGHTS_DIR / "lung-unet.json")) for a in argv]
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["train", *argv, "--data", str(base_dir), "--registry", str(tmp_path / "reg"), "--device", "cpu",
              "--out", str(out)])
    text = str(exc.value.code)
    assert text.startswith("cxrnode: error: ") and message in text and "\n" not in text
    assert not (out / "checkpoint.pt").exists()


def test_epoch_mix_honours_the_fraction_and_the_seed():
    def order(n_base, n_extra, fraction, seed):
        g = torch.Generator()
        g.manual_seed(seed)
        return mix.epoch_order(n_base, n_extra, fraction, g)

    for n_base, n_extra, fraction in ((400, 40, 0.3), (400, 600, 0.3), (50, 50, 0.5), (30, 5, 0.9)):
        o = order(n_base, n_extra, fraction, 7)
        total = n_base + n_extra
        n_x = int((o >= n_base).sum())
        assert len(o) == total and n_x == round(fraction * total)
        assert mix.epoch_sizes(n_base, n_extra, fraction) == {"base": total - n_x, "extra": n_x}
        for pool, drawn in ((n_base, o[o < n_base]), (n_extra, o[o >= n_base] - n_base)):
            counts = np.bincount(drawn.numpy(), minlength=pool)
            if len(drawn) <= pool:  # subsampled without replacement
                assert counts.max() <= 1
            else:  # a small set is repeated, each case k or k + 1 times
                k = len(drawn) // pool
                assert set(counts.tolist()) <= {k, k + 1}
        assert torch.equal(o, order(n_base, n_extra, fraction, 7))  # reproducible with the seed
        assert not torch.equal(o, order(n_base, n_extra, fraction, 8))
    # over many epochs of one generator the share holds epoch after epoch
    g = torch.Generator()
    g.manual_seed(1)
    assert all(int((mix.epoch_order(100, 10, 0.25, g) >= 100).sum()) == 28 for _ in range(5))
    # edges: no extra cases = the permutation training always drew; fraction 0 and 1
    g1, g2 = torch.Generator(), torch.Generator()
    g1.manual_seed(3)
    g2.manual_seed(3)
    assert torch.equal(mix.epoch_order(20, 0, 0.3, g1), torch.randperm(20, generator=g2))
    assert int((order(20, 5, 0.0, 1) >= 20).sum()) == 0
    assert int((order(20, 5, 1.0, 1) < 20).sum()) == 0


def test_quality_floor_drops_low_pseudo_labels_and_keeps_manual(extra_dir):
    cases = data.read_index(extra_dir)
    kept, dropped = mix.apply_quality_floor(cases, 0.5)
    by_id = {c.case_id: c for c in kept}
    assert dropped == 1 and by_id["X3"].mask_path is None  # pseudo 0.3 < 0.5
    assert by_id["X3"].tb_label == 0  # the row keeps its image and TB label
    assert by_id["X2"].mask_path is not None and by_id["X6"].mask_path is not None  # pseudo >= 0.5
    assert by_id["X1"].mask_path is not None and by_id["X5"].mask_path is not None  # manual
    kept, dropped = mix.apply_quality_floor(cases, 1.0)  # even the strictest floor keeps manual masks
    assert {c.case_id for c in kept if c.mask_path is not None} == {"X1", "X5"} and dropped == 4
    assert mix.apply_quality_floor(cases, 0.0)[1] == 0


def test_finetune_segmenter_with_extra_and_register(base_dir, extra_dir, tmp_path, capsys):
    from models.catalog import ModelRegistry
    from models.inference import LungAnalyzer

    reg_dir, out = tmp_path / "registry", tmp_path / "run"
    assert main(["train", "segmentation", "--data", str(base_dir), "--extra", str(extra_dir), "--extra-fraction", "0.75",
                 "--extra-min-quality", "0.5", "--init", "shipped", "--epochs", "2", "--batch-size", "4",
                 "--device", "cpu", "--out", str(out), "--register", "--registry", str(reg_dir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    ref = summary["registered"]["ref"]
    assert re.fullmatch(rf"lung-unet@{UNET_FT_VERSION}", ref)
    # the proportion over each epoch: N = 2 base + 2 extra masked training cases, 3 of them extra
    log = _log(out)
    assert [r["epoch"] for r in log] == [0, 1, 2]
    assert all(r["drawn"] == {"base": 1, "extra": 3} for r in log[1:])
    reg = ModelRegistry(reg_dir)
    entry = reg.entry(ref)
    entry.verify()  # the checksum holds (sidecar, SHA256SUMS, file)
    assert entry.slot == "segmenter" and entry.identity.sha256 == summary["sha256"] == registry.sha256_file(entry.weights_path)
    assert entry.meta["version"] == entry.identity.version == ref.split("@")[1]
    card = entry.card()
    for needle in (*CITATIONS, UNET, ref, "Research use only", "--init shipped", "--extra-fraction 0.75"):
        assert needle in card, needle
    d = entry.data_summary()
    assert d["base"]["folder"] == str(base_dir.resolve()) and d["extra"]["folder"] == str(extra_dir.resolve())
    assert d["base"]["train"]["used"] == 2 and d["base"]["val"]["used"] == 3
    assert d["base"]["val"]["used_by_source"] == {"montgomery": 1, "shenzhen": 2}
    assert d["extra"]["train"]["by_label_source"] == {"manual": 1, "none": 1, "pseudo": 2}
    assert d["extra"]["train"]["used"] == 2 and d["extra"]["train"]["pseudo_masks_below_quality"] == 1
    assert d["extra"]["val"]["used"] == 2
    assert (d["extra"]["fraction"], d["extra"]["min_quality"], d["seed"]) == (0.75, 0.5, 20240611)
    assert d["init"]["ref"] == UNET and d["init"]["origin"] == "shipped"
    m = entry.metrics()
    assert set(m["per_source"]) == {"base", "extra", "all"}
    assert m["per_source"]["base"]["n"] == 3 and m["per_source"]["extra"]["n"] == 2
    assert set(m["per_source"]["base"]["by_source"]) == {"montgomery", "shenzhen"}
    assert set(m["per_source"]["all"]["by_source"]) == {"montgomery", "shenzhen", "SITE_AE"}
    assert "samples per epoch: 1 base + 3 extra" in card
    assert 0.5 < m["per_source"]["base"]["dice"] <= 1 and 0.5 < m["per_source"]["extra"]["dice"] <= 1
    assert m["initial_weights_per_source"]["base"]["dice"] == pytest.approx(log[0]["val"]["base"]["dice"])
    # selection used the manually drawn masks only: base val (3) + X5 (manual), not X6 (pseudo)
    assert "manual" in m["selection"]
    # the registered model loads through the registry and analyses an image; its identity names the version
    analyzer = LungAnalyzer.from_entries(entry, reg.champion("tb"), device="cpu")
    image = data.load_image(base_dir / "images" / "CHNCXR_0005_0.png")
    result = analyzer.analyze(image)
    truth = data.load_mask(base_dir / "masks" / "CHNCXR_0005_0.png")
    assert result.lung_mask.shape == image.shape and 0 <= result.tb_score <= 1
    assert 2 * (result.lung_mask & truth).sum() / (result.lung_mask.sum() + truth.sum()) > 0.8
    assert analyzer.segmenter_identity.version == entry.identity.version and analyzer.refs == (ref, TB)
    assert reg.champion("segmenter").ref == UNET  # registered, not put in service
    # fine-tune the registered model again (a registry reference): a new version, and the card names its parent
    assert main(["train", "segmentation", "--data", str(base_dir), "--init", ref, "--epochs", "1", "--device", "cpu",
                 "--out", str(tmp_path / "run2"), "--register", "--registry", str(reg_dir)]) == 0
    printed = capsys.readouterr().out
    second = re.search(r"registered (lung-unet@\S+)", printed).group(1)
    assert second != ref and second.split("@")[1].startswith(f"{shipped_version('lung-unet')}+ft.")
    assert ref in reg.entry(second).card() and reg.entry(second).data_summary()["init"]["ref"] == ref


def test_explicit_version_and_duplicates(base_dir, tmp_path):
    reg = finetune.open_registry(tmp_path / "reg")
    shipped, unused = shipped_version("lung-unet"), later_version("lung-unet")
    assert finetune.unique_version(reg, "lung-unet", shipped) == f"{shipped}.2"  # the shipped version is registered
    assert finetune.unique_version(reg, "lung-unet", unused) == unused
    from datetime import UTC, datetime

    when = datetime(2024, 6, 11, 15, 30, tzinfo=UTC)
    assert finetune.finetune_version("1.0.0", when) == "1.0.0+ft.202406111530"
    assert finetune.finetune_version("1.0.0+ft.202401010000.2", when) == "1.0.0+ft.202406111530"
    for argv, message in (
        (["--version", shipped], f"{UNET} is already registered: choose another --version"),
        (["--version", "bad version"], "--version 'bad version': 1-64 letters"),
        (["--extra-fraction", "1.5", "--extra", str(base_dir)], "--extra-fraction must be in 0..1"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["train", "segmentation", "--data", str(base_dir), "--init", "shipped", "--register", "--registry",
                  str(tmp_path / "reg"), "--device", "cpu", "--out", str(tmp_path / "run"), *argv])
        assert message in str(exc.value.code)


def test_finetune_tb_with_extra_registers_via_node_settings(base_dir, extra_dir, tmp_path, capsys, monkeypatch):
    """TB: rows without a TB label are skipped; the registry comes from the node's settings (--config)."""
    from models.catalog import ModelRegistry

    reg_dir = tmp_path / "node-registry"
    config = tmp_path / "cxrnode.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n\n[models]\nregistry = "{reg_dir}"\n')
    monkeypatch.delenv("CXRNODE_CONFIG", raising=False)
    out = tmp_path / "tb"
    assert main(["train", "tb", "--data", str(base_dir), "--extra", str(extra_dir), "--init", "champion",
                 "--epochs", "1", "--device", "cpu", "--out", str(out), "--register", "--config", str(config),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    entry = ModelRegistry(reg_dir).entry(summary["registered"]["ref"])
    entry.verify()
    assert entry.slot == "tb" and entry.meta["members"] == 5 and entry.meta["input_size"] == 224
    assert entry.meta["training"]["command"].count(f"--init {TB}") == 1  # "champion" resolved to its ref
    d = entry.data_summary()
    assert d["base"]["train"]["used"] == 3 and d["base"]["val"]["used"] == 3
    assert d["extra"]["train"]["used"] == 3  # X1, X3, X4; X2 has no TB label
    assert d["extra"]["train"]["by_tb_label_source"] == {"csv": 2, "none": 1, "report": 1}
    assert d["extra"]["val"]["used"] == 2
    m = entry.metrics()
    assert {"val_auc", "val_sensitivity", "val_specificity", "threshold"} <= set(m)
    assert m["threshold"] == entry.meta["threshold"]
    for name, n, n_tb in (("base", 3, 2), ("extra", 2, 1), ("all", 5, 3)):
        block = m["per_source"][name]
        assert (block["n"], block["n_tb"]) == (n, n_tb)
        assert 0 <= block["auc"] <= 1 and 0 <= block["sensitivity"] <= 1 and 0 <= block["specificity"] <= 1
    assert m["per_source"]["all"]["sensitivity"] >= 0.9  # the threshold rule, on all val cases
    log = _log(out)
    assert log[0]["epoch"] == 0 and [r["drawn"] for r in log[1:]] == [{"base": 4, "extra": 2}] * 5
    card = entry.card()
    for needle in (*CITATIONS, TB, "Research use only", "AUC"):
        assert needle in card


def test_cli_finetune_register_subprocess(base_dir, extra_dir, tmp_path):
    """The real command, as an operator types it."""
    reg_dir = tmp_path / "registry"
    proc = subprocess.run(
        [sys.executable, "-m", "node", "train", "segmentation", "--data", str(base_dir), "--extra", str(extra_dir),
         "--init", "shipped", "--epochs", "1", "--register", "--registry", str(reg_dir), "--device", "cpu",
         "--out", str(tmp_path / "run")],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    match = re.search(rf"^registered (lung-unet@{UNET_FT_VERSION}) in ", proc.stdout, re.MULTILINE)
    assert match, proc.stdout
    from models.catalog import ModelRegistry

    entry = ModelRegistry(reg_dir).entry(match.group(1))
    entry.verify()
    assert entry.data_summary()["extra"]["fraction"] == 0.3


def test_a_segmenter_may_be_fine_tuned_at_another_size(fixture_dir, tmp_path):
    """Fully convolutional: the shipped 256 px UNet starts a 128 px run (the multi-scale start of a larger
    or smaller network size); the sidecar, the card and the loaded model take the new size."""
    out = tmp_path / "run"
    assert main(["train", "segmentation", "--data", str(fixture_dir), "--init", "shipped", "--size", "128",
                 "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--out", str(out)]) == 0
    meta = json.loads((out / "lung-unet.json").read_text())
    assert meta["input_size"] == 128 and meta["training"]["config"]["size"] == 128
    assert meta["training"]["init"]["input_size"] == 256 and meta["training"]["init"]["ref"] == UNET
    assert "--size 128" in meta["training"]["command"]
    card = finetune.model_card(meta, finetune.data_summary(meta), finetune.metrics_of(meta), "lung-unet")
    assert "its input size was 256 px" in card
    # the node's path runs it at its own size and maps the lungs back to the image's
    weights = tmp_path / "weights"
    weights.mkdir()
    for f in [*out.glob("lung-unet.*"), *registry.WEIGHTS_DIR.glob("tb-scorer.*")]:
        shutil.copy(f, weights)
    sums = registry.read_sums(registry.WEIGHTS_DIR) | registry.read_sums(out)  # the new lung-unet's line wins
    registry.write_sums(weights, sums)
    registry.clear_cache()
    from models.inference import LungAnalyzer

    analyzer = LungAnalyzer.load("unet", "cpu", weights)
    image = data.load_image(fixture_dir / "images" / "CHNCXR_0005_0.png")
    assert analyzer.seg_size == 128
    assert analyzer.analyze(image).lung_mask.shape == image.shape
    registry.clear_cache()
