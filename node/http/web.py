"""The admin pages, served at ``/`` by the HTTP server of the process that listens (``[web]``).

Read-mostly HTML (Starlette + Jinja2 templates in ``node/http/templates``, one small stylesheet,
no JavaScript), built from the same repository calls as the ``cxrnode`` commands:

- ``/``: jobs per state and the oldest waiting job (``cxrnode status``), the disk, the recent jobs
  with their state, TB score and timings; ``/?state=failed`` filters (``cxrnode jobs list``);
- ``/jobs/{id}``: one job's every step, results and deliveries (``cxrnode jobs show``), its
  preview, and for a failed job a retry form;
- ``/jobs/{id}/preview.png``: the archived radiograph with the node's lungs and TB score
  (:func:`node.results.preview.result_preview` from the archived source, SEG and SR, as
  ``jobs show --preview`` draws it; the archived Secondary Capture when the job has no SEG and SR).
  Rendered on request, one at a time, the last few kept in memory; never written to disk, so the
  retention purge stays the only keeper of patient pixels;
- ``POST /jobs/{id}/retry``: :func:`node.queue.repository.retry`, as ``cxrnode jobs retry`` does,
  for failed jobs only. It needs ``[web] token``, typed into the form (sent in the POST body) or
  sent in the ``X-Cxrnode-Token`` header, compared in constant time; never read from a URL. The
  page never holds the token, so another site cannot forge the POST (no cookie carries any
  authority); an empty token disables the action. Refused: 403 and nothing changes;
- ``/audit``: associations and job steps by time (``cxrnode audit``), newest first, ``?since=``;
- ``/static/admin.css``, ``/static/favicon.svg``.

No patient identifiers: the queue holds none, and the pages show UIDs, job ids and AE titles only.
With ``[web] show_patient_data = true`` a job's page also reads Patient ID and Patient Name from
the archived image's header. The preview burns in the TB result, the model and "NOT FOR
DIAGNOSIS", never a header value (:mod:`node.results.picture`); the radiograph's own pixels are
shown as they are, so text a modality burned into them shows too.

Only processes that listen (``cxrnode serve``) serve the pages: they are the node's one address.
Every page is sent with ``Cache-Control: no-store`` and a Content-Security-Policy that allows
nothing but this server's own stylesheet, images and forms, and no framing.
"""

from __future__ import annotations

import io
import logging
import secrets
import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jinja2
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.templating import Jinja2Templates

from node.archive import Archive, Stored
from node.cli.render import age, human_bytes, iso
from node.errors import NodeError
from node.http.app import HttpContext
from node.http.server import role_listens
from node.queue import audit, repository
from node.queue.states import InvalidTransition, JobStatus
from node.queue.tables import Job

log = logging.getLogger(__name__)

#: The header a script may send the token in, instead of the form field ``token``.
TOKEN_HEADER = "x-cxrnode-token"
#: Largest retry POST body read, bytes (a form with one field is far smaller).
MAX_FORM_BYTES = 4096
#: Rendered previews kept in memory (a PNG is ~1 MB).
PREVIEW_CACHE_SIZE = 8
#: The disk figures (which walk the archive) are measured at most this often, seconds.
DISK_CACHE_S = 30.0
#: Entries the audit page shows at most.
AUDIT_LIMIT = 1000
#: The files under ``/static/`` (package data in ``node/http/static``) and their media types.
STATIC_FILES = {"admin.css": "text/css", "favicon.svg": "image/svg+xml"}

SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                                "frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# ----- what the templates show -----

def when(value: datetime | None) -> str:
    """UTC time to the second: ``2026-01-31 14:05:09``; ``-`` for none."""
    text = iso(value)
    return "-" if text is None else text.replace("T", " ").removesuffix("+00:00")


def seconds_text(seconds: float | None) -> str:
    """``0.84 s``, ``12.3 s``, ``4 min 05 s``, ``2 h 03 min``, ``3 d 4 h``; ``-`` for none."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
    return f"{whole // 86400} d {whole % 86400 // 3600} h"


def duration(start: datetime | None, end: datetime | None) -> str:
    return "-" if start is None or end is None else seconds_text((end - start).total_seconds())


def score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def preview_files(job: Job, archive: Archive) -> tuple[list[Stored] | None, str]:
    """The archived objects a job's preview is drawn from (source, SEG, SR; or the SC alone), or
    None and why there is no preview, in words for the page."""
    if job.purged_at is not None:
        return None, f"{repository.purged_message(job)}: there is no preview."
    seg, sr, sc = job.result("seg"), job.result("sr"), job.result("sc")
    if seg is None or sr is None:
        if sc is not None:
            keys = [sc.path]
        elif job.status == JobStatus.DISCARDED:
            return None, ("The job was discarded, so it has no results and no preview"
                          + (f" (reason: {job.discard_reason})." if job.discard_reason else "."))
        elif job.status == JobStatus.FAILED:
            return None, (f"The job failed before its results were made ({job.fail_stage or 'inference'}): "
                          "no preview.")
        else:
            return None, f"No results yet (state {job.status}): the preview appears once the job is encoded."
    else:
        keys = [job.instance.path, seg.path, sr.path]
    found = []
    for key in keys:
        size = archive.size(key)
        if size is None:
            return None, f"An archived file is missing ({key}): no preview."
        found.append(Stored(key, size))
    return found, ""


def render_preview(archive: Archive, objects: list[Stored]) -> bytes:
    """The PNG of :func:`preview_files`' objects (ValueError when they cannot be drawn)."""
    with archive.local_files(item.key for item in objects) as files:
        return _render(files)


