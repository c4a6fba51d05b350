"""OHIF v3 in headless Chromium, for tests that assert what a real viewer shows.

The pieces (recipe: the viewer study VIEWERS.md, "Recipe that works"):

* :func:`prepare_ohif_dist` unpacks the prebuilt ``@ohif/app`` dist from npm and patches it to be
  served under ``/ohif`` (``setup_ohif.sh``); tarball and patched dist are cached in
  ``<repo>/.cache/ohif`` (gitignored).
* :func:`viewer_orthanc` is an :class:`tests.servers.Orthanc` with the DICOMweb and ServeFolders
  plugins that serves that dist at ``<base>/ohif``; OHIF's data source is the same Orthanc.
* :func:`drive` runs ``drive.mjs`` (puppeteer-core + Debian ``/usr/bin/chromium``) on an OHIF URL
  and returns its JSON dump (keys in ``drive.mjs``'s header).
* :func:`viewport_pixels` and :func:`rendered_fraction` look at the screenshot in Python.

Anything missing (Chromium, Node, the npm packages, the OHIF tarball) raises
:class:`ViewerUnavailable` with the way to fix it: these checks fail, they never skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tests.servers import ORTHANC_PLUGINS, REPO, Orthanc, free_port

__all__ = [
    "CHROMIUM",
    "OHIF_CACHE",
    "OHIF_VERSION",
    "VIEWER_DIR",
    "ViewerUnavailable",
    "chromium_path",
    "dot_free_link",
    "drive",
    "ensure_node_modules",
    "ohif_url",
    "page_xy",
    "prepare_ohif_dist",
    "rendered_fraction",
    "viewer_orthanc",
    "viewport_pixels",
]

OHIF_VERSION = "3.13.2"
VIEWER_DIR = Path(__file__).resolve().parent
#: Tarball (``npm pack @ohif/app@OHIF_VERSION``) and the patched dist; ``$CXRNODE_OHIF_CACHE`` overrides.
OHIF_CACHE = Path(os.environ.get("CXRNODE_OHIF_CACHE") or REPO / ".cache" / "ohif")
CHROMIUM = Path("/usr/bin/chromium")
SETUP_SCRIPT = VIEWER_DIR / "setup_ohif.sh"
DRIVE_SCRIPT = VIEWER_DIR / "drive.mjs"

#: ServeFolders MIME types; "" (extension-less SPA routes such as /ohif/viewer) must be HTML.
_SERVE_EXTENSIONS = {".wasm": "application/wasm", ".woff2": "font/woff2", ".mjs": "text/javascript",
                     ".map": "application/json", ".svg": "image/svg+xml", "": "text/html"}


class ViewerUnavailable(RuntimeError):
    """A piece of the browser harness is missing; the message says how to get it."""


def chromium_path() -> Path:
    """The Debian Chromium binary, or :class:`ViewerUnavailable`."""
    path = Path(os.environ.get("CXRNODE_CHROMIUM") or CHROMIUM)
    if not path.is_file() or not os.access(path, os.X_OK):
        raise ViewerUnavailable(f"Chromium not found at {path}: install the Debian package 'chromium' "
                                "(scripts/test does when run as root)")
    return path


def ensure_node_modules() -> Path:
    """``tests/viewer/node_modules`` with puppeteer-core, running ``npm ci`` when it is missing."""
    node_modules = VIEWER_DIR / "node_modules"
    if (node_modules / "puppeteer-core" / "package.json").is_file():
        return node_modules
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise ViewerUnavailable("Node.js and npm are needed for tests/viewer (Debian packages 'nodejs', 'npm')")
    env = os.environ | {"PUPPETEER_SKIP_DOWNLOAD": "1"}
    done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=VIEWER_DIR, env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise ViewerUnavailable(f"npm ci in {VIEWER_DIR} failed:\n{done.stdout}\n{done.stderr}")
    return node_modules


def prepare_ohif_dist(cache: Path = OHIF_CACHE) -> Path:
    """The patched OHIF dist folder (``cache/dist-<version>``), built by ``setup_ohif.sh`` if needed.

    The dist is rebuilt whenever ``setup_ohif.sh`` changes (its hash is stamped in the folder).
    The tarball is fetched with ``npm pack`` only when ``cache`` lacks it.
    """
    cache.mkdir(parents=True, exist_ok=True)
    dist = cache / f"dist-{OHIF_VERSION}"
    stamp = hashlib.sha256(SETUP_SCRIPT.read_bytes()).hexdigest()
    stamp_file = dist / ".cxrnode-setup-sha256"
    if stamp_file.is_file() and stamp_file.read_text().strip() == stamp and (dist / "viewer").is_file():
        return dist
    if shutil.which("npm") is None and not (cache / f"ohif-app-{OHIF_VERSION}.tgz").is_file():
        raise ViewerUnavailable(f"npm is needed to fetch @ohif/app@{OHIF_VERSION} into {cache}")
    done = subprocess.run(["bash", str(SETUP_SCRIPT), str(dist), str(cache)], capture_output=True, text=True,
                          timeout=900)
    if done.returncode != 0:
        raise ViewerUnavailable(f"could not prepare OHIF {OHIF_VERSION} (npm pack @ohif/app@{OHIF_VERSION} "
                                f"from the npm registry into {cache}):\n{done.stdout}\n{done.stderr}")
    stamp_file.write_text(stamp + "\n")
    return dist


def dot_free_link(target: Path, workdir: Path) -> Path:
    """A symbolic link to ``target`` whose absolute path has no ``.``: ``workdir/ohif`` if possible.

    Orthanc 1.10's ServeFolders takes a file's extension from the *whole* file-system path (the
    last ``.`` anywhere in it), so below a folder such as ``.cache`` or ``dist-3.13.2`` the
    extension-less routes (``/ohif/viewer``) get the wrong MIME type (application/octet-stream)
    and Chromium downloads them instead of opening OHIF.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    parent = workdir.resolve()
    if "." in str(parent):
        parent = Path(tempfile.mkdtemp(prefix="cxrnode_ohif_", dir="/tmp"))
    link = parent / "ohif"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve(), target_is_directory=True)
    return link


