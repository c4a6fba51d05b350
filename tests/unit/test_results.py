"""SEG and SR encoders: dciodvfy-valid, round-trip through highdicom, deterministic UIDs."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, JPEG2000Lossless, JPEGLSLossless, RLELossless

from models.identity import ModelIdentity
from node.imaging import pixel_spacing_mm
from node.results import (
    Algorithm,
    ResultAlgorithms,
    UnreadableResult,
    build_report,
    build_segmentation,
    lung_areas_mm2,
    reread,
    result_uids,
    verify,
)
from node.results.seg import DISPLAY_ORIENTATION, NOMINAL_SPACING_COMMENT, segmentation_type_for
from node.results.sr import AREA, COMMENT, OHIF_ARROW, OHIF_FREEHAND, TB_SCORE, TB_SCREENING_RESULT
from node.dicom import SECONDARY_CAPTURE
from tests.dicom_factory import make_cr, make_dx, montgomery_case, nema_chest_cr_path, reference_lung_masks
from tests.validation import dciodvfy_errors

SEGMENTER = ModelIdentity("cxrnode-lung-unet", "0.1.0", "a" * 64)
TB_MODEL = ModelIdentity("cxrnode-tb-densenet", "0.1.0", "b" * 64)
ALGORITHMS = ResultAlgorithms.from_model_identities(SEGMENTER, TB_MODEL)
NO_SPACING = "the header has no usable Imager Pixel Spacing or Pixel Spacing"

MONTGOMERY_IMAGE, MONTGOMERY_MASK = montgomery_case()  # in-repo fixture tests/data
needs_montgomery = pytest.mark.skipif(not MONTGOMERY_IMAGE.exists(), reason="Montgomery fixture absent")


def assert_valid(ds: Dataset) -> None:
    errors = dciodvfy_errors(ds)
    assert errors == [], "dciodvfy errors:\n" + "\n".join(errors)


def round_trip(ds: Dataset, tmp_path: Path, reader=hd.sr.srread):
    path = tmp_path / f"rt-{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return reader(path)


def ellipse_masks(rows: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """Two lung-like ellipses: (patient_left on the image's right, patient_right)."""
    y, x = np.ogrid[:rows, :columns]

    def ellipse(cx: float) -> np.ndarray:
        return ((x - cx) / (0.17 * columns)) ** 2 + ((y - 0.45 * rows) / (0.3 * rows)) ** 2 <= 1

    return ellipse(0.72 * columns), ellipse(0.28 * columns)


def find_items(content: Dataset, code_value: str) -> list[Dataset]:
    found, stack = [], list(content.ContentSequence)
    while stack:
        item = stack.pop()
        stack.extend(item.get("ContentSequence", []))
        if item.ConceptNameCodeSequence[0].CodeValue == code_value:
            found.append(item)
    return found


@pytest.fixture(scope="module")
def dx_case() -> dict:
    """A 2048 x 2048 12-bit DX from a real Montgomery image, with its reference lungs."""
    if not MONTGOMERY_IMAGE.exists():
        pytest.skip("Montgomery fixture absent")
    source = make_dx(MONTGOMERY_IMAGE)
    left, right = reference_lung_masks(MONTGOMERY_MASK, (source.Rows, source.Columns))
    seg = build_segmentation(source, left, right, ALGORITHMS.segmenter)
    areas = lung_areas_mm2(left, right, pixel_spacing_mm(source))
    sr = build_report(
        source, seg, tb_score=0.83, threshold=0.5, lung_masks={"left": left, "right": right}, areas_mm2=areas,
        area_omission_reason=None, algorithms=ALGORITHMS
    )
    return {"source": source, "left": left, "right": right, "seg": seg, "sr": sr, "areas": areas}


@pytest.fixture(scope="module")
def nema_case() -> dict:
    """The NEMA chest CR (JPEG 2000, MONOCHROME1, Pixel Spacing 0.000): no areas."""
    source = pydicom.dcmread(nema_chest_cr_path())
    assert pixel_spacing_mm(source) is None
    left, right = ellipse_masks(source.Rows, source.Columns)
    seg = build_segmentation(source, left, right, ALGORITHMS.segmenter)
    sr = build_report(
        source, seg, tb_score=0.12, threshold=0.5, lung_masks={"left": left, "right": right}, areas_mm2=None,
        area_omission_reason=NO_SPACING, algorithms=ALGORITHMS,
    )
    return {"source": source, "seg": seg, "sr": sr, "left": left, "right": right}


@pytest.fixture(scope="module")
def small_dx() -> Dataset:
    image = np.asarray(np.tile(np.linspace(0, 255, 256), (256, 1)))
    return make_dx(image, size=None, sop_instance_uid="1.2.826.0.1.3680043.8.498.1")


class TestDciodvfy:
    @needs_montgomery
    @pytest.mark.parametrize("kind", ["source", "seg", "sr"])
    def test_dx_case_has_no_errors(self, dx_case: dict, kind: str) -> None:
        assert_valid(dx_case[kind])

    @pytest.mark.parametrize("kind", ["seg", "sr"])
    def test_nema_case_has_no_errors(self, nema_case: dict, kind: str) -> None:
        assert_valid(nema_case[kind])

    def test_empty_lung_mask_gives_valid_objects(self, small_dx: Dataset) -> None:
        left, _ = ellipse_masks(small_dx.Rows, small_dx.Columns)
        empty = np.zeros_like(left)
        seg = build_segmentation(small_dx, left, empty, ALGORITHMS.segmenter)
        areas = lung_areas_mm2(left, empty, pixel_spacing_mm(small_dx))
        assert areas["right"] == 0.0
        sr = build_report(
            small_dx, seg, tb_score=0.5, threshold=0.5, lung_masks={"left": left, "right": empty}, areas_mm2=areas,
            area_omission_reason=None, algorithms=ALGORITHMS,
        )
        assert_valid(seg)
        assert_valid(sr)
        assert seg.NumberOfFrames == 2


    @needs_montgomery
    @pytest.mark.parametrize(
        ("factory", "options"),
        [
            (make_dx, {}),
            (make_dx, {"photometric": "MONOCHROME1", "bits_stored": 16}),
            (make_dx, {"bits_stored": 8, "transfer_syntax": JPEGLSLossless}),
            (make_dx, {"transfer_syntax": JPEG2000Lossless, "view_position": "LL", "patient_orientation": ("P", "F")}),
            (make_cr, {"pixel_spacing": None, "transfer_syntax": RLELossless}),
            (make_cr, {"photometric": "MONOCHROME1", "spacing_attribute": "PixelSpacing"}),
        ],
    )
    def test_factory_objects_have_no_errors(self, factory, options: dict) -> None:
        assert_valid(factory(MONTGOMERY_IMAGE, size=(512, 512), **options))

    def test_the_check_itself_finds_a_known_error(self, small_dx: Dataset) -> None:
        broken = copy.deepcopy(small_dx)
        del broken.PositionerType  # Type 2 in DX Positioning (TOOLCHAIN section 3)
        assert any("PositionerType" in line for line in dciodvfy_errors(broken))


@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")
class TestMinimalSourceHeader:
    """Sources like the NIH Secondary Capture: Type 2 gaps, invalid optional values, odd names."""

    @pytest.fixture
    def minimal_source(self) -> Dataset:
        ds = make_cr(np.tile(np.linspace(0, 255, 128), (128, 1)), size=None, pixel_spacing=None)
        for keyword in ("PatientBirthDate", "StudyDate", "StudyTime", "ReferringPhysicianName", "AccessionNumber"):
            delattr(ds, keyword)
        ds.PatientAge = "81"  # invalid AS (should be 081Y)
        ds.PatientName = "Anonymous0000"  # one component: highdicom warns, quoting it
        return ds

    def test_results_are_valid_and_the_source_is_untouched(self, minimal_source: Dataset, recwarn) -> None:
        before = set(minimal_source.dir())
        left, right = ellipse_masks(minimal_source.Rows, minimal_source.Columns)
        seg = build_segmentation(minimal_source, left, right, ALGORITHMS.segmenter)
        sr = build_report(
            minimal_source, seg, tb_score=0.1, threshold=0.5, lung_masks={"left": left, "right": right},
            areas_mm2=None, area_omission_reason=NO_SPACING, algorithms=ALGORITHMS,
        )
        assert_valid(seg)
        assert_valid(sr)
        assert set(minimal_source.dir()) == before
        assert seg.PatientName == sr.PatientName == "Anonymous0000"
        assert "PatientAge" not in seg and "PatientAge" not in sr
        assert not [w for w in recwarn if "Anonymous0000" in str(w.message)]

    def test_missing_study_instance_uid_is_refused(self, minimal_source: Dataset) -> None:
        del minimal_source.StudyInstanceUID
        left, right = ellipse_masks(minimal_source.Rows, minimal_source.Columns)
        with pytest.raises(ValueError, match="StudyInstanceUID"):
            build_segmentation(minimal_source, left, right, ALGORITHMS.segmenter)


class TestSegmentation:
    @needs_montgomery
    def test_round_trip_keeps_segments_and_masks(self, dx_case: dict, tmp_path: Path) -> None:
        seg = round_trip(dx_case["seg"], tmp_path, hd.seg.segread)
        source = dx_case["source"]
        labels = {d.SegmentNumber: d.SegmentLabel for d in seg.SegmentSequence}
        assert labels == {1: "Left lung", 2: "Right lung"}
        for number, laterality in ((1, codes.SCT.Left), (2, codes.SCT.Right)):
            description = seg.get_segment_description(number)
            assert description.segmented_property_type == codes.SCT.Lung
            assert description.segmented_property_category == codes.SCT.AnatomicalStructure
            modifier = description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
            assert hd.sr.CodedConcept.from_dataset(modifier) == laterality
            assert description.algorithm_identification[0].AlgorithmName == SEGMENTER.name
            assert description.algorithm_identification[0].AlgorithmVersion == SEGMENTER.version
        masks = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1, 2])[0]
        np.testing.assert_array_equal(masks[..., 0], dx_case["left"])
        np.testing.assert_array_equal(masks[..., 1], dx_case["right"])

    @needs_montgomery
    def test_files_into_the_source_study(self, dx_case: dict) -> None:
        seg, source = dx_case["seg"], dx_case["source"]
        for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyDate"):
            assert seg[keyword].value == source[keyword].value
        assert list(seg.PatientOrientation) == list(source.PatientOrientation)
        assert seg.SeriesInstanceUID != source.SeriesInstanceUID
        assert "LUNG SEG" in seg.SeriesDescription and seg.ContentLabel == "LUNG_SEG"

    def test_nema_seg_has_nominal_pixel_measures_instead_of_the_zero_spacing(self, nema_case: dict) -> None:
        seg = nema_case["seg"]
        (measures,) = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
        assert [float(v) for v in measures.PixelSpacing] == [1.0, 1.0]
        assert seg.ImageComments == NOMINAL_SPACING_COMMENT
        assert list(seg.PatientOrientation) == ["L", "F"]

    @pytest.mark.parametrize("case", ["small", "nema"])
    def test_frames_are_the_masks_and_segments_do_not_overlap(self, case: str, small_dx: Dataset,
                                                               nema_case: dict) -> None:
        if case == "small":
            left, right = ellipse_masks(small_dx.Rows, small_dx.Columns)
            seg, overlap, scale = build_segmentation(small_dx, left, right, ALGORITHMS.segmenter), "NO", 1
        else:
            left, right, seg, overlap, scale = nema_case["left"], nema_case["right"], nema_case["seg"], "UNDEFINED", 255
        assert seg.SegmentsOverlap == overlap  # FRACTIONAL 0/255 frames are left UNDEFINED by highdicom
        assert np.array_equal(seg.pixel_array, np.stack([left, right]).astype(np.uint8) * scale)

    def test_wrong_shape_is_refused(self, small_dx: Dataset) -> None:
        with pytest.raises(ValueError, match="shape"):
            build_segmentation(small_dx, np.zeros((10, 10), bool), np.zeros((10, 10), bool), ALGORITHMS.segmenter)

    def test_overlapping_masks_are_refused(self, small_dx: Dataset) -> None:
        mask = np.ones((small_dx.Rows, small_dx.Columns), bool)
        with pytest.raises(ValueError, match="overlap"):
            build_segmentation(small_dx, mask, mask, ALGORITHMS.segmenter)

    def test_non_binary_mask_is_refused(self, small_dx: Dataset) -> None:
        mask = np.full((small_dx.Rows, small_dx.Columns), 2, np.uint8)
        with pytest.raises(ValueError, match="0 and 1"):
            build_segmentation(small_dx, mask, np.zeros_like(mask), ALGORITHMS.segmenter)


