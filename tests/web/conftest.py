"""Fixtures for tests that look at the node's admin pages in headless Chromium.

``browser`` (session): :func:`tests.web.browser.open_page`, once Chromium, Node.js and
puppeteer-core are known to be there; a missing piece fails the test with the way to get it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.viewer.ohif import ViewerUnavailable
from tests.web.browser import check_browser, open_page


@pytest.fixture(scope="session")
def browser() -> Callable[..., dict[str, Any]]:
    problem: ViewerUnavailable | None = None
    try:
        check_browser()
    except ViewerUnavailable as error:
        problem = error
    if problem is not None:
        pytest.fail(f"{type(problem).__name__}: {problem}", pytrace=False)
    return open_page
