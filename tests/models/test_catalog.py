"""The model registry (models.catalog): seeding, registration, champions, history, locking."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from models import registry
from models.catalog import ModelRegistry, RegistryError
from models.inference import LungAnalyzer
from tests.models.catalog_helpers import (
    clone_version,
    degraded_segmenter,
    later_version,
    shipped_ref,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = {stem: registry.read_meta(stem) for stem in [*registry.SEGMENTER_FILES.values(), registry.TB_FILE]}
UNET, RESUNET, TB = shipped_ref("lung-unet"), shipped_ref("lung-resunet"), shipped_ref("tb-scorer")


@pytest.fixture()
def reg(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "registry")


def run_python(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_seeded_from_the_shipped_weights(reg: ModelRegistry) -> None:
    assert {e.ref for e in reg.entries()} == {UNET, RESUNET, TB}
    assert [e.ref for e in reg.entries("tb")] == [TB]
    assert reg.champion("segmenter").ref == UNET and reg.champion("tb").ref == TB
    for entry in reg.entries():
        meta = SHIPPED[entry.stem]
        assert entry.identity == registry.identity_of(meta)  # what every SEG and SR will name
        assert entry.meta == meta and entry.slot == ("tb" if entry.stem == "tb-scorer" else "segmenter")
        assert {p.name for p in entry.folder.iterdir()} == {
            f"{entry.stem}.pt", f"{entry.stem}.json", "SHA256SUMS", "card.md", "data.json", "metrics.json", "entry.json"}
        assert registry.sha256_file(entry.weights_path) == meta["sha256"]
        assert registry.read_sums(entry.folder) == {f"{entry.stem}.pt": meta["sha256"]}
        assert entry.card() == (REPO / "models" / "cards" / f"{entry.stem}.md").read_text()
        assert entry.data_summary()["n_train"] == meta["training"]["n_train"]
        entry.verify()
    assert reg.entry(UNET).metrics()["val_dice_network_size"] == pytest.approx(
        SHIPPED["lung-unet"]["training"]["best_val_dice_network_size"])
    assert reg.entry(TB).metrics()["val_auc"] == pytest.approx(SHIPPED["tb-scorer"]["training"]["val_auc"])
    seeds = reg.history()
    assert [(r["action"], r["slot"], r["from"], r["to"]) for r in seeds] == [
        ("seed", "segmenter", None, UNET), ("seed", "tb", None, TB)]
    # opening it again (another process, a restart) changes nothing
    token = reg.state_token()
    again = ModelRegistry(reg.root)
    assert again.state_token() == token and again.history() == seeds
    assert not list((reg.root / "entries").glob(".tmp-*"))


def test_worker_architecture_only_chooses_the_first_champion(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "r", initial_arch="resunet")
    assert reg.champion("segmenter").ref == RESUNET
    assert ModelRegistry(tmp_path / "r", initial_arch="unet").champion("segmenter").ref == RESUNET
    with pytest.raises(RegistryError, match="unknown segmentation arch"):
        ModelRegistry(tmp_path / "s", initial_arch="vnet")


def test_entry_lookup(reg: ModelRegistry) -> None:
    assert reg.entry("tb").ref == TB  # a unique prefix
    assert reg.entry("lung-res").ref == RESUNET
    assert reg.entry(f"{SHIPPED['lung-unet']['name']}@{SHIPPED['lung-unet']['version']}").ref == UNET  # name@version
    assert reg.entry(SHIPPED["tb-scorer"]["sha256"][:10]).ref == TB  # sha256 prefix
    with pytest.raises(RegistryError, match="'lung' is ambiguous"):
        reg.entry("lung")
    with pytest.raises(RegistryError, match="no registered model 'vnet@2'"):
        reg.entry("vnet@2")
    with pytest.raises(RegistryError):
        reg.entry("../registry")


def test_two_processes_seeding_at_once_seed_once(tmp_path: Path) -> None:
    root, go = tmp_path / "registry", tmp_path / "go"
    code = f"""
        import time, pathlib
        while not pathlib.Path({str(go)!r}).exists():
            time.sleep(0.005)
        from models.catalog import ModelRegistry
        r = ModelRegistry({str(root)!r})
        print(r.champion("segmenter").ref, len(r.history()))
    """
    procs = [run_python(code) for _ in range(2)]
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o[0].split() for o in outs] == [[UNET, "2"], [UNET, "2"]]
    reg = ModelRegistry(root)
    assert [r["action"] for r in reg.history()] == ["seed", "seed"]
    assert len(reg.entries()) == 3 and not list((root / "entries").glob(".tmp-*"))


def test_register_copies_verifies_and_describes(reg: ModelRegistry, tmp_path: Path) -> None:
    version = later_version("lung-unet")
    src = clone_version("lung-unet", version, tmp_path / "run")
    entry = reg.register(src, "lung-unet", data_summary={"export": "e1", "n_train": 12},
                         metrics={"lung_dice_mean": 0.97, "tb_auc": float("nan")})
    assert (entry.ref, entry.slot, entry.stem) == (f"lung-unet@{version}", "segmenter", "lung-unet")
    assert entry.identity.version == version and entry.identity.sha256 == SHIPPED["lung-unet"]["sha256"]
    assert entry.folder == reg.root / "entries" / f"lung-unet@{version}"
    assert (entry.folder / "lung-unet.json").read_bytes() == (src / "lung-unet.json").read_bytes()
    assert (entry.folder / "lung-unet.pt").read_bytes() == (src / "lung-unet.pt").read_bytes()
    assert entry.data_summary() == {"export": "e1", "n_train": 12}
    assert entry.metrics() == {"lung_dice_mean": 0.97, "tb_auc": None}  # strict JSON
    card = entry.card()
    assert f"cxrnode-lung-unet {version}" in card and entry.identity.sha256 in card and '"export": "e1"' in card
    assert reg.champion("segmenter").ref == UNET  # registered is not in service
    assert reg.next_version("lung-unet") == later_version("lung-unet", 2) and reg.next_version("lung-vnet") == "1.0.0"
    # the same bytes again: the same entry, untouched
    again = reg.register(src, "lung-unet", metrics={"other": 1})
    assert again.registered_at == entry.registered_at and again.metrics() == entry.metrics()
    # loadable through the same checksummed loader as the shipped weights
    analyzer = LungAnalyzer.from_entries(entry, reg.champion("tb"), "cpu")
    assert analyzer.segmenter_identity == entry.identity and analyzer.refs == (f"lung-unet@{version}", TB)
    with pytest.raises(ValueError, match="need a segmenter and a TB scorer"):
        LungAnalyzer.from_entries(reg.champion("tb"), entry, "cpu")


def test_tampered_weights_are_refused(reg: ModelRegistry, tmp_path: Path) -> None:
    version = later_version("tb-scorer")  # not the shipped one: a clone that is not registered yet
    src = clone_version("tb-scorer", version, tmp_path / "run")
    with (src / "tb-scorer.pt").open("r+b") as fh:
        fh.seek(5000)
        byte = fh.read(1)
        fh.seek(5000)
        fh.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(RegistryError, match="refused: checksum mismatch"):
        reg.register(src, "tb-scorer")
    assert f"tb-scorer@{version}" not in {e.ref for e in reg.entries()}
    assert not (reg.root / "entries" / f"tb-scorer@{version}").exists()
    assert not list((reg.root / "entries").glob(".tmp-*"))


def test_unlisted_and_unloadable_weights_are_refused(reg: ModelRegistry, tmp_path: Path) -> None:
    version = later_version("lung-unet")  # not the shipped one: nothing registered under it yet
    src = clone_version("lung-unet", version, tmp_path / "run")
    (src / "SHA256SUMS").unlink()
    with pytest.raises(RegistryError, match="not listed"):
        reg.register(src, "lung-unet")
    src = clone_version("lung-unet", version, tmp_path / "run2")
    meta = json.loads((src / "lung-unet.json").read_text())
    meta["arch"] = "resunet"  # the checksum still matches, the network does not
    (src / "lung-unet.json").write_text(json.dumps(meta))
    with pytest.raises(RegistryError, match="does not load into the network its sidecar describes"):
        reg.register(src, "lung-unet")
    src = clone_version("lung-unet", "2.0.0 final", tmp_path / "run3")
    with pytest.raises(RegistryError, match="version '2.0.0 final'"):
        reg.register(src, "lung-unet")


def test_same_ref_with_other_bytes_is_refused(reg: ModelRegistry, tmp_path: Path) -> None:
    degraded_segmenter(tmp_path / "run", version=SHIPPED["lung-unet"]["version"])  # the shipped ref, other weights
    with pytest.raises(RegistryError, match=re.escape(f"{UNET} is already registered with other weights")):
        reg.register(tmp_path / "run", "lung-unet")
    assert registry.sha256_file(reg.entry(UNET).weights_path) == SHIPPED["lung-unet"]["sha256"]


def test_promote_rollback_and_history(reg: ModelRegistry, tmp_path: Path) -> None:
    b = reg.register(clone_version("lung-unet", later_version("lung-unet"), tmp_path / "b"), "lung-unet").ref
    c = reg.register(clone_version("lung-unet", later_version("lung-unet", 2), tmp_path / "c"), "lung-unet").ref
    tokens = [reg.state_token()]
    record = reg.promote(b, by="alice", why="retrained on site data")
    tokens.append(reg.state_token())
    assert {k: record[k] for k in ("action", "slot", "from", "to", "by", "why", "forced", "gate")} == {
        "action": "promote", "slot": "segmenter", "from": UNET, "to": b, "by": "alice",
        "why": "retrained on site data", "forced": False, "gate": None}
    assert record["when"].endswith("+00:00")
    assert reg.champion("segmenter").ref == b and reg.champion("tb").ref == TB
    with pytest.raises(RegistryError, match="already the segmenter in service"):
        reg.promote(b, by="alice", why="again")
    with pytest.raises(RegistryError, match="say why"):
        reg.promote(c, by="alice", why="  ")
    reg.promote(c, by="bob", why="newer")
    tokens.append(reg.state_token())
    assert reg.rollback("segmenter", by="carol", why="worse on ward 7")["to"] == b
    tokens.append(reg.state_token())
    assert reg.rollback("segmenter", by="carol", why="still worse")["to"] == UNET
    tokens.append(reg.state_token())
    assert len(set(tokens)) == len(tokens)  # every change of champion changes the token
    with pytest.raises(RegistryError, match="no previous segmenter champion"):
        reg.rollback("segmenter", by="carol", why="nothing left")
    with pytest.raises(RegistryError, match="no previous tb champion"):
        reg.rollback("tb", by="carol", why="never promoted")
    with pytest.raises(RegistryError, match="unknown slot"):
        reg.rollback("vit", by="carol", why="x")
    assert [(r["action"], r["from"], r["to"], r["by"]) for r in reg.history()[2:]] == [
        ("promote", UNET, b, "alice"), ("promote", b, c, "bob"), ("rollback", c, b, "carol"),
        ("rollback", b, UNET, "carol")]
    assert reg.champion("segmenter").ref == UNET and reg.state_token() == tokens[-1]


def test_promote_records_and_honours_the_gate_report(reg: ModelRegistry, tmp_path: Path) -> None:
    b = reg.register(clone_version("tb-scorer", later_version("tb-scorer"), tmp_path / "b"), "tb-scorer").ref
    failed = {"challenger": {"ref": b}, "against": {"ref": TB}, "passed": False, "failed": ["TB AUC"],
              "metrics": [{"metric": "tb_auc", "drop": 0.1, "margin": 0.02, "verdict": "fail"}]}
    with pytest.raises(RegistryError, match=re.escape(f"refused: tb-scorer@{later_version('tb-scorer')} fails TB AUC "
                                                      f"against {TB}")):
        reg.promote(b, by="dan", why="try", gate=failed)
    assert reg.champion("tb").ref == TB and len(reg.history()) == 2
    with pytest.raises(RegistryError, match="compare again"):
        reg.promote(b, by="dan", why="stale", gate={**failed, "passed": True, "against": {"ref": "tb-scorer@0.9"}})
    record = reg.promote(b, by="dan", why="known label noise", force=True, gate=failed)
    assert record["forced"] is True and record["gate"] == failed
    assert reg.history()[-1] == record


def test_promote_refuses_an_entry_whose_weights_changed(reg: ModelRegistry, tmp_path: Path) -> None:
    entry = reg.register(clone_version("lung-resunet", later_version("lung-resunet"), tmp_path / "b"), "lung-resunet")
    entry.weights_path.chmod(0o600)
    with entry.weights_path.open("r+b") as fh:
        fh.seek(2000)
        fh.write(b"\0\0\0\0")
    with pytest.raises(RegistryError, match="checksum mismatch"):
        reg.promote(entry.ref, by="eve", why="x")
    assert reg.champion("segmenter").ref == UNET


def test_concurrent_promotions_from_two_processes_lose_nothing(reg: ModelRegistry, tmp_path: Path) -> None:
    """Each process promotes alternately between two versions of its own slot, 25 times, at once.
    Without the lock, read-modify-write of state.json would drop records (and champions)."""
    challenger = f"tb-scorer@{later_version('tb-scorer')}"
    reg.register(clone_version("tb-scorer", later_version("tb-scorer"), tmp_path / "tb"), "tb-scorer")
    go, rounds = tmp_path / "go", 25
    code = """
        import pathlib, sys, time
        while not pathlib.Path({go!r}).exists():
            time.sleep(0.005)
        from models.catalog import ModelRegistry
        r = ModelRegistry({root!r})
        refs = {refs!r}
        for i in range({rounds}):
            r.promote(refs[(i + 1) % 2], by={who!r}, why=f"round {{i}}")
    """
    procs = [run_python(code.format(go=str(go), root=str(reg.root), refs=refs, rounds=rounds, who=who))
             for who, refs in (("seg-process", [UNET, RESUNET]), ("tb-process", [TB, challenger]))]
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    history = reg.history()
    assert len(history) == 2 + 2 * rounds
    for who, slot in (("seg-process", "segmenter"), ("tb-process", "tb")):
        mine = [r for r in history if r["by"] == who]
        assert [r["why"] for r in mine] == [f"round {i}" for i in range(rounds)]
        assert {r["slot"] for r in mine} == {slot}
        assert all(a["to"] == b["from"] for a, b in itertools.pairwise(mine))  # each saw the other's last write
    assert reg.champion("segmenter").ref == RESUNET and reg.champion("tb").ref == challenger
    state = json.loads((reg.root / "state.json").read_text())
    assert len(state["previous"]["segmenter"]) == rounds and len(state["previous"]["tb"]) == rounds
