"""``cxrnode audit --since``: a duration ago or an ISO 8601 time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from node.cli.audit import parse_since
from node.errors import NodeError

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("text", "ago"), [
    ("2h", timedelta(hours=2)), ("30m", timedelta(minutes=30)), ("1d12h", timedelta(hours=36)),
    ("45s", timedelta(seconds=45)), ("1w", timedelta(weeks=1)),
])
def test_durations(text: str, ago: timedelta) -> None:
    assert parse_since(text, NOW) == NOW - ago


def test_iso_times_naive_is_utc() -> None:
    assert parse_since("2026-02-28T08:30:00") == datetime(2026, 2, 28, 8, 30, tzinfo=UTC)
    assert parse_since("2026-02-28") == datetime(2026, 2, 28, tzinfo=UTC)
    assert parse_since("2026-02-28T10:30:00+02:00") == \
        datetime(2026, 2, 28, 10, 30, tzinfo=timezone(timedelta(hours=2)))


@pytest.mark.parametrize("text", ["", "yesterday", "2x", "h", "12/04/2026"])
def test_nonsense_is_refused(text: str) -> None:
    with pytest.raises(NodeError, match="--since"):
        parse_since(text)