def _render(files: list[Path]) -> bytes:
    from PIL import Image

    if len(files) == 3:
        from node.results.preview import result_preview

        picture = result_preview(*files)
    else:
        from pydicom import dcmread

        sc = dcmread(files[0])
        picture = Image.fromarray(sc.pixel_array, mode="RGB")
    out = io.BytesIO()
    picture.save(out, format="PNG", optimize=False, compress_level=3)
    return out.getvalue()


def patient_data(job: Job, archive: Archive) -> dict[str, str] | None:
    """Patient ID and Patient Name from the archived image's header, if it is still there."""
    if job.purged_at is not None or not job.instance.path or not archive.exists(job.instance.path):
        return None
    from pydicom import dcmread

    try:
        with archive.local_file(job.instance.path) as path:
            header = dcmread(path, stop_before_pixels=True, specific_tags=["PatientID", "PatientName"])
    except Exception as exc:  # noqa: BLE001 - the page says it could not be read
        log.warning("web: job %d: cannot read the archived header: %s", job.id, type(exc).__name__)
        return None
    return {"id": str(header.get("PatientID", "") or ""), "name": str(header.get("PatientName", "") or "")}


class _Previews:
    """Rendered previews: at most one rendering at a time, the last few kept in memory."""

    def __init__(self, archive: Archive, size: int = PREVIEW_CACHE_SIZE) -> None:
        self.archive, self.size = archive, size
        self._cache: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, job_id: int, objects: list[Stored]) -> bytes:
        key = (job_id, *objects)  # keys and sizes: a re-analysis writes new bytes under the same keys
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            png = render_preview(self.archive, objects)
            self._cache[key] = png
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
            return png


class _Disk:
    """:func:`node.cli.admin.disk_status`, measured at most every :data:`DISK_CACHE_S` seconds."""

    def __init__(self, context: HttpContext) -> None:
        self.context = context
        self._value: dict[str, Any] | None = None
        self._at = 0.0
        self._lock = threading.Lock()

    def get(self) -> dict[str, Any] | None:
        from node.cli.admin import disk_status

        with self._lock:
            if self._value is None or time.monotonic() - self._at > DISK_CACHE_S:
                try:
                    self._value = disk_status(self.context.settings, self.context.db, self.context.archive)
                    self._value["measured_at"] = datetime.now(UTC)
                except OSError as exc:
                    log.warning("web: cannot measure the disk: %s", exc)
                    return None
                self._at = time.monotonic()
            return self._value


