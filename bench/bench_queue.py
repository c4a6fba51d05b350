"""The job queue alone, on SQLite and on PostgreSQL, with 1, 2, 4 and 8 concurrent workers.

No DICOM, no files, no analysis: only the queue's own calls, the ones the node makes, in the
order it makes them. Each round starts from a fresh queue (a new SQLite file in a temporary
folder; a new database on one PostgreSQL server started for the run) and:

1. fills it with ``--jobs`` jobs as the listener does for each C-STORE
   (:func:`repository.known_instance`, then :func:`repository.enqueue`), one process, timed:
   the single-listener enqueue rate;
2. worker stage: ``W`` workers claim queued jobs and complete them as
   :meth:`node.worker.runner.InferenceWorker.run_once` does, with no analysis in between:
   ``claim`` (queued -> processing, with a lease), ``metrics.job_claimed`` (reads the row back),
   ``instance_of``, a :class:`LeaseKeeper` around the (empty) work, ``note("infer ok")``,
   ``mark_encoded`` (a SEG and an SR result row, one delivery) -> encoded;
3. sender stage: ``W`` senders as :meth:`node.sender.runner.Sender.run_once` does, no C-STORE:
   ``claim`` (encoded -> sending), ``get_job``, ``pending_deliveries``, ``record_delivery``
   (stored), ``finish_sending`` -> done.

Jobs/s of a stage = jobs / (the last worker's end - the moment all were told to start); every
worker has opened its ``Database`` and a connection before that moment. A worker stops at its
first empty claim. ``--mode processes`` (the default): ``W`` separate OS processes (``spawn``),
each with its own ``Database``, as separate ``cxrnode worker`` processes or hosts run;
``--mode threads``: one process, ``W`` threads sharing one ``Database`` (``worker.concurrency``).

Checked in every round, not assumed: each job id claimed exactly once per stage (claims counted
per id from what each worker reports), none lost (all jobs ``encoded`` after the worker stage,
``done`` after the sender stage, two ``claim`` events per job in ``job_events``). An exception
from the repository is counted with its message, never hidden; the job it hit stays where it is
and shows up as not completed.

PostgreSQL: ``tests.servers.PostgreSQL``, by default with the server's durable defaults
(``fsync``, ``synchronous_commit``, ``full_page_writes`` on: a commit is on disk, as SQLite's
``synchronous=FULL``); ``--pg-durability off`` runs it as the tests do (all three off).

    PYTHONPATH=. .venv/bin/python -m bench.bench_queue [--jobs 2000] [--workers 1,2,4,8]
        [--rounds 3] [--backends sqlite,postgresql] [--mode processes[,threads]]
        [--pg-durability on|off] [--record [--label NAME] [--results PATH]]

``--record`` writes the table into the ``queue`` section of bench/RESULTS.md (appended at the end
the first time): one table per ``--label``, replaced when the same label is recorded again.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import queue as queue_mod
import secrets
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("RESULTS.md")
MARK = "queue"
#: pydicom's UID root; each run adds a random component, each job its number.
UID_ROOT = "1.2.826.0.1.3680043.8.498"
DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
EXPLICIT_LE = "1.2.840.10008.1.2.1"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
DESTINATION = "pacs"
CALLING_AE = "MODALITY"
IMAGES_PER_STUDY = 2
STAGES = ("worker", "sender")
#: a worker gives up after this many consecutive exceptions (the real loop backs off, then exits 75)
MAX_CONSECUTIVE_ERRORS = 50
START_TIMEOUT_S = 120.0
STAGE_TIMEOUT_S = 1800.0


# ----- PostgreSQL -----

def durable_postgresql():  # type: ignore[no-untyped-def]
    """``tests.servers.PostgreSQL`` with the server's durable defaults instead of the tests'
    ``fsync=off``: a committed transaction is on disk, like SQLite's ``synchronous=FULL``."""
    from tests.servers import PostgreSQL, postgresql_bin

    class DurablePostgreSQL(PostgreSQL):
        def _pg_ctl(self, action: str) -> None:
            options = (f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 "
                       "-c max_connections=300")
            self._run(str(postgresql_bin() / "pg_ctl"), "-D", str(self.data), "-l",
                      str(self.workdir / "server.log"), "-o", options, "-m", "fast", "-w", "-t", "60", action)

    return DurablePostgreSQL()


