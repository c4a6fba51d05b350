"""``cxrnode audit``: who talked to the node and what happened to every job, merged by time."""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime, timedelta

from node.cli.admin import _db
from node.cli.render import emit, iso, table
from node.errors import NodeError
from node.queue import audit

_DURATION = re.compile(r"^(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """``2h``, ``1d12h``, ``90m``, ``30s``, ``1w`` ago, or an ISO 8601 time (naive = UTC)."""
    text = value.strip()
    match = _DURATION.match(text)
    if text and match and any(match.groups()):
        weeks, days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
        delta = timedelta(weeks=weeks, days=days, hours=hours, minutes=minutes, seconds=seconds)
        return (now or datetime.now(UTC)) - delta
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise NodeError(f"--since: {value!r} is neither a duration (2h, 30m, 1d) "
                        "nor an ISO 8601 time") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def cmd_audit(args: argparse.Namespace) -> int:
    since = parse_since(args.since) if args.since else None
    entries = audit.trail(_db(args), since, limit=args.limit)
    data = [{"at": iso(e.at), "kind": e.kind, "subject": e.subject, "what": e.what,
             "detail": e.detail} | e.data for e in entries]
    human = table(["at", "subject", "what", "detail"],
                  [(iso(e.at), e.subject, e.what, e.detail) for e in entries])
    emit(data, args.json, human if entries else "no audit entries")
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("audit", parents=[common],
                       help="associations and job steps, merged by time")
    p.add_argument("--since", metavar="TIME",
                   help="ISO 8601 time (UTC unless it has an offset) or a duration ago: 2h, 30m, 1d")
    p.add_argument("--limit", type=int, default=1000, help="most recent entries (default 1000)")
    p.set_defaults(func=cmd_audit)
