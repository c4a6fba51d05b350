"""Labels of an export: lung masks and TB labels, each with where it came from.

Masks, in order of trust:

1. **manual**: a radiologist-corrected SEG in the PACS for that image, fetched over DICOMweb
   (QIDO-RS for the study's SEG series and their instances, WADO-RS for the objects). A SEG counts
   as corrected when it references the image and was not made by this node: one of its segments has
   Segment Algorithm Type MANUAL or SEMIAUTOMATIC, or its Manufacturer is not ``cxrnode``. Its lung
   segments (Segmented Property Type SCT Lung, Left lung or Right lung) are merged into one mask,
   as the shared data's masks are. Several corrected SEGs for one image: the newest (Content
   Date/Time, then Series Date/Time) wins.
2. **pseudo**: the node's own SEG from the archive, with a quality score (:func:`pseudo_quality`);
   below ``[dataset] min_pseudo_quality`` the mask is left out of the export.

The pseudo-label quality is the mask's anatomical plausibility
(:func:`models.plausibility.lung_plausibility`: area, balance, compactness and sides, each 0..1),
computed from what is archived (the node does not keep its probability maps), on the mask in the
standard view at export size (512 x 512). It is not a Dice estimate; it catches the failures a
person would reject at a glance.

TB labels (never the node's own TB score): an engineer's CSV (``--tb-labels``: a Study Instance UID
or an Accession Number per row, ``tb_label`` 0 or 1), else a radiologist-verified report in the PACS
(:meth:`PacsLabels.report_tb_label`): an SR of the study (Basic Text, Enhanced or Comprehensive) with
Verification Flag VERIFIED, not made by this node, holding a CODE item "Finding" (DCM 121071) whose
value is Tuberculosis (SCT 56717001) or Pulmonary tuberculosis (SCT 154283005) → 1, or Normal (SCT
17621005) or No abnormality detected (SCT 281900007) with no TB finding → 0. Anything else (free
text only, other findings, reports that disagree) leaves the label unknown (blank).
"""

from __future__ import annotations

import csv
import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from models.plausibility import lung_plausibility
from node.errors import NodeError

__all__ = [
    "CORRECTED_ALGORITHM_TYPES",
    "LUNG_PROPERTY_TYPES",
    "PacsError",
    "PacsLabels",
    "TbLabelCsv",
    "is_corrected_seg",
    "own_seg_lungs",
    "pseudo_quality",
    "seg_lung_union",
]

#: (coding scheme, code value) of Segmented Property Types that are lung: Lung, Left lung, Right lung.
LUNG_PROPERTY_TYPES = frozenset({("SCT", "39607008"), ("SCT", "44029006"), ("SCT", "3341006")})
CORRECTED_ALGORITHM_TYPES = frozenset({"MANUAL", "SEMIAUTOMATIC"})
NODE_MANUFACTURER = "cxrnode"
FINDING = ("DCM", "121071")
TB_POSITIVE = frozenset({("SCT", "56717001"), ("SCT", "154283005")})
TB_NEGATIVE = frozenset({("SCT", "17621005"), ("SCT", "281900007")})

log = logging.getLogger(__name__)

SEG_MODALITY, SR_MODALITY = "SEG", "SR"
_STUDY_CACHE = 8


class PacsError(NodeError):
    """The PACS's DICOMweb service could not be queried; the export stops rather than fall back silently."""


# ----- masks -----

def pseudo_quality(patient_left: np.ndarray, patient_right: np.ndarray) -> float:
    """The quality of the node's own mask as a pseudo-label: its anatomical plausibility (0..1, 3
    decimals, :func:`models.plausibility.lung_plausibility`, which documents the four factors)."""
    return lung_plausibility(patient_left, patient_right)


def _code(item: Dataset, keyword: str) -> tuple[str, str] | None:
    sequence = item.get(keyword)
    if not sequence:
        return None
    code = sequence[0]
    return (str(code.get("CodingSchemeDesignator", "")).strip(), str(code.get("CodeValue", "")).strip())


def is_corrected_seg(seg: Dataset) -> bool:
    """A SEG not made by this node: a MANUAL or SEMIAUTOMATIC segment, or another Manufacturer."""
    if str(seg.get("Manufacturer", "") or "").strip() != NODE_MANUFACTURER:
        return True
    return any(str(s.get("SegmentAlgorithmType", "")).strip().upper() in CORRECTED_ALGORITHM_TYPES
               for s in seg.get("SegmentSequence", []))


def _source_pixels(seg: Any, sop_instance_uid: str, segment_numbers: list[int]) -> np.ndarray:
    """(Rows, Columns, len(segment_numbers)) bool frames of ``seg`` for the source image."""
    pixels = seg.get_pixels_by_source_instance([sop_instance_uid], segment_numbers=segment_numbers,
                                               ignore_spatial_locations=True)[0]
    return np.asarray(pixels, dtype=np.float32) >= 0.5