class TestReport:
    @needs_montgomery
    def test_round_trip_keeps_score_finding_and_references(self, dx_case: dict, tmp_path: Path) -> None:
        sr = round_trip(dx_case["sr"], tmp_path)
        source, seg = dx_case["source"], dx_case["seg"]
        assert sr.SOPClassUID == Comprehensive3DSRStorage
        assert sr.StudyInstanceUID == source.StudyInstanceUID
        image_group, *outline_groups = sr.content.get_image_measurement_groups()
        assert [g.tracking_identifier for g in outline_groups] == [OHIF_FREEHAND, OHIF_FREEHAND]
        (score,) = image_group.get_measurements(name=TB_SCORE)
        assert score.value == pytest.approx(0.83)
        assert score.unit == codes.UCUM.NoUnits
        assert image_group.finding_type == hd.sr.CodedConcept("56717001", "SCT", "Tuberculosis")
        (screening,) = image_group.get_qualitative_evaluations(name=TB_SCREENING_RESULT)
        assert screening.value == codes.SCT.Abnormal
        assert image_group.source_images[0].referenced_sop_instance_uid == source.SOPInstanceUID
        evidence = {
            ref.ReferencedSOPInstanceUID
            for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for ref in series.ReferencedSOPSequence
        }
        assert evidence == {source.SOPInstanceUID, seg.SOPInstanceUID}

    @needs_montgomery
    def test_round_trip_keeps_areas_laterality_and_segment_references(self, dx_case: dict, tmp_path: Path) -> None:
        sr = round_trip(dx_case["sr"], tmp_path)
        seg, source = dx_case["seg"], dx_case["source"]
        groups = sr.content.get_planar_roi_measurement_groups()
        assert len(groups) == 2
        for group, side, laterality, frame in zip(
            groups, ("left", "right"), (codes.SCT.Left, codes.SCT.Right), (1, 2), strict=True
        ):
            (area,) = group.get_measurements(name=AREA)
            assert area.value == pytest.approx(dx_case["areas"][side])
            assert area.unit == codes.UCUM.SquareMillimeter
            site = group.finding_sites[0]
            assert site.value == codes.SCT.Lung and site.laterality == laterality
            reference = group.referenced_segmentation_frame
            assert reference.referenced_sop_instance_uid == seg.SOPInstanceUID
            assert reference.referenced_frame_numbers == [frame]
            assert reference.source_image_for_segmentation.referenced_sop_instance_uid == source.SOPInstanceUID
            assert group.tracking_identifier == f"{side.capitalize()} lung"

    @needs_montgomery
    def test_areas_are_pixel_count_times_spacing(self, dx_case: dict) -> None:
        expected = np.count_nonzero(dx_case["left"]) * 0.175 * 0.175
        assert dx_case["areas"]["left"] == pytest.approx(expected)
        assert 5_000 < dx_case["areas"]["left"] < 50_000  # plausible adult lung, mm²

    def test_without_spacing_has_no_area_and_states_the_reason(self, nema_case: dict, tmp_path: Path) -> None:
        sr = round_trip(nema_case["sr"], tmp_path)
        groups = sr.content.get_planar_roi_measurement_groups()
        assert len(groups) == 4  # per lung: its outline (image region), then its SEG segment
        for outline_group, segment_group in zip(groups[::2], groups[1::2], strict=True):
            assert outline_group.get_measurements(name=AREA) == segment_group.get_measurements(name=AREA) == []
            assert outline_group.roi is not None and outline_group.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
            assert segment_group.referenced_segmentation_frame is not None
            assert outline_group.tracking_uid == segment_group.tracking_uid
        # one Comment, the TB score's, which says why the areas are missing (OHIF shows only a group's first)
        (comment,) = [item.TextValue for item in find_items(sr, COMMENT.value)]
        assert comment == f"TB score 0.120 (threshold 0.500): Normal. Lung areas not reported: {NO_SPACING}"
        (image_group,) = sr.content.get_image_measurement_groups()
        (screening,) = image_group.get_qualitative_evaluations(name=TB_SCREENING_RESULT)
        assert screening.value == codes.SCT.Normal

    @pytest.mark.parametrize("warning", [None, "lung segmentation implausible: check the lung outlines"])
    def test_dx_without_spacing_has_one_comment_with_score_reason_and_warning(self, warning: str | None) -> None:
        source = make_dx(np.tile(np.linspace(0, 255, 256), (256, 1)), size=None, pixel_spacing=None)
        left, right = ellipse_masks(source.Rows, source.Columns)
        seg = build_segmentation(source, left, right, ALGORITHMS.segmenter)
        sr = build_report(
            source, seg, tb_score=0.73, threshold=0.28, lung_masks={"left": left, "right": right},
            areas_mm2=None, area_omission_reason=f" {NO_SPACING}. ", algorithms=ALGORITHMS, quality_warning=warning,
        )
        assert_valid(sr)
        (image_group,) = hd.sr.srread(io.BytesIO(reread(sr))).content.get_image_measurement_groups()
        comments = [str(item.TextValue) for item in image_group[0].ContentSequence
                    if item.ConceptNameCodeSequence[0].CodeValue == COMMENT.value]
        expected = f"TB score 0.730 (threshold 0.280): Abnormal. Lung areas not reported: {NO_SPACING}"
        if warning is not None:
            expected += f". Quality check: {warning}"
        assert comments == [expected]
        assert [item.TextValue for item in find_items(sr, COMMENT.value)] == [expected]  # no other Comment at all

    def test_the_one_comment_keeps_within_1024_characters_and_keeps_the_score(self, small_dx: Dataset) -> None:
        left, right = ellipse_masks(small_dx.Rows, small_dx.Columns)
        seg = build_segmentation(small_dx, left, right, ALGORITHMS.segmenter)
        sr = build_report(
            small_dx, seg, tb_score=0.2, threshold=0.5, lung_masks={"left": left, "right": right},
            areas_mm2=None, area_omission_reason="r" * 800, algorithms=ALGORITHMS, quality_warning="w" * 800,
        )
        (comment,) = [str(item.TextValue) for item in find_items(sr, COMMENT.value)]
        assert len(comment) == 1024
        assert comment.startswith("TB score 0.200 (threshold 0.500): Normal. Lung areas not reported: rrr")
        assert_valid(sr)

    def test_algorithm_identity_and_threshold_are_recorded(self, nema_case: dict) -> None:
        texts = [item.TextValue for item in find_items(nema_case["sr"], "111002")]  # Algorithm Parameters
        assert f"weights_sha256={TB_MODEL.sha256}" in texts
        assert f"weights_sha256={SEGMENTER.sha256}" in texts
        assert "threshold=0.5" in texts
        names = {item.TextValue for item in find_items(nema_case["sr"], "111001")}  # Algorithm Name
        assert names == {SEGMENTER.name, TB_MODEL.name}

    def test_observer_is_the_device(self, nema_case: dict) -> None:
        (observer_type,) = find_items(nema_case["sr"], "121005")
        assert observer_type.ConceptCodeSequence[0].CodeValue == codes.DCM.Device.value

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"tb_score": 1.2}, "tb_score"),
            ({"threshold": -0.1}, "threshold"),
            ({"area_omission_reason": "x"}, "exactly one"),
            ({"areas_mm2": None}, "exactly one"),
            ({"areas_mm2": {"left": 1.0}}, "keys"),
            ({"areas_mm2": {"left": 1.0, "right": -1.0}}, ">= 0"),
            ({"lung_masks": {"left": np.zeros((256, 256), bool)}}, "lung_masks"),
            ({"lung_masks": {"left": np.zeros((8, 8), bool), "right": np.zeros((8, 8), bool)}}, "shape"),
        ],
    )
    def test_invalid_arguments_are_refused(self, small_dx: Dataset, kwargs: dict, message: str) -> None:
        left, right = ellipse_masks(small_dx.Rows, small_dx.Columns)
        seg = build_segmentation(small_dx, left, right, ALGORITHMS.segmenter)
        arguments = {"tb_score": 0.5, "threshold": 0.5, "areas_mm2": {"left": 1.0, "right": 2.0},
                     "lung_masks": {"left": left, "right": right}}
        arguments |= {"area_omission_reason": None} | kwargs
        with pytest.raises(ValueError, match=message):
            build_report(small_dx, seg, algorithms=ALGORITHMS, **arguments)


