"""The admin pages in headless Chromium: :func:`open_page` runs ``page.mjs`` (puppeteer-core from
``tests/viewer/node_modules``, Debian ``/usr/bin/chromium``) and returns its JSON dump; the keys
are listed in ``page.mjs``'s header. :func:`screenshot_pixels` crops a dumped box out of the
screenshot.

A missing piece (Chromium, Node.js, the npm packages) raises
:class:`tests.viewer.ohif.ViewerUnavailable` saying how to get it: these tests fail, never skip.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tests.viewer.ohif import ViewerUnavailable, chromium_path, ensure_node_modules

WEB_DIR = Path(__file__).resolve().parent
PAGE_SCRIPT = WEB_DIR / "page.mjs"


def check_browser() -> None:
    """Raise :class:`ViewerUnavailable` unless Chromium, Node.js and puppeteer-core are there."""
    chromium_path()
    ensure_node_modules()
    if shutil.which("node") is None:
        raise ViewerUnavailable("Node.js is needed for tests/web/page.mjs (Debian package 'nodejs')")


def open_page(url: str, out_dir: Path, name: str, *, fill: dict[str, str] | None = None,
              click: str | None = None, window: tuple[int, int] = (1280, 900),
              timeout_s: float = 30) -> dict[str, Any]:
    """Open ``url``, type each ``fill`` value into its selector, click ``click`` (and follow the
    navigation it starts), then dump the page: ``out_dir/<name>.png`` (full page), ``<name>.json``,
    ``<name>.log`` (the script's output)."""
    check_browser()
    node = shutil.which("node")
    assert node is not None
    out_dir.mkdir(parents=True, exist_ok=True)
    screenshot, dump, log = out_dir / f"{name}.png", out_dir / f"{name}.json", out_dir / f"{name}.log"
    command = [node, str(PAGE_SCRIPT), "--url", url, "--screenshot", str(screenshot), "--out", str(dump),
               "--window", f"{window[0]}x{window[1]}", "--timeout-ms", str(int(timeout_s * 1000)),
               "--chromium", str(chromium_path())]
    for selector, text in (fill or {}).items():
        command += ["--fill", f"{selector}={text}"]
    if click:
        command += ["--click", click]
    started = time.monotonic()
    with open(log, "wb") as output:
        done = subprocess.run(command, cwd=WEB_DIR, stdout=output, stderr=subprocess.STDOUT, timeout=timeout_s + 60)
    if done.returncode != 0 or not dump.is_file():
        raise RuntimeError(f"page.mjs exited with {done.returncode} after {time.monotonic() - started:.1f} s:\n"
                           + log.read_text(errors="replace")[-4000:])
    result: dict[str, Any] = json.loads(dump.read_text())
    assert not result["harness_errors"], result["harness_errors"]
    return result


def screenshot_pixels(screenshot: str | Path, box: dict[str, float]) -> np.ndarray:
    """The (rows, columns, 3) RGB pixels of ``box`` (CSS px of a scale-1 full-page screenshot)."""
    image = np.asarray(Image.open(screenshot).convert("RGB"))
    x0, y0 = max(round(box["x"]), 0), max(round(box["y"]), 0)
    x1, y1 = round(box["x"] + box["width"]), round(box["y"] + box["height"])
    return image[y0:y1, x0:x1]
