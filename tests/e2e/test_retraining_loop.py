"""The whole retraining loop, for real and through the CLI an ML engineer types: radiographs through a
served node into a DICOMweb PACS, a radiologist's corrected (MANUAL) SEG for two of them stored in
that PACS, ``cxrnode dataset export`` (corrected masks over the node's, nothing identifying in any
file), a one-epoch CPU fine-tune of the champion with the export mixed in and registered,
``cxrnode models compare`` and ``promote`` (a deliberately degraded segmenter refused by the gate),
the next radiograph's SEG naming the promoted version, and ``rollback`` restoring the previous one.

Orthanc (Debian ``orthanc`` with ``orthanc-dicomweb``) is the PACS, the node runs the real networks on
the CPU and keeps its model registry in its data folder (``<data_dir>/models``, the default).

The fine-tuned segmenter is promoted through the gate, not around it (no ``--force``): one epoch on
two base cases and four exported ones at lr 2e-4 barely moves the weights, and on the four-case
reference set it measured lung Dice +0.0012 (95 % CI +0.0004..+0.0020) with the TB metrics
unchanged, well inside the margins, so the test requires "gate: passed" and a history record with
``forced: false``. (``promote --force`` and its record are covered by tests/unit/test_models_cli.py
and tests/models/test_catalog.py.) README "Retraining walk-through" is the prose version of this test.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from models import registry
from node.dataset.export import to_export_grid
from tests.deid_scan import assert_no_identifiers, identifiers
from tests.dicom_factory import make_dx, new_instance
from tests.e2e.test_dataset_export import corrected_seg, node_lungs, upload
from tests.models.catalog_helpers import (
    degraded_segmenter,
    shipped_ref,
    shipped_version,
    small_reference_set,
)
from tests.servers import (
    REPO,
    NodeProcess,
    Orthanc,
    c_store,
    orthanc_and_node,
    wait_until,
)
from tests.unit.test_results import find_items

pytestmark = pytest.mark.e2e

FIXTURE = REPO / "tests" / "models" / "fixtures"
RESULT_TIMEOUT_S = 240
SHIPPED_SHA = registry.read_meta("lung-unet")["sha256"]
UNET, UNET_VERSION, TB_VERSION = shipped_ref("lung-unet"), shipped_version("lung-unet"), shipped_version("tb-scorer")
#: (fixture image, patient): the four radiographs that go in first, each a patient of its own; the
#: first two get a radiologist-corrected SEG.
PATIENTS = [("MCUCXR_0017_0", "MRN-90311", "Wisniewska^Jadwiga^Teodora", "19510214", "ACC7730011"),
            ("CHNCXR_0005_0", "MRN-90322", "Dabrowski^Przemyslaw^Kazimierz", "19620930", "ACC7730022"),
            ("CHNCXR_0333_1", "MRN-90333", "Zielinska^Bozena^Felicja", "19740105", "ACC7730033"),
            ("MCUCXR_0182_1", "MRN-90344", "Szymanski^Wojciech^Leopold", "19800722", "ACC7730044")]
#: The fine-tune's base data: the fixture with a train/val split (2 masked train cases, 3 masked val).
BASE_SPLIT = {"MCUCXR_0017_0": "train", "CHNCXR_0327_1": "train", "CHNCXR_0065_0": "train",
              "MCUCXR_0182_1": "val", "CHNCXR_0005_0": "val", "CHNCXR_0333_1": "val"}


def radiograph(case: str, patient_id: str, name: str, birth: str, accession: str) -> Dataset:
    ds = new_instance(make_dx(FIXTURE / "images" / f"{case}.png", size=(1024, 1024)), patient_id=patient_id)
    ds.PatientName, ds.PatientBirthDate, ds.AccessionNumber = name, birth, accession
    ds.InstitutionName = "Infirmary of Saint Hyacinth"
    ds.ReferringPhysicianName = "Oyelaran^Babatunde"
    ds.PatientSex, ds.PatientAge = "F", "061Y"
    return ds


def cli(node: NodeProcess, *args: str, timeout_s: float = 400) -> subprocess.CompletedProcess[str]:
    """``cxrnode ARGS --config <node's config>`` as NodeProcess.cli, with room for training."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXRNODE_")}
    return subprocess.run([sys.executable, "-m", "node", *args, "--config", str(node.config_file)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout_s, check=False)


def results_in_pacs(orthanc: Orthanc, study_uid: str) -> tuple[bytes, pydicom.Dataset]:
    (seg_series,), (sr_series,) = orthanc.wait_for_result_series(study_uid, RESULT_TIMEOUT_S)
    (seg,), (sr,) = orthanc.instance_files(seg_series), orthanc.instance_files(sr_series)
    return seg, pydicom.dcmread(io.BytesIO(sr))


def send(node: NodeProcess, orthanc: Orthanc, folder: Path, ds: Dataset) -> None:
    upload(orthanc, ds, folder)  # the PACS holds the study, as it would
    assert c_store(node.port, [ds]) == [0]


def segmenter_named(orthanc: Orthanc, ds: Dataset) -> tuple[str, str, str]:
    """(AlgorithmVersion, weights sha256, the SR's segmenter versions) of ``ds``'s SEG/SR in the PACS."""
    seg_bytes, sr = results_in_pacs(orthanc, ds.StudyInstanceUID)
    seg = hd.seg.segread(io.BytesIO(seg_bytes))
    algorithm = seg.get_segment_description(1).algorithm_identification[0]
    assert algorithm.AlgorithmName == "cxrnode-lung-unet"
    sha = str(algorithm.AlgorithmParameters).removeprefix("weights_sha256=")
    assert f"weights_sha256={sha}" in {i.TextValue for i in find_items(sr, "111002")}
    return str(algorithm.AlgorithmVersion), sha, ",".join(sorted({i.TextValue for i in find_items(sr, "111003")}))


def base_data(out: Path) -> Path:
    """The fixture as a base training set with a train/val split (absolute paths, nothing copied)."""
    out.mkdir(parents=True)
    with (FIXTURE / "index.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["split"] = BASE_SPLIT[r["case_id"]]
        r["image_path"] = str(FIXTURE / r["image_path"])
        r["mask_path"] = str(FIXTURE / r["mask_path"]) if r["mask_path"] else ""
    with (out / "index.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


@pytest.fixture(scope="module")
def pacs_and_node(tmp_path_factory: pytest.TempPathFactory):
    with orthanc_and_node(tmp_path_factory.mktemp("retraining-e2e"), dicomweb=True) as pair:
        yield pair


def test_export_finetune_gate_promote_serve_rollback(pacs_and_node, tmp_path: Path) -> None:
    orthanc, node = pacs_and_node
    started = time.monotonic()
    figures: dict[str, object] = {}

    # 1. radiographs go in; the node's SEG and SR arrive in the PACS, made by the shipped segmenter
    sources = [radiograph(*patient) for patient in PATIENTS]
    for ds in sources:
        send(node, orthanc, tmp_path, ds)
    own = {}
    for ds in sources:
        seg_bytes = results_in_pacs(orthanc, ds.StudyInstanceUID)[0]
        own[ds.SOPInstanceUID] = node_lungs(seg_bytes, ds.SOPInstanceUID)
        assert segmenter_named(orthanc, ds)[:2] == (UNET_VERSION, SHIPPED_SHA)

    def all_done() -> bool:
        jobs = {j["sop_instance_uid"]: j["status"] for j in json.loads(cli(node, "jobs", "list", "--json").stdout)}
        return all(jobs.get(ds.SOPInstanceUID) == "done" for ds in sources)

    wait_until(all_done, RESULT_TIMEOUT_S, what="four jobs done")

    # 2. a radiologist corrects the node's mask of two of them: MANUAL SEGs by another vendor, in the PACS
    corrected = {}
    for ds in sources[:2]:
        seg, union = corrected_seg(ds, *own[ds.SOPInstanceUID])
        upload(orthanc, seg, tmp_path)
        corrected[ds.SOPInstanceUID] = union

    # 3. dataset export: the corrected masks over the node's, pseudo-labels for the rest, nothing identifying
    export_dir = tmp_path / "export"
    exported = cli(node, "dataset", "export", "--pacs-url", f"{orthanc.base_url}/dicom-web", "--out", str(export_dir),
                   "--split-fractions", "100/0/0", "--json")
    assert exported.returncode == 0, exported.stderr
    summary = json.loads(exported.stdout)
    assert (summary["selected"], summary["exported"], summary["patients"]) == (4, 4, 4)
    assert summary["labels"] == {"manual": 2, "pseudo": 2, "none": 0}
    assert summary["left_out_below_quality"] == 0 and summary["splits"]["train"] == 4
    with Path(summary["reid_map"]).open(newline="") as handle:
        sop_of = {row["case_id"]: row["sop_instance_uid"] for row in csv.DictReader(handle)}
    with (export_dir / "index.csv").open(newline="") as handle:
        rows = {sop_of[row["case_id"]]: row for row in csv.DictReader(handle)}
    assert set(rows) == {ds.SOPInstanceUID for ds in sources}
    for ds in sources:
        row = rows[ds.SOPInstanceUID]
        mask = np.asarray(Image.open(export_dir / row["mask_path"]))
        node_mask = to_export_grid(np.logical_or(*own[ds.SOPInstanceUID]), mask=True)
        if ds.SOPInstanceUID in corrected:
            assert row["label_source"] == "manual"
            assert np.array_equal(mask, to_export_grid(corrected[ds.SOPInstanceUID], mask=True))
            assert (mask != node_mask).sum() > 1000  # the radiologist's cut, not the node's mask
        else:
            assert row["label_source"] == "pseudo" and float(row["label_quality"]) >= 0.5
            assert np.array_equal(mask, node_mask)
    values = [v for ds in sources for v in identifiers(ds)]
    n_files = assert_no_identifiers(export_dir, values)  # every path, every byte, PNG pixels decompressed
    assert n_files == 2 + 3 * 4  # index.csv, export.json + image, mask and header per case
    assert not [v for v in values if v.lower() in exported.stdout.lower()]
    figures["export"] = {"exported": summary["exported"], "labels": summary["labels"],
                         "pseudo_quality": summary["pseudo_quality"], "files_scanned": n_files}

    # 4. fine-tune the champion on the base data with the export mixed in; registered, not in service
    trained = cli(node, "train", "segmentation", "--data", str(base_data(tmp_path / "base")), "--extra",
                  str(export_dir), "--init", "champion", "--epochs", "1", "--batch-size", "4", "--device", "cpu",
                  "--out", str(tmp_path / "run"), "--register", "--json")
    assert trained.returncode == 0, trained.stderr[-2000:]
    run = json.loads(trained.stdout)
    tuned = run["registered"]["ref"]
    assert re.fullmatch(rf"lung-unet@{re.escape(UNET_VERSION)}\+ft\.\d{{12}}", tuned), tuned
    assert run["init"]["ref"] == UNET and run["sha256"] != SHIPPED_SHA
    assert Path(run["registered"]["registry"]) == node.data_dir / "models"
    assert run["data"]["extra"]["train"]["by_label_source"] == {"manual": 2, "pseudo": 2}
    base_val = (run["metrics"]["initial_weights_per_source"]["base"]["dice"], run["metrics"]["per_source"]["base"]["dice"])
    figures["fine-tune"] = {"ref": tuned, "seconds": run["seconds"], "base_val_dice_before_after": base_val,
                            "extra_train_by_label_source": run["data"]["extra"]["train"]["by_label_source"]}

    listed = {e["ref"]: e for e in json.loads(cli(node, "models", "list", "--json").stdout)}
    assert not listed[tuned]["in_service"] and listed[UNET]["in_service"]
    shown = json.loads(cli(node, "models", "show", tuned, "--json").stdout)
    assert UNET in shown["card"] and shown["data_summary"]["extra"]["folder"] == str(export_dir.resolve())

    # 5. compare on a fixed reference set (four fixture cases with masks and TB labels of both classes)
    reference = small_reference_set(tmp_path / "reference")
    compared = cli(node, "models", "compare", tuned, "--data", str(reference), "--device", "cpu", "--json")
    assert compared.returncode == 0, compared.stderr[-2000:]
    report = json.loads(compared.stdout)
    assert report["against"]["ref"] == UNET and report["challenger"]["ref"] == tuned
    assert (report["data"]["n_cases"], report["data"]["n_masks"], report["data"]["n_labelled"]) == (4, 4, 4)
    assert [m["metric"] for m in report["metrics"]] == ["lung_dice", "tb_auc", "sensitivity", "specificity"]
    for m in report["metrics"]:
        assert m["challenger"] - m["against"] == pytest.approx(m["difference"])
        lo, hi = m["ci95"]
        assert lo <= hi and m["resamples"] > 0
    figures["compare"] = [{k: m[k] for k in ("label", "against", "challenger", "difference", "ci95", "verdict")}
                          for m in report["metrics"]]

    # 6. the gate refuses a deliberately degraded segmenter: exit 1, naming the metric; nothing changes
    degraded_segmenter(tmp_path / "degraded")
    registered = cli(node, "models", "register", str(tmp_path / "degraded"), "lung-unet")
    assert registered.returncode == 0, registered.stderr
    refused = cli(node, "models", "promote", "lung-unet@1.0.1-degraded", "--data", str(reference), "--device", "cpu",
                  "--why", "e2e: degraded", "--by", "e2e")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"refused: lung-unet@1.0.1-degraded is worse than {UNET}" in refused.stderr
    assert "lung Dice" in refused.stderr.split("beyond the margin on", 1)[1]
    degraded_table = [line for line in refused.stdout.splitlines() if line.startswith(("lung Dice", "TB AUC",
                                                                                      "sensitivity", "specificity"))]
    figures["degraded"] = {"stderr": refused.stderr.strip()[:300], "table": degraded_table}

    # 7. the fine-tuned model passes the same gate and is promoted; the history keeps who, why and the figures
    promoted = cli(node, "models", "promote", tuned, "--data", str(reference), "--device", "cpu",
                   "--why", "e2e: site fine-tune", "--by", "e2e")
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert "gate: passed" in promoted.stdout and "FORCED" not in promoted.stdout
    assert f"segmenter: now {tuned} (was {UNET})" in promoted.stdout
    history = json.loads(cli(node, "models", "history", "--slot", "segmenter", "--json").stdout)
    last = history[-1]
    assert (last["action"], last["from"], last["to"], last["by"], last["why"], last["forced"]) == (
        "promote", UNET, tuned, "e2e", "e2e: site fine-tune", False)
    assert last["gate"]["passed"] is True and last["gate"]["failed"] == [] and "cases" not in last["gate"]
    assert [m["difference"] for m in last["gate"]["metrics"]] == [m["difference"] for m in report["metrics"]]
    assert not [r for r in history if r.get("to") == "lung-unet@1.0.1-degraded"]  # the refusal changed nothing
    figures["promotion"] = {"degraded": "refused (exit 1)", "fine-tuned": "gate passed, promoted",
                            "history": {k: last[k] for k in ("action", "from", "to", "by", "why", "forced")}}

    # 8. the next radiograph is analysed by the promoted model: its SEG and SR name it
    after = radiograph("CHNCXR_0327_1", "MRN-90355", "Kaczmarek^Stanislawa^Ireneusza", "19690311", "ACC7730055")
    send(node, orthanc, tmp_path, after)
    version, sha, sr_versions = segmenter_named(orthanc, after)
    assert (version, sha) == (tuned.split("@")[1], run["sha256"])
    assert version in sr_versions.split(",")
    assert f"models: now {tuned} (was {UNET})".encode() in node.log_bytes()

    # 9. rollback: the previous segmenter is back for the radiograph after that
    rolled = cli(node, "models", "rollback", "segmenter", "--why", "e2e: back to the shipped model", "--by", "e2e")
    assert rolled.returncode == 0, rolled.stderr
    assert f"segmenter: now {UNET} (was {tuned})" in rolled.stdout
    again = radiograph("CHNCXR_0065_0", "MRN-90366", "Pawlowska^Genowefa^Apolonia", "19880428", "ACC7730066")
    send(node, orthanc, tmp_path, again)
    assert segmenter_named(orthanc, again) == (UNET_VERSION, SHIPPED_SHA, ",".join(sorted({UNET_VERSION, TB_VERSION})))
    assert f"models: now {UNET} (was {tuned})".encode() in node.log_bytes()
    jobs = json.loads(cli(node, "jobs", "list", "--json").stdout)
    assert len(jobs) == 6 and {j["status"] for j in jobs} == {"done"}  # no job lost to a switch
    figures["served"] = {"after_promotion": version, "after_rollback": UNET_VERSION}
    figures["seconds"] = round(time.monotonic() - started, 1)

    print("\nretraining loop:")
    for key, value in figures.items():
        print(f"  {key}: {json.dumps(value)}")
    print(f"compare table (fine-tuned vs {UNET}, 4 reference cases):")
    for m in report["metrics"]:
        print(f"  {m['label']:<12} {m['against']:.4f} -> {m['challenger']:.4f}  diff {m['difference']:+.4f}  "
              f"95% CI [{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}]  {m['verdict']}")
    print("per-case (fine-tuned vs shipped): Dice and TB score, TB threshold "
          f"{report['thresholds']['against']:.3f}:")
    for c in report["cases"]:
        print(f"  {c['case_id']:<14} label {c['label']}  Dice {c['dice_against']:.4f} -> {c['dice_challenger']:.4f}  "
              f"TB {c['score_against']:.3f} -> {c['score_challenger']:.3f}")
    print("degraded model's gate table:")
    for line in degraded_table:
        print("  " + line)