def _templates() -> Jinja2Templates:
    env = jinja2.Environment(loader=jinja2.PackageLoader("node.http", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(when=when, ago=age, bytes=human_bytes, score=score)
    env.globals.update(duration=duration, states=[s.value for s in JobStatus])
    return Jinja2Templates(env=env)


def _secure(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def routes(context: HttpContext) -> list[BaseRoute]:
    """The admin pages, in processes that listen and with ``[web] enabled``; none otherwise."""
    web = context.settings.web
    if not web.enabled or not role_listens(context.role):
        return []
    templates = _templates()
    previews, disk = _Previews(context.archive), _Disk(context)
    db = context.db
    static = {name: (resources.files("node.http").joinpath("static", name).read_bytes(), media_type)
              for name, media_type in STATIC_FILES.items()}
    log.info("web: admin pages at / of the HTTP server (retry %s, patient data %s)",
             "enabled: [web] token is set" if web.token else "disabled: [web] token is empty",
             "shown" if web.show_patient_data else "hidden")

    def page(request: Request, name: str, status_code: int = 200, **values: Any) -> Response:
        values.setdefault("title", "cxrnode")
        response = templates.TemplateResponse(
            request, name, {"ae_title": context.settings.node.ae_title, "now": datetime.now(UTC), **values},
            status_code=status_code)
        return _secure(response)

    def problem(request: Request, status_code: int, title: str, message: str, job_id: int | None = None) -> Response:
        return page(request, "problem.html", status_code, title=title, message=message, job_id=job_id)

    def job_or_none(job_id: int) -> Job | None:
        try:
            return repository.get_job(db, job_id)
        except repository.JobNotFound:
            return None

    def index(request: Request) -> Response:
        state_text = request.query_params.get("state", "")
        state: JobStatus | None = None
        if state_text:
            try:
                state = JobStatus(state_text)
            except ValueError:
                return problem(request, 400, "Unknown state",
                               f"There is no job state {state_text!r}; the states are "
                               f"{', '.join(s.value for s in JobStatus)}.")
        status = repository.queue_status(db)
        jobs = repository.list_jobs(db, state, limit=web.recent_jobs)
        return page(request, "index.html", title="cxrnode: overview", status=status, state=state_text,
                    jobs=jobs, disk=disk.get(), recent_jobs=web.recent_jobs)

    def job_page(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        job = job_or_none(job_id)
        if job is None:
            return problem(request, 404, "No such job", f"There is no job {job_id}.")
        files, no_preview = preview_files(job, context.archive)
        return page(request, "job.html", title=f"cxrnode: job {job.id}", job=job,
                    preview=files is not None, no_preview=no_preview,
                    retry_enabled=bool(web.token), retried=request.query_params.get("retried") == "1",
                    show_patient_data=web.show_patient_data,
                    patient=patient_data(job, context.archive) if web.show_patient_data else None,
                    purged=repository.purged_message(job) if job.purged_at is not None else "")

    def preview(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        job = job_or_none(job_id)
        if job is None:
            return _secure(PlainTextResponse(f"no job {job_id}", status_code=404))
        files, why = preview_files(job, context.archive)
        if files is None:
            return _secure(PlainTextResponse(why, status_code=410 if job.purged_at is not None else 404))
        try:
            png = previews.get(job.id, files)
        except (ValueError, OSError) as exc:
            log.warning("web: job %d: cannot draw the preview: %s", job.id, exc)
            return _secure(PlainTextResponse(f"job {job.id}: cannot draw the preview: {exc}", status_code=500))
        return _secure(Response(png, media_type="image/png"))

    async def retry(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        client = request.client.host if request.client else "?"
        if not web.token:
            return problem(request, 403, "Retry is disabled",
                           "Retrying from these pages is disabled because [web] token is empty. Set it "
                           f"(at least 16 characters, or CXRNODE_WEB_TOKEN) and restart the node, or run "
                           f"`cxrnode jobs retry {job_id}`. Nothing was changed.", job_id)
        given = request.headers.get(TOKEN_HEADER)
        if given is None:
            given = await _form_token(request)
        if given is None or not secrets.compare_digest(given.encode(), web.token.encode()):
            log.warning("web: retry of job %d refused: %s token from %s", job_id,
                        "no" if not given else "a wrong", client)
            return problem(request, 403, "Retry refused",
                           "The token is missing or wrong ([web] token). Nothing was changed.", job_id)
        outcome = await run_in_threadpool(_retry_failed, db, job_id)
        if isinstance(outcome, tuple):
            status_code, message = outcome
            return problem(request, status_code, "Not retried", message, job_id if status_code != 404 else None)
        log.info("web: job %d retried from the admin page by %s: back to %s", job_id, client, outcome)
        return _secure(RedirectResponse(f"/jobs/{job_id}?retried=1", status_code=303))

    def audit_page(request: Request) -> Response:
        from node.cli.audit import parse_since

        since_text = request.query_params.get("since", "").strip()
        since = None
        if since_text:
            try:
                since = parse_since(since_text)
            except NodeError as exc:
                return problem(request, 400, "Bad time", str(exc).replace("--since: ", "since: "))
        entries = audit.trail(db, since, limit=AUDIT_LIMIT)
        entries.reverse()
        return page(request, "audit.html", title="cxrnode: audit", entries=entries, since=since_text,
                    since_at=since, limit=AUDIT_LIMIT)

    def static_file(request: Request) -> Response:
        found = static.get(request.path_params["name"])
        if found is None:
            return _secure(PlainTextResponse("not found", status_code=404))
        content, media_type = found
        return Response(content, media_type=media_type,
                        headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"})

    return [Route("/", index, methods=["GET"]),
            Route("/jobs/{job_id:int}", job_page, methods=["GET"]),
            Route("/jobs/{job_id:int}/preview.png", preview, methods=["GET"]),
            Route("/jobs/{job_id:int}/retry", retry, methods=["POST"]),
            Route("/audit", audit_page, methods=["GET"]),
            Route("/static/{name}", static_file, methods=["GET"])]


async def _form_token(request: Request) -> str | None:
    """The ``token`` field of a urlencoded POST body (at most :data:`MAX_FORM_BYTES`), else None.

    Parsed here rather than with ``request.form()``, which needs python-multipart for one field.
    """
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    values = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True).get("token")
    return values[0] if values else None


def _retry_failed(db: Any, job_id: int) -> JobStatus | tuple[int, str]:
    """:func:`repository.retry` for a failed job: its new state, or (HTTP status, why not)."""
    try:
        job = repository.get_job(db, job_id)
        if job.status != JobStatus.FAILED:
            return 409, (f"Job {job_id} is {job.status}, not failed: only failed jobs are retried here "
                         f"(`cxrnode jobs retry {job_id}` retries a discarded one). Nothing was changed.")
        return repository.retry(db, job_id)
    except repository.JobNotFound:
        return 404, f"There is no job {job_id}."
    except repository.FilesPurged as exc:
        return 409, f"{exc}. Nothing was changed."
    except InvalidTransition as exc:
        return 409, f"Job {job_id}: {exc}. Nothing was changed."

