"""Fixtures for tests that look at our results in OHIF v3 (headless Chromium).

* ``ohif_dist`` (session): the patched OHIF dist folder (:func:`tests.viewer.ohif.prepare_ohif_dist`).
* ``viewer_pacs`` (session): a running :class:`tests.servers.Orthanc` with DICOMweb and OHIF at
  ``viewer_pacs.base_url + "/ohif"``; upload with ``viewer_pacs.upload(path)``, build viewer URLs
  with :func:`tests.viewer.ohif.ohif_url`.
* ``drive`` (session): ``drive(url, out_dir, **opts) -> dict``, :func:`tests.viewer.ohif.drive`.

A missing piece (Chromium, Node/npm, the OHIF tarball, the Orthanc plugins) fails the test with
the reason; nothing here skips.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.servers import Orthanc
from tests.viewer import ohif


def _fail(error: Exception) -> NoReturn:
    # Called outside the ``except`` block, so the report is the message, not a chained traceback.
    pytest.fail(f"{type(error).__name__}: {error}", pytrace=False)


@pytest.fixture(scope="session")
def ohif_dist() -> Path:
    try:
        dist = ohif.prepare_ohif_dist()
    except ohif.ViewerUnavailable as error:
        problem = error
    else:
        return dist
    _fail(problem)


@pytest.fixture(scope="session")
def viewer_pacs(ohif_dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    pacs = ohif.viewer_orthanc(tmp_path_factory.mktemp("viewer-pacs"), ohif_dist)
    problem: RuntimeError | None = None
    try:
        pacs.start()
    except RuntimeError as error:
        pacs.stop()
        problem = RuntimeError(f"viewer Orthanc did not start: {error} (log: {pacs.workdir / 'orthanc.log'})")
    if problem is not None:
        _fail(problem)
    try:
        yield pacs
    finally:
        pacs.stop()


@pytest.fixture(scope="session")
def drive() -> Callable[..., dict[str, Any]]:
    problem: ohif.ViewerUnavailable | None = None
    try:
        ohif.chromium_path()
        ohif.ensure_node_modules()
    except ohif.ViewerUnavailable as error:
        problem = error
    if problem is not None:
        _fail(problem)
    return ohif.drive