def viewer_orthanc(workdir: Path, ohif_dist: Path, *, http_port: int | None = None) -> Orthanc:
    """An (unstarted) Orthanc with DICOMweb at ``/dicom-web`` and OHIF served at ``/ohif``.

    ``ohif_dist`` is served through :func:`dot_free_link`. Its DICOM port is a free loopback port
    like the other test PACS; nothing else changes.
    """
    served = dot_free_link(ohif_dist, workdir / "www")
    plugins = [str(ORTHANC_PLUGINS / "libOrthancDicomWeb.so"), str(ORTHANC_PLUGINS / "libServeFolders.so")]
    return Orthanc(
        workdir, http_port or free_port(), free_port(), aet="VIEWERPACS",
        plugins=plugins,
        extra_config={
            "Name": "CXRNODE-VIEWER-PACS",
            "HttpDescribeErrors": True, "HttpCompressionEnabled": False,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                         "Ssl": False},
            # Orthanc 1.10 shape: Folders/Extensions/AllowCache nested, or "AllowCache" is taken as a folder.
            "ServeFolders": {"AllowCache": False, "GenerateETag": True, "Extensions": _SERVE_EXTENSIONS,
                             "Folders": {"/ohif": str(served)}},
        },
    )


def ohif_url(base_url: str, study_instance_uid: str, series_instance_uid: str | None = None,
             mode: str = "viewer") -> str:
    """OHIF's URL for a study; ``series_instance_uid`` opens that series first (SEG/SR: hydrated)."""
    query = {"StudyInstanceUIDs": study_instance_uid}
    if series_instance_uid:
        query["initialSeriesInstanceUID"] = series_instance_uid
    return f"{base_url.rstrip('/')}/ohif/{mode}?{urllib.parse.urlencode(query)}"