def every_uid(ds: Dataset, path: str = "") -> dict[str, str]:
    """Each UI element of ``ds``, nested ones included, by its path."""
    found: dict[str, str] = {}
    for element in ds:
        if element.VR == "SQ":
            for index, item in enumerate(element.value):
                found |= every_uid(item, f"{path}{element.keyword}[{index}].")
        elif element.VR == "UI":
            found[path + element.keyword] = str(element.value)
    return found


class TestUIDs:
    def test_same_inputs_give_the_same_uids(self, small_dx: Dataset) -> None:
        left, right = ellipse_masks(small_dx.Rows, small_dx.Columns)
        first = build_segmentation(small_dx, left, right, ALGORITHMS.segmenter)
        again = build_segmentation(small_dx, left, right, ALGORITHMS.segmenter)
        assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
        assert first.SegmentSequence[0].TrackingUID == again.SegmentSequence[0].TrackingUID
        report = dict(tb_score=0.3, threshold=0.5, lung_masks={"left": left, "right": right}, areas_mm2=None,
                      area_omission_reason="x", algorithms=ALGORITHMS)
        sr_first, sr_again = build_report(small_dx, first, **report), build_report(small_dx, again, **report)
        assert (sr_first.SOPInstanceUID, sr_first.SeriesInstanceUID) == (
            sr_again.SOPInstanceUID,
            sr_again.SeriesInstanceUID,
        )
        all_uids = {first.SOPInstanceUID, first.SeriesInstanceUID, sr_first.SOPInstanceUID, sr_first.SeriesInstanceUID}
        assert len(all_uids) == 4
        # every UID in the objects, not only the identifying ones (highdicom draws some at random)
        assert every_uid(first) == every_uid(again) and every_uid(sr_first) == every_uid(sr_again)

    def test_new_model_version_gives_new_uids(self, small_dx: Dataset) -> None:
        newer = Algorithm.from_model_identity(ModelIdentity(SEGMENTER.name, "0.2.0", SEGMENTER.sha256))
        left, right = ellipse_masks(small_dx.Rows, small_dx.Columns)
        old = build_segmentation(small_dx, left, right, ALGORITHMS.segmenter)
        new = build_segmentation(small_dx, left, right, newer)
        assert old.SOPInstanceUID != new.SOPInstanceUID
        assert old.SeriesInstanceUID != new.SeriesInstanceUID

    def test_sr_uids_depend_on_both_models_and_the_threshold(self) -> None:
        keys = [ALGORITHMS.segmenter.uid_key, ALGORITHMS.tb_classifier.uid_key]
        base = result_uids("1.2.3", "sr", keys + ["threshold=0.5"])
        assert base == result_uids("1.2.3", "sr", keys + ["threshold=0.5"])
        assert base != result_uids("1.2.3", "sr", keys + ["threshold=0.6"])
        newer_tb = Algorithm.from_model_identity(ModelIdentity(TB_MODEL.name, "0.2.0", TB_MODEL.sha256))
        assert base != result_uids("1.2.3", "sr", [keys[0], newer_tb.uid_key, "threshold=0.5"])
        assert base != result_uids("1.2.4", "sr", keys + ["threshold=0.5"])
        assert base.sop_instance_uid.startswith("1.2.826.0.1.3680043.8.498.")
        assert base.sop_instance_uid.is_valid

    def test_unknown_kind_is_refused(self) -> None:
        with pytest.raises(ValueError, match="kind"):
            result_uids("1.2.3", "pr", ["x"])  # type: ignore[arg-type]


