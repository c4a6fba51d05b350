"""``cxrnode db upgrade``: apply the queue's schema migrations (the node also does this at start-up),
on the SQLite file in the data folder or the PostgreSQL database of ``[queue] url``."""

from __future__ import annotations

import argparse

from node.cli.render import emit
from node.queue import migrate
from node.queue.db import make_engine
from node.settings import load_settings


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    engine = make_engine(settings.data_path, url=settings.queue.url, upgrade_schema=False)
    try:
        before, after = migrate.upgrade(engine)
    finally:
        engine.dispose()
    changed = before != after
    emit({"from_revision": before, "to_revision": after, "upgraded": changed}, args.json,
         f"queue schema upgraded from {before or 'empty'} to {after}" if changed
         else f"queue schema already at {after}")
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    db = sub.add_parser("db", help="the queue database").add_subparsers(
        dest="db_command", required=True, metavar="ACTION")
    p = db.add_parser("upgrade", parents=[common], help="apply schema migrations (also done at start-up)")
    p.set_defaults(func=cmd_db_upgrade)
