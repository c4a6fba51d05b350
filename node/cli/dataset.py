"""``cxrnode dataset export --out DIR``: a de-identified training set from the archive (see :mod:`node.dataset`)."""

from __future__ import annotations

import argparse
import math
import re
from typing import Any

from node.cli.admin import _db
from node.cli.audit import parse_since
from node.cli.render import emit
from node.errors import NodeError, SettingsError
from node.queue.states import JobStatus
from node.settings import DATASET_SPLITS, check_split_fractions, load_settings


def parse_time(flag: str, value: str):  # type: ignore[no-untyped-def]
    """``2h``/``7d`` ago or an ISO 8601 time (UTC unless it has an offset); errors name ``flag``."""
    try:
        return parse_since(value)
    except NodeError:
        raise NodeError(f"{flag}: {value!r} is neither a duration (2h, 30m, 7d) nor an ISO 8601 time") from None


def parse_fractions(value: str) -> tuple[float, ...]:
    """``80/10/10``, ``0.8,0.1,0.1`` or ``8:1:1``: shares of train, val and test, scaled to add up to 1."""
    parts = [p for p in re.split(r"[/,:\s]+", value.strip()) if p]
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        numbers = []
    total = sum(numbers)
    if len(numbers) != len(DATASET_SPLITS) or not math.isfinite(total) or total <= 0 or min(numbers) < 0:
        raise NodeError(f"--split-fractions: {value!r} is not {len(DATASET_SPLITS)} non-negative shares "
                        f"({'/'.join(DATASET_SPLITS)}, e.g. 80/10/10)")
    try:
        return check_split_fractions("--split-fractions", tuple(n / total for n in numbers))
    except SettingsError as exc:
        raise NodeError(str(exc)) from None


def _unit_interval(flag: str, value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise NodeError(f"{flag}: must be in 0..1, got {value}")
    return value


def render(summary: dict[str, Any]) -> str:
    skipped = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items() if v) or "none"
    labels, tb, splits = summary["labels"], summary["tb_labels"], summary["splits"]
    quality = summary["pseudo_quality"]
    lines = [
        (f"export {summary['export_id']}: {summary['exported']} of {summary['selected']} selected radiographs "
         f"written to {summary['out']} ({summary['patients']} patients)"),
        (f"masks: manual {labels['manual']}, pseudo {labels['pseudo']}, none {labels['none']}; "
         f"{summary['left_out_below_quality']} pseudo-labels left out below quality {summary['min_pseudo_quality']}"
         + (f" (quality min {quality['min']}, mean {quality['mean']})" if quality else "")),
        (f"TB labels: csv {tb['csv']}, report {tb['report']}, unknown {tb['unknown']}"
         + (f"; {summary['tb_csv_unmatched']} CSV keys matched no exported image"
            if summary["tb_csv_unmatched"] else "")),
        "splits: " + ", ".join(f"{k} {v}" for k, v in splits.items()),
        f"skipped: {skipped}",
        f"re-identification map: {summary['reid_map'] or 'not kept'}",
    ]
    return "\n".join(lines)