class TestReread:
    def test_valid_results_reread(self, nema_case: dict) -> None:
        for ds in (nema_case["seg"], nema_case["sr"]):
            data = reread(ds)
            assert pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID == ds.SOPInstanceUID

    def test_broken_seg_raises(self, small_dx: Dataset) -> None:
        left, right = ellipse_masks(small_dx.Rows, small_dx.Columns)
        seg = copy.deepcopy(build_segmentation(small_dx, left, right, ALGORITHMS.segmenter))
        del seg.SegmentSequence
        with pytest.raises(UnreadableResult):
            reread(seg)

    @pytest.fixture
    def small_sr(self, small_dx: Dataset) -> Dataset:
        left, right = ellipse_masks(small_dx.Rows, small_dx.Columns)
        seg = build_segmentation(small_dx, left, right, ALGORITHMS.segmenter)
        return copy.deepcopy(build_report(
            small_dx, seg, tb_score=0.3, threshold=0.5, lung_masks={"left": left, "right": right},
            areas_mm2=None, area_omission_reason="x", algorithms=ALGORITHMS,
        ))

    def test_sr_without_content_raises(self, small_sr: Dataset) -> None:
        del small_sr.ContentSequence
        with pytest.raises(UnreadableResult, match="content items"):
            reread(small_sr)

    def test_sr_whose_bytes_lose_content_raises(self, small_sr: Dataset, monkeypatch) -> None:
        encode = verify.encode

        def losing_the_last_item(ds: Dataset) -> bytes:
            damaged = copy.deepcopy(ds)
            del damaged.ContentSequence[-1]
            return encode(damaged)

        monkeypatch.setattr(verify, "encode", losing_the_last_item)
        with pytest.raises(UnreadableResult, match="content items"):
            reread(small_sr)

    def test_sr_whose_bytes_name_another_instance_raises(self, small_sr: Dataset, monkeypatch) -> None:
        encode = verify.encode

        def renamed(ds: Dataset) -> bytes:
            other = copy.deepcopy(ds)
            other.SOPInstanceUID = "1.2.3.4"
            return encode(other)

        monkeypatch.setattr(verify, "encode", renamed)
        with pytest.raises(UnreadableResult, match="SOP Instance UID"):
            reread(small_sr)

    def test_sr_that_cannot_be_encoded_raises(self, small_sr: Dataset) -> None:
        with pytest.warns(UserWarning, match="cannot be assigned"):
            small_sr.ContentSequence[0].add_new(0x0040A30A, "US", "not a number")  # a binary VR holding text
        with pytest.raises(UnreadableResult, match="does not re-read"):
            reread(small_sr)


