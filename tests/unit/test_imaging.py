"""Pixel reading for inference: LUTs, photometric interpretation, codecs, spacing, orientation."""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEGLSLossless, JPEGLSNearLossless, RLELossless

from node import imaging
from node.imaging import (
    PixelSpacing,
    UnreadablePixels,
    display_pixels,
    patient_left_on_image_right,
    pixel_spacing_mm,
)
from tests.dicom_factory import make_cr, make_dx, nema_chest_cr_path

# A horizontal ramp (dark left, bright right) with a bright square: bright = dense.
RAMP = np.tile(np.linspace(0, 255, 64), (48, 1))
RAMP[10:20, 10:20] = 255


def small_dx(**kwargs) -> pydicom.Dataset:
    return make_dx(RAMP, size=None, **kwargs)


@pytest.fixture(scope="module")
def nema_lossless() -> pydicom.Dataset:
    return pydicom.dcmread(nema_chest_cr_path(lossless=True))


class TestDisplayPixels:
    def test_returns_float32_unit_range_in_source_geometry(self) -> None:
        pixels = display_pixels(small_dx())
        assert pixels.dtype == np.float32
        assert pixels.shape == RAMP.shape
        assert pixels.min() == 0.0 and pixels.max() == 1.0
        assert pixels[:, -1].mean() > pixels[:, 0].mean()  # bright stays bright

    def test_monochrome1_is_inverted_to_monochrome2_appearance(self) -> None:
        mono2 = display_pixels(small_dx(photometric="MONOCHROME2"))
        mono1_ds = small_dx(photometric="MONOCHROME1")
        assert mono1_ds.pixel_array[0, 0] > mono1_ds.pixel_array[0, -1]  # stored inverted
        # DICOM's window formula is not exactly symmetric (the -0.5 / -1 terms)
        np.testing.assert_allclose(display_pixels(mono1_ds), mono2, atol=1e-3)

    def test_presentation_lut_inverse_on_monochrome2_is_inverted(self) -> None:
        ds = small_dx()
        ds.PresentationLUTShape = "INVERSE"
        np.testing.assert_allclose(display_pixels(ds), 1.0 - display_pixels(small_dx()), atol=1e-6)

    @pytest.mark.parametrize("bits_stored", [8, 12, 15, 16])
    def test_any_bit_depth_gives_the_same_image(self, bits_stored: int) -> None:
        ds = small_dx(bits_stored=bits_stored)
        assert ds.BitsAllocated == (8 if bits_stored == 8 else 16)
        reference = display_pixels(small_dx(bits_stored=16))
        np.testing.assert_allclose(display_pixels(ds), reference, atol=2 / 255)  # 8-bit quantisation

    def test_window_is_applied_and_clips(self) -> None:
        ds = small_dx(window=False)
        stored = ds.pixel_array.astype(float)
        low, high = np.percentile(stored, 25), np.percentile(stored, 75)
        ds.WindowCenter = f"{(low + high) / 2:.1f}"
        ds.WindowWidth = f"{high - low:.1f}"
        windowed = display_pixels(ds)
        unwindowed = display_pixels(small_dx(window=False))
        assert (windowed[stored <= low - 1] == 0).all()
        assert (windowed[stored >= high + 1] == 1).all()
        assert np.isclose(windowed, 0).sum() > np.isclose(unwindowed, 0).sum()

    def test_invalid_window_is_ignored(self) -> None:
        ds = small_dx(window=False)
        ds.WindowCenter, ds.WindowWidth = "100", "0"
        np.testing.assert_allclose(display_pixels(ds), display_pixels(small_dx(window=False)))

    def test_rescale_is_applied(self) -> None:
        ds = small_dx(window=False)
        ds.RescaleSlope, ds.RescaleIntercept = "-1", "4095"  # a reversing Modality LUT
        np.testing.assert_allclose(display_pixels(ds), 1.0 - display_pixels(small_dx(window=False)), atol=1e-6)

    def test_voi_lut_sequence_is_applied(self) -> None:
        ds = pydicom.dcmread(get_testdata_file("vlut_04.dcm", download=False))
        assert "VOILUTSequence" in ds
        expected = pydicom.pixels.apply_voi_lut(pydicom.pixels.apply_modality_lut(ds.pixel_array, ds), ds)
        expected = (expected - expected.min()) / (expected.max() - expected.min())
        np.testing.assert_allclose(display_pixels(ds), expected, atol=1e-6)

    def test_constant_image_is_zero(self) -> None:
        pixels = display_pixels(make_dx(np.full((8, 8), 100.0), size=None))
        assert (pixels == 0).all()


