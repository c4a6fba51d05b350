"""``cxrnode archive purge [--dry-run]``: delete what ``[retention]`` no longer keeps (see :mod:`node.retention`)."""

from __future__ import annotations

import argparse
from typing import Any

from node.archive import open_archive
from node.cli.admin import _db
from node.cli.render import emit, human_bytes, table
from node.settings import load_settings


def render(report: dict[str, Any]) -> str:
    images, results, history = report["images"], report["results"], report["history"]
    rows = [
        ("images", images["jobs"], images["files"], "-", human_bytes(images["bytes"])),
        ("results", results["jobs"], results["files"], "-", human_bytes(results["bytes"])),
        ("history", history["jobs"], "-", history["rows"], "-"),
        ("audit", "-", "-", report["audit"]["rows"], "-"),
        ("tmp", "-", report["tmp"]["files"], "-", human_bytes(report["tmp"]["bytes"])),
    ]
    verb = "would delete (dry run, nothing deleted)" if report["dry_run"] else "deleted"
    cutoffs = ", ".join(f"{k} ended before {v}" if v else f"{k} kept for ever"
                        for k, v in report["cutoffs"].items())
    return (f"retention purge {verb}:\n"
            + table(["category", "jobs", "files", "rows", "bytes"], rows)
            + f"\n\n{cutoffs}; failed jobs {'kept' if report['retention']['keep_failed'] else 'purged too'}, "
              "pinned and undelivered jobs kept")


def cmd_archive_purge(args: argparse.Namespace) -> int:
    from node import retention

    settings = load_settings(args.config)
    db = _db(args)
    try:
        report = retention.purge(settings, db, open_archive(settings), dry_run=args.dry_run)
    finally:
        db.dispose()
    emit(report, args.json, render(report))
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    archive = sub.add_parser("archive", help="the archive of received images and results").add_subparsers(
        dest="archive_command", required=True, metavar="ACTION")
    p = archive.add_parser("purge", parents=[common],
                           help="delete images, results, history and audit rows past [retention]")
    p.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    p.set_defaults(func=cmd_archive_purge)