def test_malformed_birth_date_is_copied_empty_and_results_stay_valid() -> None:
    from node.results.algorithm import Algorithm
    from node.results.seg import build_segmentation
    from node.results.source import encoding_source

    source = make_dx(Path(__file__).parents[1] / "data" / "MCUCXR_0017_0.png", size=(256, 256))
    with pytest.warns(UserWarning, match="Invalid value for VR DA"):
        source.PatientBirthDate = "12/04/1936"
    encodable = encoding_source(source)
    assert encodable.PatientBirthDate == "" and source.PatientBirthDate == "12/04/1936"
    assert encodable.PatientID == source.PatientID
    lungs = np.zeros((256, 256), dtype=bool)
    lungs[60:200, 140:220] = True
    seg = build_segmentation(source, lungs, np.fliplr(lungs),
                             Algorithm("cxrnode-lung-unet", "1.0.0", "0" * 64))
    assert seg.PatientBirthDate == ""
    assert dciodvfy_errors(seg) == []


class TestEncodingSource:
    """The header every result of a job is encoded from: made once, used as it is by each encoder."""

    def test_is_the_header_with_its_measuring_spacing(self, small_dx: Dataset) -> None:
        from node.results.source import EncodingSource, encoding_source

        header = encoding_source(small_dx)
        assert isinstance(header, EncodingSource) and "PixelData" not in header and "PixelData" in small_dx
        assert header.spacing == pixel_spacing_mm(small_dx)
        assert header.SOPInstanceUID == small_dx.SOPInstanceUID and header.file_meta is small_dx.file_meta
        assert encoding_source(header) is header

    def test_no_usable_spacing_is_none(self, nema_case: dict) -> None:
        from node.results.source import encoding_source

        header = encoding_source(nema_case["source"])
        assert header.spacing is None and "PixelSpacing" not in header

    def test_encoders_give_the_same_results_from_it(self, small_dx: Dataset) -> None:
        from node.results.source import encoding_source

        left, right = ellipse_masks(small_dx.Rows, small_dx.Columns)
        header = encoding_source(small_dx)
        from_source = build_segmentation(small_dx, left, right, ALGORITHMS.segmenter)
        from_header = build_segmentation(header, left, right, ALGORITHMS.segmenter)
        assert np.array_equal(from_source.pixel_array, from_header.pixel_array)
        assert from_header.SOPInstanceUID == from_source.SOPInstanceUID
        assert from_header.SharedFunctionalGroupsSequence == from_source.SharedFunctionalGroupsSequence
        report = {"tb_score": 0.3, "threshold": 0.5, "lung_masks": {"left": left, "right": right},
                  "areas_mm2": lung_areas_mm2(left, right, header.spacing), "area_omission_reason": None,
                  "algorithms": ALGORITHMS}
        assert build_report(header, from_header, **report).ContentSequence == \
            build_report(small_dx, from_source, **report).ContentSequence