def pg_query(server, sql: str) -> str:  # type: ignore[no-untyped-def]
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=server.port, user=server.user, password=server.password,
                         dbname="postgres", autocommit=True) as connection:
        row = connection.execute(sql).fetchone()
        return str(row[0]) if row else ""


def server_cpu_s(server) -> float:  # type: ignore[no-untyped-def]
    """CPU seconds the PostgreSQL server has used so far: the postmaster (with its ended children)
    and its live children (one backend per connection, background processes); 0 for none."""
    if server is None:
        return 0.0
    tick = os.sysconf("SC_CLK_TCK")

    def fields(pid: int | str) -> list[str]:
        # after "(comm)": state, ppid, ..., utime (index 11), stime, cutime, cstime
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()

    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    deadline = time.monotonic() + 5.0
    while True:
        before = fields(postmaster)[11:15]
        children = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    child = fields(entry.name)
                except OSError:
                    continue
                if int(child[1]) == postmaster:
                    children.append(child)
        after = fields(postmaster)[11:15]
        # again if a child was reaped during the scan (counted twice) or is a zombie (its CPU time
        # no longer shown, not yet the postmaster's)
        if (before == after and all(c[0] != "Z" for c in children)) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    total = sum(int(v) for v in after)  # the postmaster's own and its reaped children's
    return (total + sum(int(c[11]) + int(c[12]) for c in children)) / tick


# ----- one worker (runs in a spawned process) -----

@dataclass
class LoopResult:
    """What one worker loop did: the job ids it claimed, in order, and the exceptions it met."""

    claimed: list[int] = field(default_factory=list)
    completed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    ended: float = 0.0