def seg_lung_union(seg: Any, sop_instance_uid: str) -> np.ndarray | None:
    """The union of the lung segments of a highdicom Segmentation ``seg`` on the grid of the source
    image ``sop_instance_uid``; None when ``seg`` does not reference it or has no lung segment."""
    if sop_instance_uid not in {uid for _, _, uid in seg.get_source_image_uids()}:
        return None
    numbers = [int(item.SegmentNumber) for item in seg.SegmentSequence
               if _code(item, "SegmentedPropertyTypeCodeSequence") in LUNG_PROPERTY_TYPES]
    if not numbers:
        return None
    return _source_pixels(seg, sop_instance_uid, numbers).any(axis=-1)


def own_seg_lungs(path: Path, sop_instance_uid: str) -> tuple[np.ndarray, np.ndarray]:
    """(patient's left lung, patient's right lung) of the node's own SEG archived at ``path``, on the
    source's stored grid (segments 1 and 2, :data:`node.results.seg.LUNG_SEGMENTS`)."""
    import highdicom as hd

    from node.results.seg import LUNG_SEGMENTS

    seg = hd.seg.segread(path)
    numbers = {s.side: s.segment_number for s in LUNG_SEGMENTS}
    frames = _source_pixels(seg, sop_instance_uid, [numbers["left"], numbers["right"]])
    return frames[..., 0], frames[..., 1]


# ----- TB labels -----