class TestOutline:
    """Outlines are traced on each mask's bounding box: the points must be those of the whole mask."""

    @staticmethod
    def whole_mask_outline(mask: np.ndarray) -> np.ndarray:
        from skimage import measure

        contours = measure.find_contours(np.pad(mask, 1).astype(np.float32), 0.5)
        longest = max(contours, key=lambda c: abs(np.dot(c[:, 1], np.roll(c[:, 0], 1))
                                                  - np.dot(c[:, 0], np.roll(c[:, 1], 1))))
        simplified = measure.approximate_polygon(longest, tolerance=1.0) - 1.0
        points = np.stack([simplified[:, 1] + 0.5, simplified[:, 0] + 0.5], axis=1)
        points = np.clip(points, 0.0, [mask.shape[1], mask.shape[0]])
        if not np.array_equal(points[0], points[-1]):
            points = np.vstack([points, points[:1]])
        return points.astype(np.float32)

    @pytest.mark.parametrize("case", ["ellipse", "touches-borders", "two-blobs", "one-pixel", "jagged"])
    def test_bounding_box_gives_the_whole_mask_outline(self, case: str) -> None:
        from node.results.outline import mask_outline

        left, right = ellipse_masks(300, 260)
        mask = {"ellipse": left, "touches-borders": np.pad(np.ones((120, 100), bool), ((0, 180), (160, 0))),
                "two-blobs": left | right, "one-pixel": np.eye(300, 260, k=40, dtype=bool) & (np.arange(260) == 90),
                "jagged": left & (np.random.default_rng(0).random((300, 260)) < 0.8)}[case]
        np.testing.assert_array_equal(mask_outline(mask), self.whole_mask_outline(mask))