def folding_modality_lut(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A Modality LUT that rises and falls again (not monotonic), replacing the rescale."""
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "US", [int(65535 * abs(np.sin(i / 700))) for i in range(4096)])
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = [item]
    del ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType
    return ds


def full_range_signed(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The ramp stored as signed 16-bit values from -32768 to 32767 (pixel offsets wrap around)."""
    values = np.interp(ds.pixel_array, (ds.pixel_array.min(), ds.pixel_array.max()), (-32768, 32767))
    ds.PixelData, ds.PixelRepresentation = values.astype(np.int16).tobytes(), 1
    ds.WindowCenter, ds.WindowWidth = "0", "60000"
    return ds


class TestValueTable:
    """display_pixels maps each possible stored value once and looks the pixels up: the numbers
    must be those of the per-pixel arithmetic, whatever the LUTs."""

    @pytest.mark.parametrize("make", [
        lambda: small_dx(),
        lambda: small_dx(photometric="MONOCHROME1", bits_stored=16),
        lambda: folding_modality_lut(small_dx(window=False)),
        lambda: full_range_signed(small_dx(bits_stored=16)),
        lambda: pydicom.dcmread(get_testdata_file("vlut_04.dcm", download=False)),
        lambda: pydicom.dcmread(get_testdata_file("MR_small_bigendian.dcm", download=False)),
    ], ids=["window", "monochrome1", "folding-modality-lut", "signed-full-range", "voi-lut-sequence", "big-endian"])
    def test_gives_the_per_pixel_numbers(self, make) -> None:
        ds = make()
        assert imaging._stored_value_table(ds.pixel_array) is not None
        per_pixel = imaging._displayed(make().pixel_array, make())
        table = display_pixels(ds)
        assert table.dtype == per_pixel.dtype == np.float32
        assert np.array_equal(table, per_pixel)

    def test_sigmoid_voi_gives_the_per_pixel_numbers(self) -> None:
        ds = small_dx()
        ds.VOILUTFunction = "SIGMOID"
        assert np.array_equal(display_pixels(copy.deepcopy(ds)), imaging._displayed(ds.pixel_array, ds))


class TestCompressedSources:
    @pytest.mark.parametrize("lossless", [False, True], ids=["J2KI", "J2KR"])
    def test_nema_chest_cr_jpeg2000_decodes(self, lossless: bool) -> None:
        ds = pydicom.dcmread(nema_chest_cr_path(lossless=lossless))
        assert ds.PhotometricInterpretation == "MONOCHROME1"
        pixels = display_pixels(ds)
        assert pixels.shape == (1955, 1841)
        middle = pixels.shape[1] // 2
        mediastinum = pixels[600:1300, middle - 50 : middle + 50].mean()
        right_lung = pixels[600:1300, 350:550].mean()
        assert mediastinum > right_lung + 0.1  # inverted: dense mediastinum is bright

    def test_jpeg_ls_of_the_nema_chest_cr_decodes(self, nema_lossless: pydicom.Dataset) -> None:
        # pydicom-data has no JPEG-LS chest image: re-encode the lossless J2K one.
        ds = copy.deepcopy(nema_lossless)
        ds.compress(JPEGLSLossless, ds.pixel_array)
        np.testing.assert_array_equal(display_pixels(ds), display_pixels(nema_lossless))

    def test_jpeg_ls_near_lossless_decodes(self, nema_lossless: pydicom.Dataset) -> None:
        # The shared data's RG1_JLSN.dcm is the same image in JPEG-LS near-lossless; make it here.
        ds = copy.deepcopy(nema_lossless)
        ds.compress(JPEGLSNearLossless, ds.pixel_array, jls_error=3)
        assert ds.file_meta.TransferSyntaxUID == JPEGLSNearLossless
        difference = np.abs(display_pixels(ds) - display_pixels(nema_lossless))
        assert 0 < difference.max() and difference.mean() < 0.01

    def test_rle_decodes(self) -> None:
        np.testing.assert_array_equal(display_pixels(small_dx(transfer_syntax=RLELossless)), display_pixels(small_dx()))


class TestUnreadablePixels:
    def test_is_a_value_error(self) -> None:
        assert issubclass(UnreadablePixels, ValueError)

    @pytest.mark.parametrize("keyword", ["PixelData", "Rows", "Columns"])
    def test_missing_attribute(self, keyword: str) -> None:
        ds = small_dx()
        delattr(ds, keyword)
        with pytest.raises(UnreadablePixels):
            display_pixels(ds)

    def test_truncated_pixel_data(self) -> None:
        ds = small_dx()
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
        with pytest.raises(UnreadablePixels, match="decoded"):
            display_pixels(ds)

    def test_garbage_compressed_pixel_data(self, nema_lossless: pydicom.Dataset) -> None:
        ds = copy.deepcopy(nema_lossless)
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + bytes(range(256)) * 8])
        with pytest.raises(UnreadablePixels):
            display_pixels(ds)

    def test_multi_frame_is_refused(self) -> None:
        ds = small_dx()
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2
        with pytest.raises(UnreadablePixels, match="multi-frame"):
            display_pixels(ds)

    def test_colour_is_refused(self) -> None:
        ds = pydicom.dcmread(get_testdata_file("SC_rgb.dcm", download=False))
        with pytest.raises(UnreadablePixels, match="Samples per Pixel"):
            display_pixels(ds)