def _error_key(where: str, exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{where}: {type(exc).__name__}: {first[:160]}"


def _worker_step(db, owner: str, lease_s: float, result: LoopResult) -> bool:  # type: ignore[no-untyped-def]
    """InferenceWorker.run_once without the pipeline: claim, read back, lease, note, mark encoded."""
    from node.http import metrics
    from node.queue import repository
    from node.queue.states import JobStatus
    from node.worker.lease import LeaseKeeper

    job_id = repository.claim(db, JobStatus.QUEUED, JobStatus.PROCESSING, owner, lease_s)
    if job_id is None:
        return False
    result.claimed.append(job_id)
    try:
        metrics.job_claimed(db, job_id)
        instance = repository.instance_of(db, job_id)
        with LeaseKeeper(db, job_id, owner, lease_s):
            folder = Path(instance.path).parent.parent.parent / "results" / str(job_id)
            archived = [repository.ArchivedResult("seg", SEG_CLASS, f"{instance.sop_instance_uid}.1",
                                                  str(folder / "seg.dcm")),
                        repository.ArchivedResult("sr", SR_CLASS, f"{instance.sop_instance_uid}.2",
                                                  str(folder / "sr.dcm"))]
            repository.note(db, job_id, "infer", "ok", "bench: no analysis")
            repository.mark_encoded(db, job_id, owner, 0.5, archived, [DESTINATION])
        result.completed += 1
    except Exception as exc:  # noqa: BLE001 - counted and reported, the job is left where it is
        result.errors[_error_key("complete", exc)] += 1
    return True


def _sender_step(db, owner: str, send, result: LoopResult) -> bool:  # type: ignore[no-untyped-def]
    """Sender.run_once without the C-STORE: claim, read the job, record each delivery, finish."""
    from node.queue import repository
    from node.queue.states import JobStatus

    job_id = repository.claim(db, JobStatus.ENCODED, JobStatus.SENDING, owner,
                              lease_s=send.timeout_s * 4)
    if job_id is None:
        return False
    result.claimed.append(job_id)
    try:
        repository.get_job(db, job_id)
        attempts = 0
        for name in repository.pending_deliveries(db, job_id):
            attempts = max(attempts, repository.record_delivery(db, job_id, name, None))
        status = repository.finish_sending(db, job_id, owner, max_attempts=send.max_attempts,
                                           delay_s=send.delay_after(max(attempts, 1)))
        if status != JobStatus.DONE:
            result.errors[f"finish: job ended {status}, not done"] += 1
        else:
            result.completed += 1
    except Exception as exc:  # noqa: BLE001 - counted and reported
        result.errors[_error_key("complete", exc)] += 1
    return True


def _loop(stage: str, db, owner: str, go, result: LoopResult) -> None:  # type: ignore[no-untyped-def]
    from node.settings import SendSettings, WorkerSettings

    lease_s, send = WorkerSettings().lease_s, SendSettings()
    go.wait()
    consecutive = 0
    while consecutive < MAX_CONSECUTIVE_ERRORS:
        try:
            more = (_worker_step(db, owner, lease_s, result) if stage == "worker"
                    else _sender_step(db, owner, send, result))
            consecutive = 0
        except Exception as exc:  # noqa: BLE001 - the claim itself failed: counted, tried again
            result.errors[_error_key("claim", exc)] += 1
            consecutive += 1
            continue
        if not more:
            break
    result.ended = time.monotonic()


def run_workers(stage: str, data_dir: str, url: str, number: int, threads: int, go, ready, out) -> None:  # type: ignore[no-untyped-def]
    """Entry point of one worker process: open the queue, say ready, run ``threads`` loops on
    ``go``, send back each loop's :class:`LoopResult`."""
    try:
        from node.queue import repository
        from node.queue.db import Database

        db = Database(Path(data_dir), url)
        repository.queue_status(db)  # a connection open and the first queries compiled
        results = [LoopResult() for _ in range(threads)]
        role = "infer" if stage == "worker" else "send"
        owners = [f"{socket.gethostname()}:{os.getpid()}:{role}{number}.{t}" for t in range(threads)]
        loops = [threading.Thread(target=_loop, args=(stage, db, owners[t], go, results[t]))
                 for t in range(threads)]
        for loop in loops:
            loop.start()
        cpu = time.process_time()
        ready.put(number)
        for loop in loops:
            loop.join()
        cpu = time.process_time() - cpu
        db.dispose()
        out.put(("ok", cpu, [(r.claimed, r.completed, dict(r.errors), r.ended) for r in results]))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        ready.put(number)
        out.put(("error", number, _error_key("process", exc)))


# ----- one round -----

@dataclass
class StageRun:
    seconds: float
    jobs_per_s: float
    claims_total: int
    claimed_twice: int
    never_claimed: int
    completed: int
    errors: Counter[str]
    per_loop: list[int]  # jobs claimed by each worker loop
    client_cpu_s: float  # CPU seconds of the worker processes (all their threads) from start to end
    server_cpu_s: float | None  # CPU seconds of the PostgreSQL server meanwhile (None: SQLite)


@dataclass
class Round:
    enqueue_per_s: float
    stages: dict[str, StageRun]
    lost: list[str]  # what the database check found wrong; empty: nothing


def fill(db, n: int, data_dir: Path) -> float:  # type: ignore[no-untyped-def]
    """``n`` jobs as the listener queues them; returns jobs/s (one process)."""
    from node.queue import repository

    token = secrets.randbelow(10**9)
    started = time.monotonic()
    for i in range(n):
        study = f"{UID_ROOT}.{token}.{i // IMAGES_PER_STUDY + 1}"
        sop = f"{study}.1.{i % IMAGES_PER_STUDY + 1}"
        known = repository.known_instance(db, sop)
        assert known.job_id is None and not known.own_result
        repository.enqueue(db, repository.ReceivedInstance(
            sop_instance_uid=sop, sop_class_uid=DX, study_instance_uid=study, series_instance_uid=f"{study}.1",
            transfer_syntax_uid=EXPLICIT_LE, path=str(data_dir / "archive" / "received" / study / f"{sop}.dcm"),
            size_bytes=8_400_000, calling_ae_title=CALLING_AE))
    return n / (time.monotonic() - started)


def run_stage(ctx, stage: str, data_dir: Path, url: str, workers: int, mode: str,  # type: ignore[no-untyped-def]
              job_ids: list[int], server) -> StageRun:
    procs_n, threads = (workers, 1) if mode == "processes" else (1, workers)
    go, ready, out = ctx.Event(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=run_workers, args=(stage, str(data_dir), url, p + 1, threads, go, ready, out),
                         daemon=True) for p in range(procs_n)]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            ready.get(timeout=START_TIMEOUT_S)
        server_cpu = server_cpu_s(server)
        started = time.monotonic()
        go.set()
        loops: list[tuple[list[int], int, dict[str, int], float]] = []
        process_errors: Counter[str] = Counter()
        client_cpu = 0.0
        deadline = started + STAGE_TIMEOUT_S
        for _ in procs:
            try:
                kind, detail, payload = out.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue_mod.Empty:
                raise RuntimeError(f"{stage} stage: no answer from the workers after {STAGE_TIMEOUT_S} s; exit "
                                   f"codes {[p.exitcode for p in procs]}") from None
            if kind == "ok":
                loops += payload
                client_cpu += detail
            else:
                process_errors[payload] += 1
        for proc in procs:
            proc.join(30)
        if server is not None:  # once the workers' backends have ended (their CPU is the postmaster's)
            server_cpu = server_cpu_s(server) - server_cpu
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    ended = max([loop[3] for loop in loops], default=time.monotonic())
    counts = Counter(job_id for loop in loops for job_id in loop[0])
    errors = Counter(process_errors)
    for loop in loops:
        errors.update(loop[2])
    seconds = ended - started
    completed = sum(loop[1] for loop in loops)
    return StageRun(seconds=seconds, jobs_per_s=completed / seconds if seconds > 0 else 0.0,
                    claims_total=sum(counts.values()),
                    claimed_twice=sum(1 for c in counts.values() if c > 1),
                    never_claimed=len(set(job_ids) - set(counts)), completed=completed, errors=errors,
                    per_loop=[len(loop[0]) for loop in loops], client_cpu_s=client_cpu,
                    server_cpu_s=server_cpu if server is not None else None)