class TestViewerGeometry:
    """What OHIF v3 needs to overlay the SEG and draw the SR (docs/VIEWERS.md)."""

    @pytest.mark.parametrize("patient_orientation", [["L", "F"], ["R", "F"], ["A", "F"], ["P", "H"], None])
    def test_plane_orientation_never_follows_patient_orientation(self, patient_orientation) -> None:
        source = make_dx(np.tile(np.linspace(0, 255, 256), (256, 1)), size=None)
        if patient_orientation is None:
            del source.PatientOrientation
        else:
            source.PatientOrientation = patient_orientation
        left, right = ellipse_masks(256, 256)
        seg = build_segmentation(source, left, right, ALGORITHMS.segmenter)
        shared = seg.SharedFunctionalGroupsSequence[0]
        (plane,) = shared.PlaneOrientationSequence
        assert [float(v) for v in plane.ImageOrientationPatient] == list(DISPLAY_ORIENTATION)
        (measures,) = shared.PixelMeasuresSequence
        spacing = pixel_spacing_mm(source)
        assert [float(v) for v in measures.PixelSpacing] == pytest.approx([spacing.row_mm, spacing.column_mm])
        assert float(measures.SliceThickness) == 1.0
        assert "FrameOfReferenceUID" not in seg and "ImageComments" not in seg
        assert_valid(seg)

    def test_source_image_orientation_is_copied(self, small_dx: Dataset) -> None:
        source = copy.deepcopy(small_dx)
        source.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        left, right = ellipse_masks(256, 256)
        seg = build_segmentation(source, left, right, ALGORITHMS.segmenter)
        (plane,) = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence
        assert [float(v) for v in plane.ImageOrientationPatient] == [0, 1, 0, 0, 0, -1]

    @pytest.mark.parametrize(("rows", "columns", "expected"), [
        (2048, 2048, "BINARY"), (1955, 1841, "FRACTIONAL"), (256, 256, "BINARY"), (255, 255, "FRACTIONAL"),
        (3, 4, "FRACTIONAL"), (4, 4, "BINARY"),
    ])
    def test_segmentation_type_avoids_odd_packed_lengths(self, rows: int, columns: int, expected: str) -> None:
        assert segmentation_type_for(rows, columns, 2).value == expected
        packed = -(-rows * columns * 2 // 8)
        assert (packed % 2 == 0) == (expected == "BINARY")

    def test_odd_sized_seg_is_fractional_0_255_and_round_trips(self, nema_case: dict, tmp_path: Path) -> None:
        seg = nema_case["seg"]
        assert seg.SegmentationType == "FRACTIONAL" and seg.MaximumFractionalValue == 255
        assert seg.BitsAllocated == 8
        assert set(np.unique(seg.pixel_array)) <= {0, 255}
        read = round_trip(seg, tmp_path, reader=hd.seg.segread)
        pixels = read.get_pixels_by_source_instance([nema_case["source"].SOPInstanceUID], segment_numbers=[1, 2])
        assert np.array_equal(pixels[0, :, :, 0] > 0, nema_case["left"])
        assert np.array_equal(pixels[0, :, :, 1] > 0, nema_case["right"])
        assert_valid(seg)

    @needs_montgomery
    def test_each_lung_outline_is_a_closed_polyline_that_matches_its_mask(self, dx_case: dict, tmp_path: Path) -> None:
        from skimage.draw import polygon2mask

        sr = round_trip(dx_case["sr"], tmp_path)
        shape = (dx_case["source"].Rows, dx_case["source"].Columns)
        _, *outline_groups = sr.content.get_image_measurement_groups()
        segment_groups = sr.content.get_planar_roi_measurement_groups()
        for group, segment_group, side in zip(outline_groups, segment_groups, ("left", "right"), strict=True):
            assert group.tracking_uid == segment_group.tracking_uid
            (area,) = group.get_measurements(name=AREA)
            assert area.value == pytest.approx(dx_case["areas"][side])
            (scoord,) = [item for item in area[0].ContentSequence if item.ValueType == "SCOORD"]
            assert scoord.GraphicType == "POLYLINE" and scoord.RelationshipType == "INFERRED FROM"
            assert scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
                dx_case["source"].SOPInstanceUID
            points = np.asarray(scoord.GraphicData, dtype=float).reshape(-1, 2)  # (column, row)
            assert np.array_equal(points[0], points[-1])
            drawn = polygon2mask(shape, points[:, ::-1] - 0.5)
            mask = dx_case[side]
            assert 2 * np.logical_and(drawn, mask).sum() / (drawn.sum() + mask.sum()) > 0.99
        assert {c.TextValue for c in find_items(sr, COMMENT.value)} >= {"Left lung", "Right lung"}

    @needs_montgomery
    def test_tb_score_is_anchored_above_the_lungs(self, dx_case: dict) -> None:
        (score,) = find_items(dx_case["sr"], TB_SCORE.value)
        (point,) = [item for item in score.ContentSequence if item.ValueType == "SCOORD"]
        assert point.GraphicType == "POINT"
        column, row = (float(v) for v in point.GraphicData)
        lungs = dx_case["left"] | dx_case["right"]
        rows, columns = np.nonzero(lungs)
        assert columns.min() < column < columns.max() and row == pytest.approx(rows.min() + 0.5)
        tracking = [item.TextValue for item in find_items(dx_case["sr"], "112039")]  # Tracking Identifier
        assert tracking.count(OHIF_ARROW) == 1 and tracking.count(OHIF_FREEHAND) == 2

    def test_an_empty_lung_has_no_outline_but_keeps_its_segment_group(self, small_dx: Dataset, tmp_path: Path) -> None:
        left, _ = ellipse_masks(small_dx.Rows, small_dx.Columns)
        empty = np.zeros_like(left)
        seg = build_segmentation(small_dx, left, empty, ALGORITHMS.segmenter)
        sr = build_report(small_dx, seg, tb_score=0.5, threshold=0.5, lung_masks={"left": left, "right": empty},
                          areas_mm2=lung_areas_mm2(left, empty, pixel_spacing_mm(small_dx)),
                          area_omission_reason=None, algorithms=ALGORITHMS)
        read = round_trip(sr, tmp_path)
        _, *outline_groups = read.content.get_image_measurement_groups()
        assert len(outline_groups) == 1 and len(read.content.get_planar_roi_measurement_groups()) == 2


@pytest.fixture(scope="module")
def sc_case(dx_case: dict) -> dict:
    from node.imaging import display_pixels
    from node.results.sc import SC_MAX_SIDE, build_secondary_capture

    source = dx_case["source"]
    sc = build_secondary_capture(source, display_pixels(source), dx_case["left"], dx_case["right"],
                                 patient_left_on_image_right=True, tb_score=0.83, threshold=0.5,
                                 algorithms=ALGORITHMS)
    return {"sc": sc, "max_side": SC_MAX_SIDE, **dx_case}


class TestSecondaryCapture:
    """The overlay picture for viewers that cannot show a SEG: valid, referenced, lungs on the right sides."""

    @needs_montgomery
    def test_has_no_dciodvfy_errors_and_rereads(self, sc_case: dict) -> None:
        assert_valid(sc_case["sc"])
        reread(sc_case["sc"])

    @needs_montgomery
    def test_is_an_rgb_picture_in_the_source_study_that_says_what_it_is(self, sc_case: dict) -> None:
        sc, source = sc_case["sc"], sc_case["source"]
        assert sc.SOPClassUID == SECONDARY_CAPTURE
        assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.SeriesInstanceUID != source.SeriesInstanceUID
        assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
        assert sc.Columns <= sc_case["max_side"] < sc.Rows  # the radiograph scaled down, a caption band above it
        assert sc.BurnedInAnnotation == "YES" and "NOT FOR DIAGNOSIS" in sc.ImageComments
        assert "PixelSpacing" not in sc  # nothing may be measured on a picture
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID

    @needs_montgomery
    def test_patient_left_lung_is_green_on_the_image_right(self, sc_case: dict) -> None:
        from node.results.picture import LEFT_COLOUR, RIGHT_COLOUR

        rgb = sc_case["sc"].pixel_array.astype(int)
        image = rgb[-sc_case["sc"].Columns:]  # the radiograph is the square below the caption band
        half = image.shape[1] // 2

        def share(part: np.ndarray, colour: tuple[int, int, int]) -> float:
            # A filled pixel leans to its lung's colour: its dominant channel matches the colour's.
            dominant = int(np.argmax(colour))
            others = [c for c in range(3) if c != dominant]
            lean = part[..., dominant] - part[..., others].max(axis=-1)
            return float(np.mean(lean > 30))

        assert share(image[:, half:], LEFT_COLOUR) > 0.05 > share(image[:, :half], LEFT_COLOUR)
        assert share(image[:, :half], RIGHT_COLOUR) > 0.05 > share(image[:, half:], RIGHT_COLOUR)

    def test_uids_are_deterministic(self, small_dx: Dataset) -> None:
        from node.imaging import display_pixels
        from node.results.sc import build_secondary_capture

        left, right = ellipse_masks(small_dx.Rows, small_dx.Columns)
        make = lambda threshold: build_secondary_capture(  # noqa: E731
            small_dx, display_pixels(small_dx), left, right, patient_left_on_image_right=True, tb_score=0.4,
            threshold=threshold, algorithms=ALGORITHMS)
        assert make(0.5).SOPInstanceUID == make(0.5).SOPInstanceUID != make(0.6).SOPInstanceUID
        with pytest.raises(ValueError, match="tb_score"):
            build_secondary_capture(small_dx, display_pixels(small_dx), left, right, patient_left_on_image_right=True,
                                    tb_score=1.5, threshold=0.5, algorithms=ALGORITHMS)
