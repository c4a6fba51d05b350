"""Fixtures of the robustness tests: the networks once per session, a fresh node per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.robustness.harness import LocalNode

if TYPE_CHECKING:
    from models.inference import LungAnalyzer


@pytest.fixture(scope="session")
def analyzer() -> LungAnalyzer:
    """The shipped networks on the CPU, loaded (and checksummed) once for the whole session."""
    from models.inference import LungAnalyzer

    return LungAnalyzer.load("unet", device="cpu")


@pytest.fixture
def node(tmp_path: Path, analyzer: LungAnalyzer) -> Iterator[LocalNode]:
    """Listener + worker in-process; the test drives the worker with ``node.process()``."""
    local = LocalNode.start(tmp_path / "var", analyzer)
    yield local
    local.stop()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[LocalNode]:
    """Listener only (no networks): for the store-handler cases."""
    local = LocalNode.start(tmp_path / "var", None)
    yield local
    local.stop()