def check_database(db, n: int, after: str) -> list[str]:  # type: ignore[no-untyped-def]
    """What is wrong in the queue after a stage: jobs not in the expected state, claim events
    per job other than expected (1 after the worker stage, 2 after the sender stage)."""
    from sqlalchemy import func, select

    from node.queue import repository
    from node.queue.tables import JobEvent

    expected_state, expected_claims = ("encoded", 1) if after == "worker" else ("done", 2)
    wrong: list[str] = []
    counts = {k: v for k, v in repository.queue_status(db).counts.items() if v}
    if counts.get(expected_state, 0) != n:
        wrong.append(f"after the {after} stage: {counts} (expected {n} {expected_state})")
    with db.session() as session:
        per_job = Counter(session.execute(
            select(func.count()).select_from(JobEvent).where(JobEvent.step == "claim")
            .group_by(JobEvent.job_id)).scalars())
    if per_job != Counter({expected_claims: n}):
        wrong.append(f"after the {after} stage: claim events per job {dict(per_job)} "
                     f"(expected {expected_claims} for each of {n})")
    return wrong


def one_round(ctx, backend: str, server, workers: int, mode: str, n: int) -> Round:  # type: ignore[no-untyped-def]
    from sqlalchemy import select

    from node.queue.db import Database
    from node.queue.tables import Job

    with tempfile.TemporaryDirectory(prefix="bench-queue-") as tmp:
        data_dir = Path(tmp)
        name = ""
        url = ""
        if backend == "postgresql":
            name = f"bench_{uuid.uuid4().hex[:16]}"
            server.execute(f"CREATE DATABASE {name}")
            url = server.url(name)
        try:
            db = Database(data_dir, url)
            try:
                enqueue_rate = fill(db, n, data_dir)
                with db.session() as session:
                    job_ids = list(session.scalars(select(Job.id)))
                stages: dict[str, StageRun] = {}
                lost: list[str] = []
                for stage in STAGES:
                    stages[stage] = run_stage(ctx, stage, data_dir, url, workers, mode, job_ids,
                                              server if backend == "postgresql" else None)
                    lost += check_database(db, n, stage)
            finally:
                db.dispose()
        finally:
            if name:
                server.execute(f"DROP DATABASE {name} WITH (FORCE)")
    return Round(enqueue_rate, stages, lost)


# ----- report -----

