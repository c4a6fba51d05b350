"""Shipped weights: checksums, sidecars, corruption rejected, loaded once."""

from __future__ import annotations

import shutil

import pytest

from models import registry

STEMS = [*registry.SEGMENTER_FILES.values(), registry.TB_FILE]


@pytest.mark.parametrize("stem", STEMS)
def test_shipped_weights_match_sha256sums(stem):
    sums = registry.read_sums(registry.WEIGHTS_DIR)
    meta = registry.read_meta(stem)
    path = registry.WEIGHTS_DIR / meta["weights_file"]
    assert registry.sha256_file(path) == sums[path.name] == meta["sha256"]
    assert meta["input_size"] > 0 and 0 < meta["threshold"] < 1
    assert registry.verify(stem)["name"] == meta["name"]


def test_every_listed_file_exists_and_total_size_small():
    sums = registry.read_sums(registry.WEIGHTS_DIR)
    assert set(sums) == {registry.read_meta(s)["weights_file"] for s in STEMS}
    total = sum((registry.WEIGHTS_DIR / f).stat().st_size for f in sums)
    assert total <= 30 * 1024 * 1024


def test_corrupted_copy_is_rejected(tmp_path):
    for f in registry.WEIGHTS_DIR.iterdir():
        shutil.copy(f, tmp_path / f.name)
    with (tmp_path / "lung-unet.pt").open("r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(registry.WeightsError, match="checksum mismatch"):
        registry.load("lung-unet", "cpu", tmp_path)
    registry.verify("tb-scorer", tmp_path)  # the untouched file still verifies


def test_missing_weights_and_unlisted_file(tmp_path):
    with pytest.raises(registry.WeightsError, match="not found"):
        registry.verify("lung-unet", tmp_path)
    for f in ("lung-unet.pt", "lung-unet.json"):
        shutil.copy(registry.WEIGHTS_DIR / f, tmp_path / f)
    with pytest.raises(registry.WeightsError, match="not listed"):
        registry.verify("lung-unet", tmp_path)


def test_loaded_once():
    a = registry.load("lung-unet", "cpu")
    b = registry.load("lung-unet", "cpu")
    assert a is b and not a.net.training
    assert a.identity.name == "cxrnode-lung-unet" and len(a.identity.sha256) == 64