def drive(url: str, out_dir: Path, *, name: str = "ohif", wait_for: str = "image", timeout_s: float = 60,
          panel: str | None = None, window: tuple[int, int] = (1400, 1000), settle_ms: int = 1500,
          open_series: str | None = None) -> dict[str, Any]:
    """Open ``url`` in headless Chromium with ``drive.mjs`` and return its JSON dump.

    ``wait_for``: ``"image"`` (a viewport shows an image), ``"seg"`` (a segmentation is hydrated and
    its labelmap is in the cache) or ``"sr"`` (an SR is loaded: measurements listed, or timeout).
    ``panel``: ``"segmentation"`` or ``"measurements"`` opens that side panel before the dump.
    ``open_series``: a Series Instance UID to double-click in the study browser once the study's
    first image shows (how a user opens a SEG or SR); ``wait_for`` then applies to what follows.
    Writes ``out_dir/<name>.png`` (page), ``<name>.viewport.png`` (first viewport canvas),
    ``<name>.json`` (the dump) and ``<name>.log`` (drive.mjs stderr). A wait that times out is no
    error here: the dump says ``"timed_out": true`` and the test decides.
    """
    ensure_node_modules()
    chromium = chromium_path()
    node = shutil.which("node")
    if node is None:
        raise ViewerUnavailable("Node.js is needed for tests/viewer/drive.mjs")
    out_dir.mkdir(parents=True, exist_ok=True)
    screenshot, dump, log = out_dir / f"{name}.png", out_dir / f"{name}.json", out_dir / f"{name}.log"
    command = [node, str(DRIVE_SCRIPT), "--url", url, "--screenshot", str(screenshot), "--out", str(dump),
               "--wait-for", wait_for, "--timeout-ms", str(int(timeout_s * 1000)),
               "--window", f"{window[0]}x{window[1]}", "--settle-ms", str(settle_ms),
               "--chromium", str(chromium), "--user-data-dir", str(out_dir / f"{name}.profile")]
    if panel:
        command += ["--panel", panel]
    if open_series:
        command += ["--open-series", open_series]
    started = time.monotonic()
    with open(log, "wb") as stderr:
        done = subprocess.run(command, cwd=VIEWER_DIR, stdout=stderr, stderr=subprocess.STDOUT,
                              timeout=timeout_s + 90)
    shutil.rmtree(out_dir / f"{name}.profile", ignore_errors=True)
    if done.returncode != 0 or not dump.is_file():
        raise RuntimeError(f"drive.mjs exited with {done.returncode} after {time.monotonic() - started:.1f} s:\n"
                           + log.read_text(errors="replace")[-6000:])
    result: dict[str, Any] = json.loads(dump.read_text())
    result["json_path"] = str(dump)
    result["log_path"] = str(log)
    return result


def page_xy(viewport: dict[str, Any], column: float, row: float) -> tuple[float, float]:
    """Screenshot position (CSS px) of image pixel (``column``, ``row``) in a dumped ``viewport``."""
    mapping = viewport["image_to_page"]
    (x0, y0), (cx, cy), (rx, ry) = mapping["origin"], mapping["column_step"], mapping["row_step"]
    return x0 + column * cx + row * rx, y0 + column * cy + row * ry


def viewport_pixels(screenshot: str | Path, rect: dict[str, float]) -> np.ndarray:
    """The (rows, columns, 3) RGB pixels of ``rect`` (``x, y, width, height`` in CSS px, scale 1)."""
    image = np.asarray(Image.open(screenshot).convert("RGB"))
    x0, y0 = max(int(rect["x"]), 0), max(int(rect["y"]), 0)
    x1, y1 = int(rect["x"] + rect["width"]), int(rect["y"] + rect["height"])
    return image[y0:y1, x0:x1]


def rendered_fraction(pixels: np.ndarray, threshold: int = 24) -> float:
    """Fraction of pixels brighter than ``threshold`` in any channel (0: an all-black viewport)."""
    if pixels.size == 0:
        return 0.0
    return float((pixels.max(axis=-1) > threshold).mean())
