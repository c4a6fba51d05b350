"""DICOM facts the node shares: what it accepts, what it answers, its identity."""

from __future__ import annotations

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
DX_FOR_PROCESSING = UID("1.2.840.10008.5.1.4.1.1.1.1.1")
VERIFICATION = UID("1.2.840.10008.1.1")

#: Storage SOP classes the listener negotiates; anything else is refused at association.
ACCEPTED_SOP_CLASSES: tuple[UID, ...] = (CR_IMAGE_STORAGE, DX_FOR_PRESENTATION, DX_FOR_PROCESSING)

#: Transfer syntaxes the listener accepts: uncompressed and every compression pydicom
#: decodes with the pylibjpeg plugins.
ACCEPTED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)


class Status:
    """DIMSE status codes the node answers with (PS3.4 Annex B and C)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC210
    PROCESSING_FAILURE = 0x0110