def cmd_dataset_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from node.dataset.export import ExportOptions, export
    from node.dataset.labels import TbLabelCsv

    settings = load_settings(args.config)
    dataset = settings.dataset
    pacs_url = (args.pacs_url if args.pacs_url is not None else dataset.dicomweb_url).strip().rstrip("/")
    if pacs_url and not re.match(r"^https?://[^\s/]+", pacs_url):
        raise NodeError(f"--pacs-url: {pacs_url!r} is not an http:// or https:// URL")
    if args.limit is not None and args.limit < 1:
        raise NodeError("--limit: must be at least 1")
    outcome = "accepted" if args.accepted else "discarded" if args.discarded else None
    states = tuple(args.state) if args.state else (("discarded",) if args.discarded else ("done",))
    options = ExportOptions(
        out=Path(args.out),
        states=states,
        since=parse_time("--since", args.since) if args.since else None,
        until=parse_time("--until", args.until) if args.until else None,
        calling_ae_titles=tuple(args.calling_ae or ()),
        tb_min=_unit_interval("--tb-min", args.tb_min),
        tb_max=_unit_interval("--tb-max", args.tb_max),
        outcome=outcome,
        limit=args.limit,
        min_quality=_unit_interval("--min-quality", args.min_quality
                                   if args.min_quality is not None else dataset.min_pseudo_quality),
        tb_labels=TbLabelCsv.load(args.tb_labels) if args.tb_labels else None,
        pacs_url=pacs_url,
        pacs_timeout_s=dataset.dicomweb_timeout_s,
        split_fractions=parse_fractions(args.split_fractions) if args.split_fractions else dataset.split_fractions,
        source=args.source,
        keep_reid_map=dataset.keep_reid_map and not args.no_reid_map,
    )
    db = _db(args)
    try:
        summary = export(settings, db, options)
    finally:
        db.dispose()
    emit(summary, args.json, render(summary))
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    dataset = sub.add_parser("dataset", help="training sets from the archive").add_subparsers(
        dest="dataset_command", required=True, metavar="ACTION")
    p = dataset.add_parser(
        "export", parents=[common],
        help="archived radiographs as a de-identified training set (index.csv + 512 px PNGs)",
        description="Write the selected archived radiographs as a de-identified training set in the index.csv "
                    "layout that `cxrnode train` and `cxrnode evaluate` read. Masks: a radiologist-corrected "
                    "SEG from the PACS (DICOMweb) when there is one, else the node's own as a pseudo-label "
                    "with a quality score. TB labels: --tb-labels CSV or verified reports in the PACS, never "
                    "the node's own score.")
    p.add_argument("--out", required=True, metavar="DIR", help="new or empty folder to write the export to")
    p.add_argument("--since", metavar="TIME", help="received at or after: ISO 8601 time or a duration ago (7d)")
    p.add_argument("--until", metavar="TIME", help="received before: ISO 8601 time or a duration ago")
    p.add_argument("--state", action="append", choices=[s.value for s in JobStatus],
                   help="job state, repeatable (default: done; discarded with --discarded)")
    p.add_argument("--calling-ae", action="append", metavar="AE",
                   help="only images sent by this calling AE title (repeatable)")
    p.add_argument("--tb-min", type=float, metavar="SCORE", help="only jobs whose TB score is at least this")
    p.add_argument("--tb-max", type=float, metavar="SCORE", help="only jobs whose TB score is at most this")
    outcome = p.add_mutually_exclusive_group()
    outcome.add_argument("--accepted", action="store_true", help="only images the acceptance rules accepted")
    outcome.add_argument("--discarded", action="store_true",
                         help="only images the acceptance rules discarded (their bytes kept)")
    p.add_argument("--limit", type=int, metavar="N", help="at most N images, the most recently received")
    p.add_argument("--min-quality", type=float, metavar="Q",
                   help="leave out pseudo-labels scoring below Q, 0..1 (default: [dataset] min_pseudo_quality)")
    p.add_argument("--tb-labels", metavar="FILE.csv",
                   help="TB labels: columns study_instance_uid and/or accession_number, tb_label (0/1)")
    p.add_argument("--pacs-url", metavar="URL",
                   help="DICOMweb base URL for corrected SEGs and verified reports (default: [dataset] "
                        "dicomweb_url; none: pseudo-labels only)")
    p.add_argument("--split-fractions", metavar="T/V/T",
                   help="shares of patients in train/val/test (default: [dataset] split_fractions, 80/10/10)")
    p.add_argument("--source", metavar="NAME", help="`source` of every row (default: the calling AE title)")
    p.add_argument("--no-reid-map", action="store_true",
                   help="keep no re-identification map (<data_dir>/exports/<export-id>.reid.csv)")
    p.set_defaults(func=cmd_dataset_export)
