"""DICOM facts the node shares: what it accepts, what it answers, its identity, its connections."""

from __future__ import annotations

import socket

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

SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")
MULTIFRAME_GRAYSCALE_BYTE_SC = UID("1.2.840.10008.5.1.4.1.1.7.2")
MULTIFRAME_GRAYSCALE_WORD_SC = UID("1.2.840.10008.5.1.4.1.1.7.3")

#: Image SOP classes a chest radiograph can arrive in: these are kept and judged by the acceptance
#: rules (``node.worker.selection``). A chest film stored as Secondary Capture (e.g. NIH
#: ChestX-ray14 in the NHS COVID-19 Chest Imaging Database) is analysed when its header says
#: it is a frontal chest radiograph.
ANALYSED_SOP_CLASSES: tuple[UID, ...] = (
    CR_IMAGE_STORAGE, DX_FOR_PRESENTATION, DX_FOR_PROCESSING,
    SECONDARY_CAPTURE, MULTIFRAME_GRAYSCALE_BYTE_SC, MULTIFRAME_GRAYSCALE_WORD_SC,
)


def _all_storage_sop_classes() -> tuple[UID, ...]:
    from pynetdicom.presentation import AllStoragePresentationContexts

    return tuple(UID(c.abstract_syntax) for c in AllStoragePresentationContexts)


#: Every storage SOP class pynetdicom knows: the listener accepts them all (a PACS routing rule
#: then never fails on a CT or a report) and the node decides afterwards. Objects of classes
#: outside :data:`ANALYSED_SOP_CLASSES` are acknowledged and recorded as discarded with the
#: reason; their bytes are not kept.
STORAGE_SOP_CLASSES: tuple[UID, ...] = _all_storage_sop_classes()

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


def no_delay(sock: socket.socket) -> None:
    """Turn Nagle's algorithm off on a DICOM connection (``TCP_NODELAY``).

    A DIMSE message goes out as several writes (the command PDU, then the data set's PDUs) before
    the peer answers; with Nagle on, the last small write waits for the ACK of the previous one,
    which the peer delays (up to 40 ms on Linux): every small C-STORE or C-ECHO then takes tens of
    milliseconds. pynetdicom and dcmtk leave Nagle on.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
