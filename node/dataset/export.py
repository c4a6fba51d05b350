"""``cxrnode dataset export``: archived radiographs as a de-identified training set.

Selection (:func:`node.queue.repository.dataset_candidates`): job state (``done`` by default),
received time, calling AE title, the node's TB score band, acceptance outcome (accepted: analysed;
discarded: outside the acceptance rules, bytes kept), a limit. Then, for each job:

* skipped and counted: files deleted by the retention purge (``purged``), bytes never kept
  (``not_kept``) or gone (``missing``), unreadable files or pixels (``unreadable``), objects that are not
  a radiograph or are this node's own results (``not_a_radiograph``), Burned In Annotation YES
  (``burned_in_annotation``), and images with neither a mask nor a TB label (``no_label``);
* the pixels through the node's own path: :func:`node.imaging.display_pixels` (Modality and VOI LUT,
  MONOCHROME1 inverted), then the standard view the networks see
  (:func:`node.worker.pipeline.standard_view`: an image stored mirrored, Patient Orientation ``R\\…``,
  is flipped so the patient's left is on the image's right, as in the shared data), then
  :func:`models.transforms.resize_area` (the shared area resampling) to a square 512 x 512 and
  8 bits (0..255): the shared data's format (``../shared/data/MANIFEST.md``: square 512 px PNGs,
  aspect ratio not kept);
* the mask (:mod:`node.dataset.labels`): the lungs merged into one mask (as the shared masks are),
  in the same standard view, area-resampled to 512 x 512 and thresholded at half a pixel, written
  0/255; its ``label_source`` is ``manual`` (a corrected SEG from the PACS) or ``pseudo`` (the node's
  own, with ``label_quality``), and a pseudo-label under the quality floor is left out;
* the TB label: ``--tb-labels`` CSV, else a verified report in the PACS, else blank; never the node's score.

Written under ``--out`` (created, or an empty folder; filled in a temporary sibling folder that is
renamed into place at the end, so an export is complete or absent)::

    index.csv                case_id, source, image_path, mask_path, tb_label, split,
                             label_source, label_quality, tb_label_source
    images/<case_id>.png     512 x 512 8-bit grayscale
    masks/<case_id>.png      512 x 512, 0/255 (only for cases with a mask)
    headers/<case_id>.json   the header attributes the PS3.15 basic profile keeps (node.dataset.deid)
    export.json              the summary: counts only

``index.csv`` is what :func:`models.data.read_index` reads (extra columns are ignored there):
``cxrnode train`` uses rows with a mask for segmentation and rows with a TB label for the TB scorer,
``cxrnode evaluate --data OUT`` measures on it. De-identification: :mod:`node.dataset.deid`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import secrets
import shutil
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmread

from models.transforms import resize_area
from node.archive import Archive, ArchiveError, make_private_dirs, open_archive
from node.dataset import deid
from node.dataset.labels import PacsLabels, TbLabelCsv, own_seg_lungs, pseudo_quality
from node.dicom import ANALYSED_SOP_CLASSES
from node.errors import NodeError
from node.imaging import UnreadablePixels, display_pixels
from node.queue import repository
from node.queue.db import Database
from node.settings import DATASET_SPLITS, Settings
from node.worker.pipeline import standard_view

__all__ = ["EXPORT_SIZE", "INDEX_COLUMNS", "ExportOptions", "export", "to_export_grid"]

log = logging.getLogger(__name__)

#: Side of the square PNGs, as in the shared data.
EXPORT_SIZE = 512
INDEX_COLUMNS = ("case_id", "source", "image_path", "mask_path", "tb_label", "split",
                 "label_source", "label_quality", "tb_label_source")
SKIP_REASONS = ("purged", "not_kept", "missing", "unreadable", "not_a_radiograph", "burned_in_annotation",
                "no_label")
REID_COLUMNS = ("case_id", "job_id", "study_instance_uid", "sop_instance_uid")


@dataclass(frozen=True)
class ExportOptions:
    """What to export and how; ``None`` filters match everything."""

    out: Path
    states: tuple[str, ...] = ("done",)
    since: datetime | None = None
    until: datetime | None = None
    calling_ae_titles: tuple[str, ...] = ()
    tb_min: float | None = None
    tb_max: float | None = None
    outcome: str | None = None  # "accepted" | "discarded"
    limit: int | None = None
    min_quality: float = 0.5
    tb_labels: TbLabelCsv | None = None
    pacs_url: str = ""
    pacs_timeout_s: float = 30.0
    split_fractions: tuple[float, ...] = (0.8, 0.1, 0.1)
    #: ``source`` of every row; None: the calling AE title the image came from.
    source: str | None = None
    keep_reid_map: bool = True


@dataclass
class _Tally:
    selected: int = 0
    exported: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    labels: Counter[str] = field(default_factory=Counter)
    below_quality: int = 0
    tb: Counter[str] = field(default_factory=Counter)
    splits: Counter[str] = field(default_factory=Counter)
    qualities: list[float] = field(default_factory=list)
    patients: set[str] = field(default_factory=set)


def to_export_grid(image_or_mask: np.ndarray, *, mask: bool = False) -> np.ndarray:
    """A display image in [0, 1] (or a boolean mask) in the standard view, as the 512 x 512 uint8
    array the export writes: area resampling (:func:`models.transforms.resize_area`), then 0..255
    (a mask: lung where at least half the output pixel is lung, written 255)."""
    resized = resize_area(np.asarray(image_or_mask, dtype=np.float32), EXPORT_SIZE)
    if mask:
        return np.where(resized >= 0.5, 255, 0).astype(np.uint8)
    return np.clip(np.rint(resized * 255.0), 0, 255).astype(np.uint8)


def _write_png(path: Path, array: np.ndarray) -> None:
    # Pillow writes IHDR, IDAT and IEND only: no text chunks, no metadata.
    Image.fromarray(np.ascontiguousarray(array)).save(path, format="PNG", optimize=True)


def export(settings: Settings, db: Database, options: ExportOptions, archive: Archive | None = None) -> dict[str, Any]:
    """Export the selected radiographs to ``options.out``; returns the summary (counts).

    Raises:
        NodeError: ``out`` exists and is not an empty folder; the export key cannot be read; the
            PACS cannot be queried (:class:`node.dataset.labels.PacsError`); a file would hold an
            identifier (:class:`node.dataset.deid.IdentifierLeak`). Nothing is left under ``out`` then.
    """
    out = Path(options.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NodeError(f"--out {out}: exists and is not an empty folder (an export never mixes with other files)")
    key = deid.load_or_create_key(settings.data_path)
    archive = archive if archive is not None else open_archive(settings)
    export_id = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    candidates = repository.dataset_candidates(
        db, states=options.states, since=options.since, until=options.until,
        calling_ae_titles=options.calling_ae_titles, tb_min=options.tb_min, tb_max=options.tb_max,
        outcome=options.outcome, limit=options.limit)
    pacs = PacsLabels(options.pacs_url, options.pacs_timeout_s) if options.pacs_url else None

    make_private_dirs(out.parent.resolve())
    work = out.parent.resolve() / f".{out.name}.partial-{export_id}"
    make_private_dirs(work)
    tally = _Tally(selected=len(candidates))
    rows: list[dict[str, str]] = []
    reid: list[tuple[str, ...]] = []
    try:
        for folder in ("images", "masks", "headers"):
            (work / folder).mkdir(mode=0o700)
        for candidate in candidates:
            row = _export_one(candidate, key, options, pacs, work, tally, archive)
            if row is not None:
                rows.append(row)
                reid.append((row["case_id"], str(candidate.job_id), candidate.study_instance_uid,
                             candidate.sop_instance_uid))
        summary = _summary(export_id, options, tally, pacs)
        _write_text(work / "index.csv", _index_text(rows))
        _write_text(work / "export.json", json.dumps(summary, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    reid_path = None
    if options.keep_reid_map and reid:
        reid_path = _write_reid_map(settings.data_path, export_id, reid)
    return summary | {"out": str(out), "reid_map": str(reid_path) if reid_path else None,
                      "pacs": options.pacs_url or None}


def _export_one(candidate: repository.DatasetCandidate, key: bytes, options: ExportOptions,
                pacs: PacsLabels | None, work: Path, tally: _Tally, archive: Archive) -> dict[str, str] | None:
    job = candidate.job_id
    if candidate.purged_at is not None:
        return _skip(tally, job, "purged")
    if not candidate.source_path:
        return _skip(tally, job, "not_kept")
    if not archive.exists(candidate.source_path):
        return _skip(tally, job, "missing")
    try:
        with archive.local_file(candidate.source_path) as path:
            ds = dcmread(path)
    except (MemoryError, ArchiveError):  # the object store failing is not the file's fault
        raise
    except Exception:  # noqa: BLE001 - whatever the bytes are, the file is not exported
        return _skip(tally, job, "unreadable")
    if (str(ds.get("SOPClassUID", "")) not in ANALYSED_SOP_CLASSES
            or str(ds.get("Manufacturer", "") or "").strip() == "cxrnode"):
        return _skip(tally, job, "not_a_radiograph")
    if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
        return _skip(tally, job, "burned_in_annotation")
    try:
        pixels = display_pixels(ds)
    except UnreadablePixels:
        return _skip(tally, job, "unreadable")
    study, sop = candidate.study_instance_uid, candidate.sop_instance_uid

    mask, label_source, quality = None, "", ""
    left = right = None
    corrected = pacs.corrected_mask(study, sop) if pacs is not None else None
    if corrected is not None:
        mask, label_source = to_export_grid(standard_view(ds, corrected), mask=True), "manual"
    elif candidate.seg_path and archive.exists(candidate.seg_path):
        try:
            with archive.local_file(candidate.seg_path) as seg_file:
                left, right = own_seg_lungs(seg_file, sop)
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged archived SEG is no label, not a failed export
            log.warning("job %d: the archived SEG cannot be read (%s): no pseudo-label", job, type(exc).__name__)
            left = right = None
    if corrected is None and left is not None and right is not None:
        left_grid = to_export_grid(standard_view(ds, left), mask=True) > 0
        right_grid = to_export_grid(standard_view(ds, right), mask=True) > 0
        score = pseudo_quality(left_grid, right_grid)
        tally.qualities.append(score)
        if score >= options.min_quality:
            mask = to_export_grid(standard_view(ds, left | right), mask=True)  # the union, resampled once
            label_source, quality = "pseudo", f"{score:.3f}"
        else:
            tally.below_quality += 1
            log.info("job %d: pseudo-label quality %.3f below %.3f, mask left out", job, score, options.min_quality)

    tb_label, tb_source = None, ""
    if options.tb_labels is not None:
        tb_label = options.tb_labels.label_for(study, str(ds.get("AccessionNumber", "") or "").strip())
        tb_source = "csv" if tb_label is not None else ""
    if tb_label is None and pacs is not None:
        tb_label = pacs.report_tb_label(study)
        tb_source = "report" if tb_label is not None else ""
    if mask is None and tb_label is None:
        return _skip(tally, job, "no_label")

    case = deid.case_id(key, sop)
    patient = deid.patient_key(ds)
    split = deid.split_of(key, patient, options.split_fractions)
    identifiers = deid.identifiers_of(ds)
    header = json.dumps(deid.kept_header(ds), indent=2, sort_keys=True) + "\n"
    deid.check_clean(header, identifiers, f"the header of job {job}")
    row = {
        "case_id": case,
        "source": (options.source if options.source is not None else candidate.calling_ae_title).strip() or "unknown",
        "image_path": f"images/{case}.png",
        "mask_path": f"masks/{case}.png" if mask is not None else "",
        "tb_label": "" if tb_label is None else str(tb_label),
        "split": split,
        "label_source": label_source,
        "label_quality": quality,
        "tb_label_source": tb_source,
    }
    deid.check_clean(_index_text([row]), identifiers, f"the index row of job {job}")
    _write_png(work / row["image_path"], to_export_grid(standard_view(ds, pixels)))
    if mask is not None:
        _write_png(work / row["mask_path"], mask)
    _write_text(work / "headers" / f"{case}.json", header)

    tally.exported += 1
    tally.labels[label_source or "none"] += 1
    tally.tb[tb_source or "unknown"] += 1
    tally.splits[split] += 1
    tally.patients.add(patient)
    return row


def _skip(tally: _Tally, job_id: int, reason: str) -> None:
    tally.skipped[reason] += 1
    log.info("job %d not exported: %s", job_id, reason)


def _index_text(rows: list[dict[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=INDEX_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _summary(export_id: str, options: ExportOptions, tally: _Tally, pacs: PacsLabels | None) -> dict[str, Any]:
    qualities = tally.qualities
    return {
        "export_id": export_id,
        "selected": tally.selected,
        "exported": tally.exported,
        "skipped": {reason: tally.skipped[reason] for reason in SKIP_REASONS},
        "labels": {source: tally.labels[source] for source in ("manual", "pseudo", "none")},
        "min_pseudo_quality": options.min_quality,
        "left_out_below_quality": tally.below_quality,
        "pseudo_quality": ({"min": min(qualities), "mean": round(float(np.mean(qualities)), 3),
                            "max": max(qualities)} if qualities else None),
        "tb_labels": {source: tally.tb[source] for source in ("csv", "report", "unknown")},
        "tb_csv_rows": options.tb_labels.rows if options.tb_labels is not None else None,
        "tb_csv_unmatched": options.tb_labels.unmatched_keys if options.tb_labels is not None else None,
        "splits": {name: tally.splits[name] for name in DATASET_SPLITS},
        "split_fractions": list(options.split_fractions),
        "patients": len(tally.patients),
        "image_size": EXPORT_SIZE,
        "corrected_segs_from_pacs": pacs is not None,
        "deidentification": deid.DEIDENTIFICATION_METHOD,
    }


def _write_reid_map(data_dir: Path, export_id: str, rows: list[tuple[str, ...]]) -> Path:
    """``<data_dir>/exports/<export_id>.reid.csv``, 0600 in a 0700 folder, created new."""
    folder = Path(data_dir) / "exports"
    make_private_dirs(folder)
    path = folder / f"{export_id}.reid.csv"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(REID_COLUMNS)
        writer.writerows(rows)
        handle.flush()
        os.fsync(handle.fileno())
    return path