@dataclass
class TbLabelCsv:
    """An engineer's TB labels: Study Instance UID or Accession Number to 0/1."""

    by_study: dict[str, int] = field(default_factory=dict)
    by_accession: dict[str, int] = field(default_factory=dict)
    rows: int = 0
    used: set[tuple[str, str]] = field(default_factory=set)

    @classmethod
    def load(cls, path: str | Path) -> TbLabelCsv:
        """Read ``path``: columns ``tb_label`` and ``study_instance_uid`` and/or ``accession_number``.

        Raises:
            NodeError: the file is missing or unreadable, a column is missing, a label is not 0 or 1,
                a row names neither key, or one key is given two labels. Messages name lines, never values.
        """
        path = Path(path)
        labels = cls()
        try:
            with path.open(newline="", encoding="utf-8-sig") as handle:
                reader = csv.DictReader(handle)
                columns = {c.strip().lower() for c in reader.fieldnames or []}
                if "tb_label" not in columns or not columns & {"study_instance_uid", "accession_number"}:
                    raise NodeError(f"--tb-labels {path}: needs a tb_label column and a study_instance_uid or "
                                    "accession_number column")
                for line, raw in enumerate(reader, start=2):
                    row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
                    labels._add(path, line, row)
        except OSError as exc:
            raise NodeError(f"--tb-labels {path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
        except UnicodeDecodeError:
            raise NodeError(f"--tb-labels {path}: is not UTF-8 text") from None
        return labels

    def _add(self, path: Path, line: int, row: dict[str, str]) -> None:
        label_text = row.get("tb_label", "")
        if label_text not in ("0", "1"):
            raise NodeError(f"--tb-labels {path}, line {line}: tb_label must be 0 or 1")
        study, accession = row.get("study_instance_uid", ""), row.get("accession_number", "")
        if not (study or accession):
            raise NodeError(f"--tb-labels {path}, line {line}: gives neither study_instance_uid nor accession_number")
        label = int(label_text)
        for table, key in ((self.by_study, study), (self.by_accession, accession)):
            if key and table.setdefault(key, label) != label:
                raise NodeError(f"--tb-labels {path}, line {line}: the same study or accession number has "
                                "another tb_label on an earlier line")
        self.rows += 1

    def label_for(self, study_instance_uid: str, accession_number: str) -> int | None:
        """The label of the study (by its UID first, else its Accession Number); None when not listed."""
        if study_instance_uid in self.by_study:
            self.used.add(("study", study_instance_uid))
            return self.by_study[study_instance_uid]
        if accession_number and accession_number in self.by_accession:
            self.used.add(("accession", accession_number))
            return self.by_accession[accession_number]
        return None

    @property
    def unmatched_keys(self) -> int:
        """Study UIDs and Accession Numbers of the file that no exported image matched."""
        keys = {("study", k) for k in self.by_study} | {("accession", k) for k in self.by_accession}
        return len(keys - self.used)


def report_label(sr: Dataset) -> int | None:
    """The TB label a verified SR states (see the module doc), None when it states none or both."""
    found: set[int] = set()
    for item in _content_items(sr):
        if str(item.get("ValueType", "")).upper() != "CODE" or _code(item, "ConceptNameCodeSequence") != FINDING:
            continue
        value = _code(item, "ConceptCodeSequence")
        if value in TB_POSITIVE:
            found.add(1)
        elif value in TB_NEGATIVE:
            found.add(0)
    if 1 in found:
        return 1
    return 0 if found == {0} else None


def _content_items(ds: Dataset) -> Iterator[Dataset]:
    stack = list(ds.get("ContentSequence", []))
    while stack:
        item = stack.pop()
        yield item
        stack.extend(item.get("ContentSequence", []))


# ----- the PACS over DICOMweb -----

@dataclass
class _Study:
    corrected_segs: list[tuple[str, Any]]  # (sort key, highdicom Segmentation), newest first
    tb_label: int | None


class PacsLabels:
    """Corrected SEGs and verified reports of a study, from the PACS's DICOMweb service (cached per study)."""

    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        from dicomweb_client.api import DICOMwebClient

        self.url = url.rstrip("/")
        self.client = DICOMwebClient(url=self.url, timeout=timeout_s)
        self._studies: OrderedDict[str, _Study] = OrderedDict()
        self.requests = 0

    def corrected_mask(self, study_instance_uid: str, sop_instance_uid: str) -> np.ndarray | None:
        """The lung union of the newest corrected SEG of the image, on its stored grid; None if none."""
        for _, seg in self._study(study_instance_uid).corrected_segs:
            try:
                union = seg_lung_union(seg, sop_instance_uid)
            except (ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:
                log.warning("corrected SEG %s cannot be read for image %s (%s): not used", seg.SOPInstanceUID,
                            sop_instance_uid, type(exc).__name__)
                continue
            if union is not None:
                return union
        return None

    def report_tb_label(self, study_instance_uid: str) -> int | None:
        """The TB label the study's verified reports agree on; None when there is none or they disagree."""
        return self._study(study_instance_uid).tb_label

    def _study(self, study_instance_uid: str) -> _Study:
        if study_instance_uid in self._studies:
            self._studies.move_to_end(study_instance_uid)
            return self._studies[study_instance_uid]
        study = self._fetch(study_instance_uid)
        self._studies[study_instance_uid] = study
        while len(self._studies) > _STUDY_CACHE:
            self._studies.popitem(last=False)
        return study

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import requests

        self.requests += 1
        try:
            return fn(*args, **kwargs)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            raise PacsError(f"DICOMweb {what} at {self.url} failed: HTTP {status}") from None
        except (requests.RequestException, OSError) as exc:
            raise PacsError(f"DICOMweb {what} at {self.url} failed: {type(exc).__name__}") from None

    def _fetch(self, study_instance_uid: str) -> _Study:
        import highdicom as hd

        series = self._call("search for series (QIDO-RS)", self.client.search_for_series,
                            study_instance_uid=study_instance_uid)
        segs: list[tuple[str, Any]] = []
        labels: set[int] = set()
        for item in series:
            modality = _qido_value(item, "00080060")
            series_uid = _qido_value(item, "0020000E")
            if modality not in (SEG_MODALITY, SR_MODALITY) or not series_uid:
                continue
            instances = self._call("search for instances (QIDO-RS)", self.client.search_for_instances,
                                   study_instance_uid=study_instance_uid, series_instance_uid=series_uid)
            for instance in instances:
                sop_uid = _qido_value(instance, "00080018")
                if not sop_uid:
                    continue
                ds = self._call("retrieve instance (WADO-RS)", self.client.retrieve_instance,
                                study_instance_uid, series_uid, sop_uid)
                if modality == SEG_MODALITY and is_corrected_seg(ds):
                    try:
                        segs.append((_newness(ds), hd.seg.Segmentation.from_dataset(ds, copy=False)))
                    except (ValueError, AttributeError, KeyError, TypeError):
                        continue  # not a SEG highdicom can read: not a label
                elif (modality == SR_MODALITY
                      and str(ds.get("Manufacturer", "") or "").strip() != NODE_MANUFACTURER
                      and str(ds.get("VerificationFlag", "")).strip().upper() == "VERIFIED"):
                    label = report_label(ds)
                    if label is not None:
                        labels.add(label)
        segs.sort(key=lambda pair: pair[0], reverse=True)
        return _Study(segs, labels.pop() if len(labels) == 1 else None)


def _qido_value(item: dict[str, Any], tag: str) -> str:
    values = (item.get(tag) or {}).get("Value") or [""]
    return str(values[0])


def _newness(ds: Dataset) -> str:
    return "".join(str(ds.get(k, "") or "").ljust(n, "0")[:n] for k, n in (
        ("ContentDate", 8), ("ContentTime", 13), ("SeriesDate", 8), ("SeriesTime", 13)))
