"""The node's DICOM identity: [node] settings, per-installation defaults, and every result carrying them."""

from __future__ import annotations

import errno
import io
import stat
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from models.identity import ModelIdentity
from models.inference import LungAnalysis
from node import installation
from node.errors import SettingsError
from node.imaging import display_pixels
from node.results import build_report, build_segmentation, reread
from node.results.device import DEFAULT_DEVICE, NodeDevice, device_for
from node.results.sc import build_secondary_capture
from node.results.uids import UID_PREFIX, result_uids
from node.settings import AcceptanceSettings, Destination, load_settings
from node.worker.pipeline import Pipeline
from node.worker.selection import rejection_reason
from tests.dicom_factory import make_dx
from tests.unit.test_results import ALGORITHMS, ellipse_masks, find_items
from tests.validation import dciodvfy_errors

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config" / "cxrnode.toml"
CONFIGURED = {
    "CXRNODE_NODE_INSTITUTION_NAME": "St. Elsewhere General Hospital",
    "CXRNODE_NODE_INSTITUTION_DEPARTMENT_NAME": "Radiology, chest",
    "CXRNODE_NODE_STATION_NAME": "CXR-AI-WARD-7",
    "CXRNODE_NODE_DEVICE_SERIAL_NUMBER": "SN-2024-0042",
    "CXRNODE_NODE_UID_ROOT": "1.2.826.0.1.3680043.10.543",
}
ROOT = "1.2.826.0.1.3680043.10.543."
SOURCE_UID = "1.2.826.0.1.3680043.8.498.77"

# Device Observer context items of the SR (TID 1004), DCM codes.
OBSERVER_UID, OBSERVER_NAME, OBSERVER_MANUFACTURER, OBSERVER_MODEL, OBSERVER_SERIAL = (
    "121012", "121013", "121014", "121015", "121016")


def settings_for(data_dir: Path, **env: str):
    return load_settings(CONFIG, env={"CXRNODE_NODE_DATA_DIR": str(data_dir), **env})


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def source() -> Dataset:
    ds = make_dx(np.tile(np.linspace(0, 255, 256), (256, 1)), size=None, sop_instance_uid=SOURCE_UID)
    ds.InstitutionName = "The modality's hospital"  # the source's equipment, not the node's
    ds.StationName = "MODALITY01"
    return ds


def encode_all(source: Dataset, device: NodeDevice) -> dict[str, Dataset]:
    """SEG, SR and SC of ``source`` from the real encoders, read back from the bytes the node archives."""
    left, right = ellipse_masks(source.Rows, source.Columns)
    seg = build_segmentation(source, left, right, ALGORITHMS.segmenter, device=device)
    sr = build_report(source, seg, tb_score=0.3, threshold=0.5, lung_masks={"left": left, "right": right},
                      areas_mm2=None, area_omission_reason="no spacing", algorithms=ALGORITHMS, device=device)
    sc = build_secondary_capture(source, display_pixels(source), left, right, patient_left_on_image_right=True,
                                 tb_score=0.3, threshold=0.5, algorithms=ALGORITHMS, device=device)
    return {kind: pydicom.dcmread(io.BytesIO(reread(obj))) for kind, obj in (("seg", seg), ("sr", sr), ("sc", sc))}


def observer(sr: Dataset) -> dict[str, str]:
    """The SR's Device Observer context: concept code → value."""
    values = {}
    for code in (OBSERVER_UID, OBSERVER_NAME, OBSERVER_MANUFACTURER, OBSERVER_MODEL, OBSERVER_SERIAL):
        (item,) = find_items(sr, code)
        values[code] = str(item.UID if item.ValueType == "UIDREF" else item.TextValue)
    return values


