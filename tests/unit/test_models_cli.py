"""``cxrnode models ...``: list, show, register, compare, promote (the gate), rollback, history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models import registry
from models.catalog import ModelRegistry
from node.cli.main import main
from node.settings import load_settings
from tests.models.catalog_helpers import (
    clone_version,
    degraded_segmenter,
    later_version,
    shipped_ref,
    small_reference_set,
)

UNET, RESUNET, TB = shipped_ref("lung-unet"), shipped_ref("lung-resunet"), shipped_ref("tb-scorer")
DEGRADED = "lung-unet@1.0.1-degraded"


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four fixture cases (2 TB, 2 normal, all with masks): the reference set, CPU-fast."""
    return small_reference_set(tmp_path_factory.mktemp("small"))


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    path = tmp_path / "cxrnode.toml"
    path.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n[models]\nbootstrap_samples = 300\n')
    return path


def run(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> str:
    capsys.readouterr()
    assert main([*args, "--config", str(config)]) == 0
    return capsys.readouterr().out


def refused(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> str:
    """The one-line error of a command that must fail (exit status 1); its stdout stays in ``capsys``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([*args, "--config", str(config)])
    assert isinstance(exc.value.code, str) and exc.value.code.startswith("cxrnode: error: ")
    return exc.value.code


def test_settings_name_the_registry_and_the_margins(tmp_path: Path) -> None:
    settings = load_settings(None, env={"CXRNODE_NODE_DATA_DIR": str(tmp_path)})
    assert settings.models_registry_path == tmp_path / "models"
    assert settings.models.margins == {"lung_dice": 0.005, "tb_auc": 0.02, "sensitivity": 0.02,
                                       "specificity": 0.05}
    moved = load_settings(None, env={"CXRNODE_MODELS_REGISTRY": str(tmp_path / "elsewhere"),
                                     "CXRNODE_MODELS_MAX_DICE_DROP": "0.01"})
    assert moved.models_registry_path == tmp_path / "elsewhere" and moved.models.max_dice_drop == 0.01
    from node.errors import SettingsError

    with pytest.raises(SettingsError, match="models.max_auc_drop"):
        load_settings(None, env={"CXRNODE_MODELS_MAX_AUC_DROP": "-0.1"})
    with pytest.raises(SettingsError, match="models.bootstrap_samples"):
        load_settings(None, env={"CXRNODE_MODELS_BOOTSTRAP_SAMPLES": "10"})


def test_list_and_show(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    listed = json.loads(run(capsys, config, "models", "list", "--json"))
    assert {(e["ref"], e["slot"], e["in_service"]) for e in listed} == {
        (UNET, "segmenter", True), (RESUNET, "segmenter", False), (TB, "tb", True)}
    unet = next(e for e in listed if e["ref"] == UNET)
    assert unet["sha256"] == registry.read_meta("lung-unet")["sha256"] and unet["arch"] == "unet"
    assert Path(unet["folder"]).parent == config.parent / "var" / "models" / "entries"
    text = run(capsys, config, "models", "list")
    lines = {line.split()[1] if line.startswith("*") else line.split()[0]: line for line in text.splitlines()[1:4]}
    assert lines[UNET].startswith("*") and lines[TB].startswith("*") and not lines[RESUNET].startswith("*")
    # the sidecars' recorded figures, as ``models list`` prints a metric (4 significant digits)
    unet_dice = registry.read_meta("lung-unet")["training"]["best_val_dice_network_size"]
    tb_meta = registry.read_meta("tb-scorer")
    assert f"val_dice_network_size {unet_dice:.4g}" in lines[UNET]
    assert f"val_auc {tb_meta['training']['val_auc']:.4g}" in lines[TB]
    assert registry.read_meta("tb-scorer")["sha256"][:12] in lines[TB]
    assert json.loads(run(capsys, config, "models", "list", "--slot", "tb", "--json"))[0]["ref"] == TB

    shown = json.loads(run(capsys, config, "models", "show", "tb", "--json"))
    assert shown["ref"] == TB and shown["in_service"] and shown["sidecar"] == registry.read_meta("tb-scorer")
    assert shown["card"].startswith(f"# Model card: {tb_meta['name']} {tb_meta['version']}")
    assert shown["data_summary"]["n_train"] == tb_meta["training"]["n_train"]
    assert [(h["action"], h["to"]) for h in shown["history"]] == [("seed", TB)]
    text = run(capsys, config, "models", "show", RESUNET)
    assert text.startswith(f"{RESUNET}\n") and "(in service)" not in text.splitlines()[0]
    assert f"# Model card: cxrnode-lung-resunet {registry.read_meta('lung-resunet')['version']}" in text
    assert "no registered model 'vit'" in refused(capsys, config, "models", "show", "vit")


def test_degraded_model_is_refused_then_forced_then_rolled_back(capsys: pytest.CaptureFixture[str], config: Path,
                                                                tmp_path: Path, small: Path) -> None:
    degraded_segmenter(tmp_path / "run")
    out = run(capsys, config, "models", "register", str(tmp_path / "run"), "lung-unet", "--json")
    assert json.loads(out)["ref"] == DEGRADED

    message = refused(capsys, config, "models", "promote", DEGRADED, "--data", str(small), "--device", "cpu",
                      "--why", "site retraining", "--by", "alice", "--json")
    assert f"refused: {DEGRADED} is worse than {UNET} beyond the margin on lung Dice" in message
    assert "Nothing changed" in message and "--force" in message
    answer = json.loads(capsys.readouterr().out)
    compared = answer["gate"]
    assert answer["promoted"] is False and compared["against"]["ref"] == UNET
    dice = compared["metrics"][0]
    assert dice["metric"] == "lung_dice" and dice["verdict"] == "fail" and dice["margin"] == 0.005
    assert f"lung Dice {dice['challenger']:.4f} vs {dice['against']:.4f} (drop {dice['drop']:.4f} > margin 0.005)" \
        in message
    assert compared["bootstrap"]["samples"] == 300  # [models] bootstrap_samples
    reg = ModelRegistry(config.parent / "var" / "models")
    assert reg.champion("segmenter").ref == UNET and len(reg.history()) == 2

    assert "--data DIR" in refused(capsys, config, "models", "promote", DEGRADED, "--why", "no data")

    out = run(capsys, config, "models", "promote", DEGRADED, "--data", str(small), "--device", "cpu", "--force",
              "--why", "testing the gate", "--by", "alice")
    assert "gate: FAILED on lung Dice" in out
    assert f"segmenter: now {DEGRADED} (was {UNET}) FORCED" in out
    record = reg.history()[-1]
    assert (record["action"], record["to"], record["from"], record["by"], record["forced"]) == (
        "promote", DEGRADED, UNET, "alice", True)
    assert record["gate"]["passed"] is False and "lung Dice" in record["gate"]["failed"]
    assert "cases" not in record["gate"]  # the history keeps the summary only
    assert reg.champion("segmenter").ref == DEGRADED
    listed = json.loads(run(capsys, config, "models", "list", "--json"))
    assert {e["ref"] for e in listed if e["in_service"]} == {DEGRADED, TB}

    out = json.loads(run(capsys, config, "models", "rollback", "segmenter", "--why", "Dice", "--by", "bob", "--json"))
    assert (out["from"], out["to"], out["by"]) == (DEGRADED, UNET, "bob")
    assert reg.champion("segmenter").ref == UNET
    assert "no previous segmenter champion" in refused(capsys, config, "models", "rollback", "segmenter", "--why", "x")
    history = json.loads(run(capsys, config, "models", "history", "--slot", "segmenter", "--json"))
    assert [(h["action"], h["to"]) for h in history] == [("seed", UNET), ("promote", DEGRADED), ("rollback", UNET)]
    text = run(capsys, config, "models", "show", DEGRADED)
    (line,) = [line for line in text.splitlines() if "promote" in line and "testing the gate" in line]
    assert f"{UNET} -> {DEGRADED}  by alice FORCED gate failed on lung Dice" in line


def test_a_model_that_passes_the_gate_is_promoted(capsys: pytest.CaptureFixture[str], config: Path,
                                                  tmp_path: Path) -> None:
    version = later_version("tb-scorer")  # the shipped weights under a version that is not shipped
    challenger = f"tb-scorer@{version}"
    run(capsys, config, "models", "register", str(clone_version("tb-scorer", version, tmp_path / "tb")), "tb-scorer")
    pair = small_reference_set(tmp_path / "pair", case_ids=("MCUCXR_0017_0", "MCUCXR_0182_1"))  # 1 TB, 1 normal
    text = run(capsys, config, "models", "compare", challenger, "--data", str(pair), "--device", "cpu")
    assert f"challenger {challenger}" in text and f"against    {TB}" in text
    assert "2 cases, 2 with masks, 2 TB-labelled (1 TB)" in text and "gate: passed" in text
    assert "lung Dice" not in text  # a TB scorer does not change the lungs
    for line in text.splitlines()[6:9]:
        assert line.split()[-1] == "pass" and "+0.0000" in line and "[+0.0000, +0.0000]" in line, line
    out = json.loads(run(capsys, config, "models", "promote", challenger, "--data", str(pair),
                         "--split", "val", "--device", "cpu", "--why", "same weights, new version", "--json"))
    assert out["promoted"] and (out["from"], out["to"], out["forced"]) == (TB, challenger, False)
    assert out["gate"]["passed"] and [m["difference"] for m in out["gate"]["metrics"]] == [0.0, 0.0, 0.0]
    assert out["by"]  # $USER or the login name


def test_register_refuses_tampered_weights(capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path) -> None:
    src = clone_version("lung-resunet", later_version("lung-resunet"), tmp_path / "run")
    with (src / "lung-resunet.pt").open("r+b") as fh:
        fh.seek(100)
        fh.write(b"xxxx")
    message = refused(capsys, config, "models", "register", str(src), "lung-resunet")
    assert message.startswith("cxrnode: error: refused: checksum mismatch") and "\n" not in message