class TestPixelSpacing:
    def test_imager_pixel_spacing(self) -> None:
        assert pixel_spacing_mm(small_dx(pixel_spacing=(0.15, 0.2))) == PixelSpacing(0.15, 0.2, "ImagerPixelSpacing")

    def test_pixel_spacing_alone(self) -> None:
        ds = make_cr(RAMP, size=None, pixel_spacing=(0.1, 0.1), spacing_attribute="PixelSpacing")
        assert pixel_spacing_mm(ds) == PixelSpacing(0.1, 0.1, "PixelSpacing")

    def test_imager_preferred_over_uncalibrated_pixel_spacing(self) -> None:
        ds = small_dx(pixel_spacing=(0.175, 0.175))
        ds.PixelSpacing = [0.16, 0.16]
        assert pixel_spacing_mm(ds).source == "ImagerPixelSpacing"

    def test_calibrated_pixel_spacing_preferred(self) -> None:
        ds = small_dx(pixel_spacing=(0.175, 0.175))
        ds.PixelSpacing = [0.16, 0.16]
        ds.PixelSpacingCalibrationType = "GEOMETRY"
        assert pixel_spacing_mm(ds) == PixelSpacing(0.16, 0.16, "PixelSpacing")

    def test_nema_zero_pixel_spacing_is_absent(self) -> None:
        ds = pydicom.dcmread(nema_chest_cr_path(), stop_before_pixels=True)
        assert [float(v) for v in ds.PixelSpacing] == [0.0, 0.0]
        assert pixel_spacing_mm(ds) is None

    def test_missing_is_absent(self) -> None:
        assert pixel_spacing_mm(small_dx(pixel_spacing=None)) is None

    @pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
    @pytest.mark.parametrize("value", [["-0.1", "0.1"], ["0.1"], ["0.1", "0.1", "0.1"], ["nan", "0.1"]])
    def test_malformed_is_absent(self, value: list[str]) -> None:
        ds = small_dx(pixel_spacing=None)
        ds.ImagerPixelSpacing = value
        assert pixel_spacing_mm(ds) is None

    def test_non_numeric_is_absent(self) -> None:
        ds = small_dx(pixel_spacing=None)
        ds.add_new("ImagerPixelSpacing", "DS", None)
        ds["ImagerPixelSpacing"]._value = "abc\\def"  # bypass validation: a malformed header
        assert pixel_spacing_mm(ds) is None


class TestPatientOrientation:
    @pytest.mark.parametrize(
        ("orientation", "expected"),
        [(["L", "F"], True), (["R", "F"], False), (["RH", "F"], False), (["P", "F"], True), (["LF", "F"], True)],
    )
    def test_row_direction(self, orientation: list[str], expected: bool) -> None:
        assert patient_left_on_image_right(small_dx(patient_orientation=tuple(orientation))) is expected

    def test_absent_or_empty_defaults_to_standard(self) -> None:
        ds = small_dx()
        del ds.PatientOrientation
        assert patient_left_on_image_right(ds) is True
        ds.PatientOrientation = ""
        assert patient_left_on_image_right(ds) is True

    def test_nema_chest_cr_is_standard(self) -> None:
        assert patient_left_on_image_right(pydicom.dcmread(nema_chest_cr_path(), stop_before_pixels=True))