class TestInstallation:
    def test_created_once_private_and_stable_across_loads(self, tmp_path: Path) -> None:
        first = installation.load_or_create(tmp_path / "var")
        path = tmp_path / "var" / installation.FILE_NAME
        text = path.read_text()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        again = installation.load_or_create(tmp_path / "var")
        assert again == first and path.read_text() == text  # read, not rewritten
        assert [p.name for p in path.parent.iterdir()] == [installation.FILE_NAME]  # no temporary file left
        settings = settings_for(tmp_path / "var")
        one, two = device_for(settings), device_for(settings)
        assert one == two and one.device_uid == two.device_uid
        assert one.installation_id == first.installation_id
        assert one.device_serial_number == first.installation_id[:12].upper() != "0"
        assert one.station_name == first.station_name

    def test_two_data_folders_are_two_installations(self, tmp_path: Path) -> None:
        a, b = (device_for(settings_for(tmp_path / name)) for name in ("a", "b"))
        assert a.installation_id != b.installation_id
        assert a.device_serial_number != b.device_serial_number
        assert a.device_uid != b.device_uid

    def test_a_second_creator_keeps_the_first_identity(self, tmp_path: Path) -> None:
        """Two processes starting at once: the one that links second uses the first one's file."""
        first = installation.load_or_create(tmp_path)
        installation._create(tmp_path / installation.FILE_NAME)  # the loser of the race
        assert installation.load_or_create(tmp_path) == first
        assert [p.name for p in tmp_path.iterdir()] == [installation.FILE_NAME]

    def test_station_name_defaults_to_the_host_name_as_an_sh(self, tmp_path: Path, monkeypatch) -> None:
        monkeypatch.setattr(installation.socket, "gethostname",
                            lambda: "radiology-workstation-0001.hospital.example.org")
        device = device_for(settings_for(tmp_path))
        assert device.station_name == "radiology-workst"  # the first label, 16 characters
        monkeypatch.setattr(installation.socket, "gethostname", lambda: "renamed-later")
        assert device_for(settings_for(tmp_path)).station_name == "radiology-workst"  # stable

    def test_read_only_data_folder_is_a_clear_error(self, tmp_path: Path, monkeypatch) -> None:
        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(installation.tempfile, "mkstemp", read_only)
        with pytest.raises(SettingsError, match=r"node\.data_dir: cannot create .*installation\.toml "
                                                r"\(Read-only file system\).*writable on the first start"):
            device_for(settings_for(tmp_path))

    def test_damaged_file_is_an_error_and_is_not_replaced(self, tmp_path: Path) -> None:
        path = tmp_path / installation.FILE_NAME
        path.write_text('installation_id = "not-hex"\nhost_name = "x"\n')
        with pytest.raises(SettingsError, match=r"node\.data_dir: .*installation\.toml is damaged"):
            device_for(settings_for(tmp_path))
        assert path.read_text() == 'installation_id = "not-hex"\nhost_name = "x"\n'

    def test_configured_values_win_over_the_defaults(self, tmp_path: Path) -> None:
        device = device_for(settings_for(tmp_path, **CONFIGURED))
        assert (device.institution_name, device.institutional_department_name, device.station_name,
                device.device_serial_number, device.uid_root) == (
            "St. Elsewhere General Hospital", "Radiology, chest", "CXR-AI-WARD-7", "SN-2024-0042", ROOT)
        assert (device.manufacturer, device.manufacturer_model_name) == ("cxrnode", "cxrnode")
        assert device.device_uid.startswith(ROOT) and device.device_uid.is_valid
        assert device.installation_id == installation.load_or_create(tmp_path).installation_id