@dataclass
class Cell:
    """Every round of one backend x mode x worker count."""

    rounds: list[Round] = field(default_factory=list)

    def rates(self, stage: str) -> list[float]:
        return [r.stages[stage].jobs_per_s for r in self.rounds]

    def median(self, stage: str) -> float:
        return statistics.median(self.rates(stage))

    def cpu(self, stage: str) -> tuple[float, float | None, float]:
        """Median over the rounds: client CPU ms per job, server CPU ms per job (None: SQLite),
        cores busy (client + server CPU seconds / wall seconds)."""
        runs = [r.stages[stage] for r in self.rounds]
        client = statistics.median(s.client_cpu_s * 1000 / max(1, s.completed) for s in runs)
        server = (None if runs[0].server_cpu_s is None
                  else statistics.median((s.server_cpu_s or 0.0) * 1000 / max(1, s.completed) for s in runs))
        busy = statistics.median((s.client_cpu_s + (s.server_cpu_s or 0.0)) / s.seconds for s in runs)
        return client, server, busy

    def errors(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for r in self.rounds:
            for stage in STAGES:
                total.update({f"{stage} {k}": v for k, v in r.stages[stage].errors.items()})
        return total

    def correctness(self) -> str:
        problems = []
        for stage in STAGES:
            twice = sum(r.stages[stage].claimed_twice for r in self.rounds)
            never = sum(r.stages[stage].never_claimed for r in self.rounds)
            if twice:
                problems.append(f"{stage}: {twice} claimed twice")
            if never:
                problems.append(f"{stage}: {never} never claimed")
        lost = [w for r in self.rounds for w in r.lost]
        if lost:
            problems.append(f"{len(lost)} database check(s) failed")
        return "; ".join(problems) or "yes"


def rates_text(values: list[float]) -> str:
    return ", ".join(f"{v:.0f}" for v in values)


def table(cells: dict[tuple[str, str, int], Cell]) -> str:
    lines = [("| backend | workers | worker stage: jobs/s (median) | rounds | x 1 worker "
              "| sender stage: jobs/s (median) | rounds | x 1 worker | enqueue jobs/s (1 listener) "
              "| each job claimed once per stage, none lost | exceptions |"),
             "| --- | --- | ---: | --- | ---: | ---: | --- | ---: | ---: | --- | ---: |"]
    for (backend, mode, workers), cell in cells.items():
        first = cells.get((backend, mode, 1))
        ratio = {stage: (f"{cell.median(stage) / first.median(stage):.2f}" if first and first.rounds else "")
                 for stage in STAGES}
        what = workers_text(mode, workers)
        enqueue = statistics.median(r.enqueue_per_s for r in cell.rounds)
        lines.append(f"| {backend} | {what} | {cell.median('worker'):.0f} | {rates_text(cell.rates('worker'))} "
                     f"| {ratio['worker']} | {cell.median('sender'):.0f} | {rates_text(cell.rates('sender'))} "
                     f"| {ratio['sender']} | {enqueue:.0f} | {cell.correctness()} | {sum(cell.errors().values())} |")
    return "\n".join(lines)


def workers_text(mode: str, workers: int) -> str:
    if workers == 1:
        return "1 process"
    return f"{workers} processes" if mode == "processes" else f"{workers} threads, 1 process"


def cpu_table(cells: dict[tuple[str, str, int], Cell]) -> str:
    """Where the time goes: CPU per job of the workers and of the server, and how many of the
    machine's cores the stage kept busy."""
    lines = [("| backend | workers | worker stage: workers' CPU ms/job | server CPU ms/job | cores busy "
              "| sender stage: workers' CPU ms/job | server CPU ms/job | cores busy |"),
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (backend, mode, workers), cell in cells.items():
        row = [backend, workers_text(mode, workers)]
        for stage in STAGES:
            client, server, busy = cell.cpu(stage)
            row += [f"{client:.1f}", "-" if server is None else f"{server:.1f}", f"{busy:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def error_lines(cells: dict[tuple[str, str, int], Cell]) -> list[str]:
    lines = []
    for (backend, mode, workers), cell in cells.items():
        for key, count in cell.errors().most_common():
            lines.append(f"- {backend}, {workers} {mode}: {count} x {key}")
        for r in cell.rounds:
            lines += [f"- {backend}, {workers} {mode}: {w}" for w in r.lost]
    return lines


def balance_lines(cells: dict[tuple[str, str, int], Cell]) -> list[str]:
    """Jobs each worker claimed in the last round: whether the work was shared."""
    lines = []
    for (backend, mode, workers), cell in cells.items():
        if workers > 1 and cell.rounds:
            last = cell.rounds[-1].stages
            lines.append(f"{backend} {workers} {mode}: worker stage {sorted(last['worker'].per_loop)}, "
                         f"sender stage {sorted(last['sender'].per_loop)}")
    return lines


def git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                          check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, cwd=REPO, check=False).stdout.strip()
    return (done.stdout.strip() or "unknown") + ("+dirty" if dirty else "")


def filesystem_of(path: Path) -> str:
    """The device and file system type that hold ``path`` (from /proc/mounts)."""
    best = ("", "?", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, fstype = line.split()[:3]
            if str(path).startswith(mount) and len(mount) >= len(best[0]):
                best = (mount, device, fstype)
    except OSError:
        pass
    return f"{best[1]} ({best[2]})"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


#: the highest 1-minute load average seen after a round of one backend x worker count
PEAK_LOAD = [0.0]


def loadavg() -> str:
    load = os.getloadavg()
    PEAK_LOAD[0] = max(PEAK_LOAD[0], load[0])
    return ", ".join(f"{v:.1f}" for v in load)


def facts(pg_version: str, pg_durability: str, load_start: str) -> list[str]:
    import psycopg
    import sqlalchemy

    cores = os.cpu_count()
    return [
        (f"host `{platform.node()}`, **{cores} CPU cores** ({cpu_model()}): the worker processes, the PostgreSQL "
         f"server and this script all share them; beyond {cores} busy processes they take turns on the cores"),
        (f"temporary folder (the SQLite file) on {filesystem_of(Path(tempfile.gettempdir()))}; "
         f"Python {platform.python_version()}, SQLAlchemy {sqlalchemy.__version__}, psycopg {psycopg.__version__}"),
        f"SQLite {sqlite3.sqlite_version} (the node's settings: WAL, synchronous=FULL, busy_timeout 30 s)",
        f"PostgreSQL {pg_version or 'not run'} on loopback, password over TCP"
        + (", durable server defaults (fsync, synchronous_commit, full_page_writes on)" if pg_durability == "on"
           else ", the tests' settings (fsync, synchronous_commit, full_page_writes off: not durable)"),
        (f"load average at the start: {load_start}; at the end: {loadavg()}; highest 1-minute value seen "
         f"between rounds: {PEAK_LOAD[0]:.1f} (this script's own workers count in it; anything above "
         f"{cores} means other work shared the cores)"),
    ]


def command_line(args: argparse.Namespace) -> str:
    parts = ["PYTHONPATH=. .venv/bin/python -m bench.bench_queue", f"--jobs {args.jobs}",
             f"--workers {args.workers}", f"--rounds {args.rounds}"]
    if args.backends != "sqlite,postgresql":
        parts.append(f"--backends {args.backends}")
    if args.mode != "processes":
        parts.append(f"--mode {args.mode}")
    if args.pg_durability != "on":
        parts.append(f"--pg-durability {args.pg_durability}")
    if args.record:
        parts += ["--record", f"--label '{args.label}'"]
    return " ".join(parts)


SECTION_HEAD = """## Job queue alone: claims per second, SQLite vs PostgreSQL (bench/bench_queue.py)

The queue's own calls, as the node makes them, with no DICOM, files or analysis in between:
the worker stage is `InferenceWorker.run_once` minus the pipeline (claim queued -> processing with
a lease, read back, `instance_of`, lease keeper, `note`, `mark_encoded` with SEG + SR rows and one
delivery), the sender stage `Sender.run_once` minus the C-STORE (claim encoded -> sending,
`get_job`, `pending_deliveries`, `record_delivery`, `finish_sending` -> done). Each round a fresh
queue filled with N jobs by the listener's calls (`known_instance` + `enqueue`, one process:
the enqueue column); W workers are W OS processes (spawn), each its own `Database`, started
together once all have a connection; jobs/s = N / (last worker done - start). Every round checks
that each job was claimed exactly once per stage (claims counted per job id) and that none was lost
(all `encoded`, then all `done`, two claim events per job). Median of the rounds; the rounds'
figures next to it; backends and worker counts interleaved within each round.
One table per label; recording a label again replaces its table."""


def record_block(args: argparse.Namespace, tbl: str, fact_lines: list[str], notes: list[str]) -> str:
    return "\n".join([
        (f"### `{args.label}`: commit {git_commit()}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
         f"N = {args.jobs} jobs, {args.rounds} round(s)"),
        "",
        *[f"- {line}" for line in fact_lines],
        "",
        tbl,
        "",
        *notes,
        f"Command: `{command_line(args)}`",
    ])


def record(path: Path, label: str, block: str) -> None:
    """Put ``block`` into the queue section of ``path`` (appended at the end the first time),
    replacing the block of ``label`` (:func:`bench.bench_latency.record`)."""
    from bench.bench_latency import record as record_section

    record_section(path, label, block, mark=MARK, section_head=SECTION_HEAD)


# ----- main -----

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2000, help="jobs queued in each round")
    parser.add_argument("--workers", default="1,2,4,8", help="worker counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (the median is reported)")
    parser.add_argument("--backends", default="sqlite,postgresql", help="sqlite, postgresql or both")
    parser.add_argument("--mode", default="processes",
                        help="processes (W processes), threads (W threads in one process), or both")
    parser.add_argument("--pg-durability", choices=("on", "off"), default="on",
                        help="on: the server's durable defaults; off: fsync etc. off, as the tests run it")
    parser.add_argument("--record", action="store_true", help="write the table into RESULTS.md")
    parser.add_argument("--label", default="current", help="the table's label in RESULTS.md")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the file --record writes")
    args = parser.parse_args()
    worker_counts = [int(w) for w in args.workers.split(",")]
    backends = [b.strip() for b in args.backends.split(",")]
    modes = [m.strip() for m in args.mode.split(",")]
    if set(backends) - {"sqlite", "postgresql"} or set(modes) - {"processes", "threads"}:
        parser.error("--backends takes sqlite and/or postgresql, --mode processes and/or threads")

    load_start = loadavg()
    print(f"{os.cpu_count()} CPU cores; load average at the start: {load_start}", flush=True)
    ctx = multiprocessing.get_context("spawn")
    server = None
    pg_version = ""
    if "postgresql" in backends:
        if args.pg_durability == "on":
            server = durable_postgresql()
        else:
            from tests.servers import PostgreSQL
            server = PostgreSQL()
        server.start()
        pg_version = pg_query(server, "SHOW server_version")
        print(f"PostgreSQL {pg_version} on port {server.port} (fsync {pg_query(server, 'SHOW fsync')}, "
              f"synchronous_commit {pg_query(server, 'SHOW synchronous_commit')})", flush=True)
    cells: dict[tuple[str, str, int], Cell] = {(b, m, w): Cell() for b in backends for m in modes
                                               for w in worker_counts}
    try:
        for r in range(args.rounds):
            for backend in backends:
                for mode in modes:
                    for workers in worker_counts:
                        rnd = one_round(ctx, backend, server, workers, mode, args.jobs)
                        cells[(backend, mode, workers)].rounds.append(rnd)
                        w, s = rnd.stages["worker"], rnd.stages["sender"]
                        errors = sum(w.errors.values()) + sum(s.errors.values())
                        print(f"round {r + 1}: {backend:10} {workers} {mode:9}  enqueue {rnd.enqueue_per_s:6.0f}/s  "
                              f"worker {w.jobs_per_s:6.0f} jobs/s ({w.seconds:.1f} s)  sender {s.jobs_per_s:6.0f} "
                              f"jobs/s ({s.seconds:.1f} s)  exceptions {errors}  "
                              f"{'; '.join(rnd.lost) or 'all claimed once, none lost'}"
                              f"  load {loadavg()}", flush=True)
    finally:
        if server is not None:
            server.stop()

    tbl = (table(cells) + "\n\nWhere the time goes (medians of the rounds; cores busy = CPU seconds of the workers "
           "and the server / wall seconds, out of " + f"{os.cpu_count()}):\n\n" + cpu_table(cells))
    fact_lines = facts(pg_version, args.pg_durability, load_start)
    notes = []
    if errs := error_lines(cells):
        notes += ["Exceptions and failed checks:", "", *errs, ""]
    if bal := balance_lines(cells):
        notes += ["Jobs each worker claimed (last round): " + "; ".join(bal) + ".", ""]
    print()
    print("\n".join(f"- {line}" for line in fact_lines))
    print()
    print(tbl)
    print()
    print("\n".join(notes))
    if args.record:
        record(args.results, args.label, record_block(args, tbl, fact_lines, notes))
        print(f"recorded as `{args.label}` in {args.results}")
    failed = any(c.correctness() != "yes" for c in cells.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
