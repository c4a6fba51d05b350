"""``cxrnode``: run the node, inspect and repair its queue, train and evaluate its models.

Every command takes ``--config FILE`` (default: ``$CXRNODE_CONFIG``, else built-in defaults).
Errors are one readable line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from sqlalchemy.exc import DBAPIError

from node.errors import NodeError
from node.settings import Settings, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def cmd_serve(args: argparse.Namespace) -> int:
    from node import logs
    from node.service import Service, parse_roles

    settings = _settings(args)
    if args.role:
        roles = parse_roles(args.role)
    else:  # every role; the worker (and its sender) unless [worker] enabled = false
        roles = frozenset({"receiver", "worker", "sender"} if settings.worker.enabled else {"receiver"})
    logs.configure(settings.node.log_level, settings.data_path)
    return Service(settings, listen="receiver" in roles, work="worker" in roles, send="sender" in roles).run()


def cmd_worker(args: argparse.Namespace) -> int:
    args.role = "worker,sender"
    return cmd_serve(args)


def cmd_config_check(args: argparse.Namespace) -> int:
    from node.cli.render import emit
    from node.settings import describe

    settings = _settings(args)
    emit(describe(settings), args.json, f"configuration OK ({settings.source})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from node import __version__
    from node.cli import admin, archive, audit, dataset, db

    parser = argparse.ArgumentParser(prog="cxrnode", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"cxrnode {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="settings file (TOML)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", parents=[common], help="receive, analyse and send (the node)")
    p.add_argument("--role", metavar="R[,R...]",
                   help="run only these roles: receiver (the DICOM listener), worker (the networks), sender "
                        "(results to the destinations); default all. Any number of each may share one "
                        "queue ([queue] url) and archive ([archive] url), on any hosts")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("worker", parents=[common], help="analyse and send only, against the same queue")
    p.set_defaults(func=cmd_worker)
    admin.register(sub, common)
    audit.register(sub, common)
    db.register(sub, common)
    archive.register(sub, common)
    dataset.register(sub, common)
    from node.cli import models as models_cli

    models_cli.register(sub, common)
    config = sub.add_parser("config", help="check the configuration").add_subparsers(
        dest="config_command", required=True, metavar="ACTION")
    p = config.add_parser("check", parents=[common], help="validate and print the settings")
    p.set_defaults(func=cmd_config_check)

    try:
        from models import commands as model_commands
    except ImportError:  # pragma: no cover - models package not installed
        model_commands = None
    if model_commands is not None:
        model_commands.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.umask(0o077)  # archive, queue database, its -wal/-shm files and logs: service user only
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except NodeError as exc:
        print(f"cxrnode: error: {exc}", file=sys.stderr)
        return 2
    except DBAPIError as exc:  # the queue database is unreachable, locked, or refuses the login
        from node.loop import describe

        reason = " ".join(describe(exc).split())  # the server's hint lines folded into one
        print(f"cxrnode: error: the queue database cannot be used: {reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