class TestResultsCarryTheIdentity:
    def test_configured_identity_in_seg_sr_and_sc_and_valid(self, tmp_path: Path, source: Dataset) -> None:
        device = device_for(settings_for(tmp_path, **CONFIGURED))
        results = encode_all(source, device)
        for kind, ds in results.items():
            assert ds.Manufacturer == ds.ManufacturerModelName == "cxrnode", kind
            assert ds.InstitutionName == "St. Elsewhere General Hospital", kind
            assert ds.InstitutionalDepartmentName == "Radiology, chest", kind
            assert ds.StationName == "CXR-AI-WARD-7", kind
            assert ds.DeviceSerialNumber == "SN-2024-0042", kind
            assert ds.SoftwareVersions == DEFAULT_DEVICE.software_versions, kind
            assert ds.SOPInstanceUID.startswith(ROOT) and ds.SeriesInstanceUID.startswith(ROOT), kind
            assert dciodvfy_errors(ds) == [], kind
        assert observer(results["sr"]) == {
            OBSERVER_UID: device.device_uid, OBSERVER_NAME: "CXR-AI-WARD-7", OBSERVER_MANUFACTURER: "cxrnode",
            OBSERVER_MODEL: "cxrnode", OBSERVER_SERIAL: "SN-2024-0042"}
        tracking = [item.TrackingUID for item in results["seg"].SegmentSequence]
        assert all(uid.startswith(ROOT) for uid in tracking)

    def test_default_identity_in_seg_sr_and_sc_and_valid(self, tmp_path: Path, source: Dataset) -> None:
        device = device_for(settings_for(tmp_path))
        own = installation.load_or_create(tmp_path)
        for kind, ds in encode_all(source, device).items():
            # The source's Institution and Station are the modality's, not copied into the node's results.
            assert "InstitutionName" not in ds and "InstitutionalDepartmentName" not in ds, kind
            assert ds.StationName == own.station_name, kind
            assert ds.DeviceSerialNumber == own.serial_number, kind
            assert ds.SOPInstanceUID.startswith(UID_PREFIX), kind
            assert dciodvfy_errors(ds) == [], kind
            if kind == "sr":
                assert observer(ds)[OBSERVER_UID] == device.device_uid
                assert observer(ds)[OBSERVER_SERIAL] == own.serial_number

    def test_sr_device_observer_uid_is_per_installation_and_stable(self, tmp_path: Path,
                                                                   source: Dataset) -> None:
        def observer_uid(data_dir: Path) -> str:
            return observer(encode_all(source, device_for(settings_for(data_dir)))["sr"])[OBSERVER_UID]

        first = observer_uid(tmp_path / "one")
        assert observer_uid(tmp_path / "one") == first  # a restart: the same folder, read again
        assert observer_uid(tmp_path / "two") != first
        assert first != DEFAULT_DEVICE.device_uid

    def test_result_uids_stay_deterministic(self, tmp_path: Path, source: Dataset) -> None:
        """Source + algorithm decide a result's UIDs; the root only prefixes them; no root: as before."""
        left, right = ellipse_masks(source.Rows, source.Columns)

        def seg_uid(**env: str) -> str:
            device = device_for(settings_for(tmp_path / str(len(list(tmp_path.iterdir()))), **env))
            return build_segmentation(source, left, right, ALGORITHMS.segmenter, device=device).SOPInstanceUID

        legacy = result_uids(SOURCE_UID, "seg", [ALGORITHMS.segmenter.uid_key]).sop_instance_uid
        assert seg_uid() == seg_uid() == legacy  # other installations, same object: no duplicates in the PACS
        assert seg_uid(CXRNODE_NODE_STATION_NAME="OTHER") == legacy
        rooted = seg_uid(CXRNODE_NODE_UID_ROOT=ROOT)
        assert rooted == seg_uid(CXRNODE_NODE_UID_ROOT=ROOT.rstrip(".")) != legacy
        assert rooted.startswith(ROOT) and len(rooted) <= 64 and pydicom.uid.UID(rooted).is_valid
        assert rooted == result_uids(SOURCE_UID, "seg", [ALGORITHMS.segmenter.uid_key], root=ROOT).sop_instance_uid

    def test_longest_root_still_gives_valid_uids(self, tmp_path: Path, source: Dataset) -> None:
        root = "1.2.826.0.1.3680043.10.543.123456789012."  # 40 characters, the limit
        assert len(root) == 40
        results = encode_all(source, device_for(settings_for(tmp_path, CXRNODE_NODE_UID_ROOT=root)))
        for ds in results.values():
            for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID):
                assert uid.startswith(root) and len(uid) == 64 and uid.is_valid

    def test_loop_safety_recognises_results_with_a_custom_identity(self, tmp_path: Path,
                                                                   source: Dataset) -> None:
        results = encode_all(source, device_for(settings_for(tmp_path, **CONFIGURED)))
        for kind, ds in results.items():
            reason = rejection_reason(ds, AcceptanceSettings())
            assert reason is not None and "made by cxrnode" in reason, kind


class StandInAnalyzer:
    """Two ellipses and a fixed score in place of the networks; the pipeline around it is real."""

    tb_threshold = 0.5
    identity = ModelIdentity("identity-stand-in", "0", "0" * 64)

    def analyze(self, pixels: np.ndarray) -> LungAnalysis:
        patient_left, patient_right = ellipse_masks(*pixels.shape)
        return LungAnalysis(lung_mask=patient_left | patient_right, image_left=patient_right,
                            image_right=patient_left, tb_score=0.3, segmenter=self.identity, tb_model=self.identity)


def test_the_pipeline_writes_the_configured_identity(tmp_path: Path, source: Dataset) -> None:
    import dataclasses

    dest = Destination(ae_title="PACS", host="127.0.0.1", port=104, outputs=("seg", "sr", "sc"))
    settings = dataclasses.replace(settings_for(tmp_path / "var", **CONFIGURED), destinations=(dest,))
    path = tmp_path / "source.dcm"
    source.save_as(path, enforce_file_format=True)
    pipeline = Pipeline(settings, StandInAnalyzer())  # type: ignore[arg-type]
    assert pipeline.device == device_for(settings)
    outcome = pipeline.run(path)
    assert sorted(r.kind for r in outcome.results) == ["sc", "seg", "sr"]
    for result in outcome.results:
        ds = pydicom.dcmread(io.BytesIO(result.data))
        assert (ds.StationName, ds.DeviceSerialNumber, ds.InstitutionName) == (
            "CXR-AI-WARD-7", "SN-2024-0042", "St. Elsewhere General Hospital"), result.kind
        assert result.sop_instance_uid.startswith(ROOT)
        if result.kind == "sr":
            assert observer(ds)[OBSERVER_UID] == pipeline.device.device_uid


@pytest.mark.parametrize(("text", "key", "words"), [
    ('[node]\nstation_name = "STATION-NAME-17CH"\n', "node.station_name", "longer than 16"),
    ('[node]\ninstitution_name = "' + "x" * 65 + '"\n', "node.institution_name", "longer than 64"),
    ('[node]\ninstitution_department_name = "' + "x" * 65 + '"\n', "node.institution_department_name",
     "longer than 64"),
    ('[node]\ndevice_serial_number = "A\\\\B"\n', "node.device_serial_number", "backslash"),
    ('[node]\nstation_name = "Gäste"\n', "node.station_name", "printable ASCII"),
    ('[node]\nuid_root = "1.02.3."\n', "node.uid_root", "leading zeros"),
    ('[node]\nuid_root = "1.2.abc"\n', "node.uid_root", "not a DICOM UID root"),
    ('[node]\nuid_root = "1..2."\n', "node.uid_root", "not a DICOM UID root"),
    ('[node]\nuid_root = "3.1."\n', "node.uid_root", "the first 0, 1 or 2"),
    ('[node]\nuid_root = "1.2.826.0.1.3680043.10.543.1234567890123"\n', "node.uid_root", "at most 40"),
    ("[node]\nstation_name = 7\n", "node.station_name", "expected a string"),
])
def test_invalid_identity_settings_name_the_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    with pytest.raises(SettingsError, match=key.replace(".", r"\.")) as caught:
        load_settings(write(tmp_path, text), env={})
    assert words in str(caught.value)


def test_invalid_identity_from_the_environment_names_the_key() -> None:
    with pytest.raises(SettingsError, match=r"node\.station_name"):
        load_settings(None, env={"CXRNODE_NODE_STATION_NAME": "X" * 17})
    with pytest.raises(SettingsError, match=r"node\.uid_root"):
        load_settings(None, env={"CXRNODE_NODE_UID_ROOT": "1.2.3.04"})


def test_uid_root_is_completed_by_its_dot_and_values_are_trimmed() -> None:
    node = load_settings(None, env={"CXRNODE_NODE_UID_ROOT": "1.2.3", "CXRNODE_NODE_STATION_NAME": " CXR1 "}).node
    assert node.uid_root == "1.2.3." and node.station_name == "CXR1"
    assert load_settings(None, env={}).node.uid_root == ""


def test_node_device_refuses_values_outside_their_vr() -> None:
    with pytest.raises(ValueError, match="station_name"):
        NodeDevice(station_name="S" * 17)
    with pytest.raises(ValueError, match="uid_root"):
        NodeDevice(uid_root="1.2.3")  # the settings complete it; a device takes it complete
    with pytest.raises(ValueError, match="device_serial_number"):
        NodeDevice(device_serial_number="")
