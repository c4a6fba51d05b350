"""Issue 13: latency, throughput, ingest rate and memory of ``cxrnode serve``, measured in one run.

Real processes on loopback: Orthanc (the PACS receiving the results), dcmtk ``storescu`` (the
sender of every image) and ``storescp`` (a reference receiver), and ``cxrnode serve`` (CPU, the
tree's code, the shipped worker and sender poll intervals unless ``--node-poll-s``).

1. Latency: a 2048x2048 12-bit DX (``MCUCXR_0017_0.png``) and the NEMA chest CR (JPEG 2000),
   each run a fresh file with new Study/Series/SOP Instance UIDs, sent by one ``storescu``
   process; the clock runs from just before ``storescu`` starts until Orthanc's REST API lists
   both the SEG and the SR series of that study (polled every ``POLL_S``). One warm-up of each
   is excluded; DX and CR runs alternate so that drift hits both alike. Reported: per-run
   seconds, median, p95 (linear interpolation), the median time to the C-STORE acknowledgement
   (``storescu`` exited), and the node's own stage times (its Prometheus ``/metrics``).
2. Throughput: ``--throughput-n`` DX files in one ``storescu`` association, clock from its start
   until all have SEG+SR at the destination -> radiographs/s. Twice: results to Orthanc, and
   from a second node whose destination is ``storescp``; similar rates mean the node (its
   worker) is the limit, a much higher rate with ``storescp`` means Orthanc is.
3. Ingest: 4 ``storescu`` processes in parallel, each sending ``--ingest-per-assoc`` files in
   one association, to ``storescp --fork`` (writing files into a temp folder) and to a node with
   its worker disabled (``[worker] enabled = false``: every DX is fsync'd into the archive and
   queued, nothing analysed). Objects acknowledged per second, ratio node/storescp; two payloads:
   512x512 DX (small) and the 2048x2048 DX. storescp neither fsyncs nor records a queue row.
4. Memory: VmHWM (peak RSS) of each ``cxrnode serve`` process (and any children) read from
   /proc just before it is stopped; the target is <= 1.5 GB.

    PYTHONPATH=. python -m bench.bench_latency [--runs 20] [--throughput-n 20]
        [--ingest-per-assoc 50] [--ingest-dx-per-assoc N] [--node-poll-s S]
        [--record [--label before|after] [--results PATH]]

``--record`` writes the figures into the ``latency`` section of bench/RESULTS.md: one table per
``--label`` (default ``current``), replaced when the same label is recorded again.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import JPEG2000, JPEG2000Lossless, generate_uid

from tests.dicom_factory import FIXTURE_DIR, make_dx, nema_chest_cr_path
from tests.servers import NodeProcess, Orthanc, dcmtk, free_port, wait_for_port

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("RESULTS.md")
MARK = "latency"
POLL_S = 0.02  # how often the destination is polled for results
SCU_AET = "BENCHSCU"
INGEST_ASSOCIATIONS = 4
TIMEOUT_S = 600.0
STAGES = ("receive", "queue_wait", "inference", "encoding", "sending", "end_to_end")

Stages = dict[str, tuple[float, float]]  # stage -> (sum seconds, count)


# ----- inputs -----

def write_copy(ds: Dataset, path: Path) -> str:
    """``ds`` saved to ``path`` with new Study/Series/SOP Instance UIDs; returns the study UID."""
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)
    return str(ds.StudyInstanceUID)


def write_copies(ds: Dataset, folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.dcm" for i in range(n)]
    for path in paths:
        write_copy(ds, path)
    return paths


# ----- dcmtk -----

#: storescu proposes uncompressed transfer syntaxes unless told: the option for a compressed file's.
PROPOSE = {JPEG2000: ["-xw"], JPEG2000Lossless: ["-xv"]}


def proposal(ds: Dataset) -> list[str]:
    return PROPOSE.get(ds.file_meta.TransferSyntaxUID, [])


def storescu_command(port: int, called: str, files: list[Path], options: list[str] = ()) -> list[str]:
    return [dcmtk("storescu"), *options, "-aet", SCU_AET, "-aec", called, "127.0.0.1", str(port),
            *map(str, files)]


def storescu(port: int, called: str, files: list[Path], options: list[str] = ()) -> None:
    """Send ``files`` in one association; raises unless every C-STORE succeeded."""
    done = subprocess.run(storescu_command(port, called, files, options), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"storescu exited {done.returncode}: {done.stderr.strip()[-500:]}")


def parallel_storescu(port: int, called: str, batches: list[list[Path]]) -> float:
    """One ``storescu`` per batch, all started at once; seconds until the last one exited."""
    started = time.perf_counter()
    procs = [subprocess.Popen(storescu_command(port, called, batch), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for batch in batches]
    for proc in procs:
        _, err = proc.communicate(timeout=TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"storescu exited {proc.returncode}: {err.decode()[-500:]}")
    return time.perf_counter() - started


@dataclass
class StoreSCP:
    """dcmtk ``storescp`` writing every object it receives into ``folder`` (a child process per
    association, largest PDU it allows, any transfer syntax)."""

    folder: Path
    port: int = field(default_factory=free_port)
    aet: str = "STORESCP"
    proc: subprocess.Popen | None = None

    def start(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "--fork", "-aet", self.aet, "-pdu", "131072", "+xa",
             "--output-directory", str(self.folder), str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, 30, self.proc)
        return self

    def count(self) -> int:
        return sum(1 for entry in os.scandir(self.folder) if entry.is_file())

    def clear(self) -> None:
        for entry in os.scandir(self.folder):
            os.unlink(entry.path)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


# ----- the node -----

@dataclass
class Node:
    """A ``cxrnode serve`` with its metrics port known."""

    process: NodeProcess
    http_port: int

    @property
    def pid(self) -> int:
        assert self.process.proc is not None
        return self.process.proc.pid

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=30) as answer:
            return answer.read().decode()

    def stages(self) -> Stages:
        """Sum and count of each stage of ``cxrnode_stage_duration_seconds`` so far."""
        found: dict[str, list[float]] = {}
        for kind, stage, value in re.findall(
                r'^cxrnode_stage_duration_seconds_(sum|count)\{stage="(\w+)"\} (\S+)$',
                self.metrics_text(), re.MULTILINE):
            found.setdefault(stage, [0.0, 0.0])[kind == "count"] = float(value)
        return {stage: (v[0], v[1]) for stage, v in found.items()}

    def stores_ok(self) -> int:
        match = re.search(r'^cxrnode_cstore_total\{status="0x0000"\} (\S+)$', self.metrics_text(),
                          re.MULTILINE)
        return int(float(match.group(1))) if match else 0

    def wait_sent(self, before: Stages, jobs: int) -> Stages:
        """Stage totals once ``jobs`` more jobs ended (end_to_end observed), outside any clock."""
        want = before.get("end_to_end", (0.0, 0.0))[1] + jobs
        deadline = time.monotonic() + 30
        while True:
            now = self.stages()
            if now.get("end_to_end", (0.0, 0.0))[1] >= want or time.monotonic() > deadline:
                return now
            time.sleep(0.05)

    def peak_rss_mb(self) -> float:
        """VmHWM of the serve process plus that of each of its descendants, MB."""
        return sum(vm_hwm_kb(pid) for pid in [self.pid, *descendants(self.pid)]) / 1024

    def stop(self) -> None:
        if self.process.proc is not None:
            self.process.stop()


def start_node(work: Path, name: str, destinations: list[dict], poll_s: dict[str, float],
               worker_enabled: bool = True) -> Node:
    http_port = free_port()
    process = NodeProcess(work / name, free_port(), destinations=destinations, extra={
        "worker": {"enabled": worker_enabled, "poll_interval_s": poll_s["worker"]},
        "send": {"poll_interval_s": poll_s["send"]},
        "http": {"port": http_port}})
    process.start()
    return Node(process, http_port)


def vm_hwm_kb(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) if match else 0


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo += children.get(child, [])
    return found


def stage_delta(after: Stages, before: Stages) -> Stages:
    return {s: (after[s][0] - before.get(s, (0.0, 0.0))[0], after[s][1] - before.get(s, (0.0, 0.0))[1])
            for s in after}


def stage_means(deltas: list[Stages]) -> dict[str, float]:
    """Mean seconds per job of each stage over ``deltas`` (one per run)."""
    means = {}
    for stage in STAGES:
        total = sum(d.get(stage, (0.0, 0.0))[0] for d in deltas)
        count = sum(d.get(stage, (0.0, 0.0))[1] for d in deltas)
        if count:
            means[stage] = total / count
    return means


# ----- destinations -----

def poll_until(done: Callable[[], bool], what: str) -> float:
    """``time.perf_counter()`` when ``done()`` first held, polling every POLL_S."""
    deadline = time.monotonic() + TIMEOUT_S
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not seen after {TIMEOUT_S:.0f} s")
        time.sleep(POLL_S)
    return time.perf_counter()


def results_listed(orthanc: Orthanc, study_uid: str) -> bool:
    """Whether Orthanc lists a SEG and an SR series in the study (one REST request)."""
    series = orthanc.post("/tools/find", {"Level": "Series", "Expand": True,
                                          "Query": {"StudyInstanceUID": study_uid}})
    modalities = {s.get("MainDicomTags", {}).get("Modality") for s in series}
    return {"SEG", "SR"} <= modalities


def orthanc_instances(orthanc: Orthanc) -> int:
    return int(orthanc.get("/statistics")["CountInstances"])


# ----- 1. latency -----

@dataclass
class Latency:
    totals: list[float] = field(default_factory=list)
    acks: list[float] = field(default_factory=list)
    stages: list[Stages] = field(default_factory=list)


def latency_run(orthanc: Orthanc, node: Node, source: Dataset, folder: Path, into: Latency | None) -> None:
    """One image sent, timed from just before storescu starts to SEG+SR listed in Orthanc."""
    path = folder / "latency.dcm"
    study_uid = write_copy(source, path)
    before = node.stages()
    started = time.perf_counter()
    storescu(node.process.port, node.process.ae_title, [path], proposal(source))
    acked = time.perf_counter()
    listed = poll_until(lambda: results_listed(orthanc, study_uid), "SEG and SR in Orthanc")
    after = node.wait_sent(before, 1)
    if into is not None:
        into.totals.append(listed - started)
        into.acks.append(acked - started)
        into.stages.append(stage_delta(after, before))


def measure_latency(orthanc: Orthanc, node: Node, sources: dict[str, Dataset], runs: int,
                    folder: Path) -> dict[str, Latency]:
    for source in sources.values():  # warm-up: first-call costs excluded
        latency_run(orthanc, node, source, folder, None)
    results = {name: Latency() for name in sources}
    for i in range(runs):
        for name, source in sources.items():
            latency_run(orthanc, node, source, folder, results[name])
            print(f"  latency run {i + 1}/{runs} {name}: {results[name].totals[-1]:.2f} s", flush=True)
    return results


# ----- 2. throughput -----

@dataclass
class Throughput:
    n: int
    ack_s: float
    done_s: float
    stages: Stages

    @property
    def rate(self) -> float:
        return self.n / self.done_s


def measure_throughput(node: Node, files: list[Path], results_count: Callable[[], int]) -> Throughput:
    """All ``files`` in one association; seconds until the destination holds 2 results each."""
    want = results_count() + 2 * len(files)
    before = node.stages()
    started = time.perf_counter()
    storescu(node.process.port, node.process.ae_title, files)
    acked = time.perf_counter()
    done = poll_until(lambda: results_count() >= want, f"{want} results at the destination")
    after = node.wait_sent(before, len(files))
    return Throughput(len(files), acked - started, done - started, stage_delta(after, before))


# ----- 3. ingest -----

def batches_of(files: list[Path], n: int) -> list[list[Path]]:
    return [files[i::n] for i in range(n)]


def ingest_storescp(scp: StoreSCP, files: list[Path]) -> float:
    """Objects/s acknowledged by storescp over INGEST_ASSOCIATIONS parallel associations."""
    scp.clear()
    took = parallel_storescu(scp.port, scp.aet, batches_of(files, INGEST_ASSOCIATIONS))
    if scp.count() != len(files):
        raise RuntimeError(f"storescp wrote {scp.count()} of {len(files)} files")
    scp.clear()
    return len(files) / took


def ingest_node(node: Node, files: list[Path]) -> float:
    """Objects/s acknowledged (0x0000) by the node over INGEST_ASSOCIATIONS parallel associations."""
    before = node.stores_ok()
    took = parallel_storescu(node.process.port, node.process.ae_title,
                             batches_of(files, INGEST_ASSOCIATIONS))
    if node.stores_ok() - before != len(files):
        raise RuntimeError(f"the node acknowledged {node.stores_ok() - before} of {len(files)}")
    return len(files) / took


# ----- report -----

def p95(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=20, method="inclusive")[18]


def seconds(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def latency_rows(name: str, lat: Latency) -> list[tuple[str, str]]:
    means = stage_means(lat.stages)
    parts = [f"{s} {means[s]:.2f}" for s in STAGES[:-1] if s in means]
    accounted = sum(means.get(s, 0.0) for s in STAGES[1:-1])
    if "end_to_end" in means:
        parts.append(f"rest (sender poll, bookkeeping) {means['end_to_end'] - accounted:.2f}")
        parts.append(f"node end_to_end {means['end_to_end']:.2f}")
    return [
        (f"latency {name}: median s (C-STORE -> SEG+SR in Orthanc)", f"{statistics.median(lat.totals):.2f}"),
        (f"latency {name}: p95 s", f"{p95(lat.totals):.2f}"),
        (f"latency {name}: median s to C-STORE acknowledged", f"{statistics.median(lat.acks):.2f}"),
        (f"latency {name}: node stages, mean s", "; ".join(parts)),
    ]


def verdict(orthanc_tp: Throughput, scp_tp: Throughput) -> str:
    busy = sum(orthanc_tp.stages.get(s, (0.0, 0.0))[0] for s in ("inference", "encoding"))
    share = busy / orthanc_tp.done_s
    if scp_tp.rate > 1.2 * orthanc_tp.rate:
        return f"Orthanc (storescp destination {scp_tp.rate / orthanc_tp.rate:.2f}x faster)"
    return (f"the node, not Orthanc (storescp/Orthanc rate {scp_tp.rate / orthanc_tp.rate:.2f}; "
            f"worker busy in inference+encoding {share:.0%} of the Orthanc run)")


def build_rows(lat: dict[str, Latency], tp: dict[str, Throughput], ingest: dict[str, dict[str, float]],
               rss: dict[str, float]) -> list[tuple[str, str]]:
    rows = []
    for name, values in lat.items():
        rows += latency_rows(name, values)
    for dest, t in tp.items():
        rows.append((f"throughput {t.n} DX in one association -> {dest}: radiographs/s",
                     f"{t.rate:.2f} (all acknowledged {t.ack_s:.1f} s, all results {t.done_s:.1f} s)"))
    rows.append(("throughput limit", verdict(tp["Orthanc"], tp["storescp"])))
    for payload, rates in ingest.items():
        rows.append((f"ingest {payload}, {INGEST_ASSOCIATIONS} associations: objects/s node / storescp",
                     f"{rates['node']:.1f} / {rates['storescp']:.1f} = {rates['node'] / rates['storescp']:.2f}"))
    for name, mb in rss.items():
        rows.append((f"peak RSS (VmHWM) {name}, MB", f"{mb:.0f}"))
    rows.append(("peak RSS <= 1.5 GB target", "met" if max(rss.values()) <= 1536 else "NOT met"))
    return rows


def table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| figure | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)])


def git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, cwd=REPO).stdout.strip()
    return (done.stdout.strip() or "unknown") + ("+dirty" if dirty else "")


def command_line(args: argparse.Namespace) -> str:
    parts = ["python -m bench.bench_latency", f"--runs {args.runs}", f"--throughput-n {args.throughput_n}",
             f"--ingest-per-assoc {args.ingest_per_assoc}", f"--ingest-dx-per-assoc {args.ingest_dx_per_assoc}"]
    if args.node_poll_s is not None:
        parts.append(f"--node-poll-s {args.node_poll_s}")
    return " ".join(parts + ["--record", f"--label {args.label}"])


SECTION_HEAD = f"""## Latency, throughput, ingest and memory (bench/bench_latency.py, issue 13)

Real Orthanc, dcmtk `storescu`/`storescp` and `cxrnode serve` (CPU, unet) on loopback, all figures
of a table from one run. Latency: 2048x2048 12-bit DX (`MCUCXR_0017_0.png`) and the NEMA chest CR
(JPEG 2000), a fresh file with new UIDs each run sent by `storescu`; the clock runs from just before
`storescu` starts to SEG and SR both listed by Orthanc's REST API ({POLL_S * 1000:.0f} ms polling);
one warm-up each excluded, DX and CR alternating; the node's stage times from its `/metrics`.
Throughput: N DX in one association until all have SEG+SR at the destination (Orthanc, then a
second node sending to `storescp`). Ingest: {INGEST_ASSOCIATIONS} parallel `storescu` processes,
objects/s acknowledged by a node with its worker disabled (each DX fsync'd into the archive and
queued) vs `storescp --fork` (files written, no fsync). Memory: VmHWM of each node process just
before it is stopped (target <= 1.5 GB).
One table per label; recording a label again replaces its table."""


def record_block(args: argparse.Namespace, rows: list[tuple[str, str]], lat: dict[str, Latency],
                 poll_s: dict[str, float]) -> str:
    runs = "; ".join(f"{name}: {seconds(v.totals)}" for name, v in lat.items())
    return "\n".join([
        f"### `{args.label}`: commit {git_commit()}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"host `{platform.node()}`, {os.cpu_count()} CPU cores",
        "",
        f"Node poll intervals: worker {poll_s['worker']} s, sender {poll_s['send']} s; "
        f"worker.concurrency {worker_concurrency()} (the shipped default). "
        f"Load average at the end: {', '.join(f'{v:.1f}' for v in os.getloadavg())}.",
        "",
        table(rows),
        "",
        f"Latency runs, s ({args.runs} each): {runs}",
        "",
        f"Command: `{command_line(args)}`",
    ])


def record(path: Path, label: str, block: str, *, mark: str = MARK, section_head: str | None = None) -> None:
    """Put ``block`` into the ``mark`` section of ``path`` (the latency section by default, headed
    ``section_head``), replacing the block of ``label``."""
    section_head = SECTION_HEAD if section_head is None else section_head
    start, end = f"<!-- {mark}: start -->", f"<!-- {mark}: end -->"
    text = path.read_text() if path.exists() else ""
    if start not in text:
        text = text.rstrip("\n") + f"\n\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    body, tail = rest.split(end, 1)
    blocks = [b.strip() for b in re.split(r"^(?=### )", body, flags=re.MULTILINE) if b.startswith("### ")]
    mine = [i for i, b in enumerate(blocks) if b.startswith(f"### `{label}`:")]
    if mine:  # in place, so that a `before` table stays above its `after`
        blocks[mine[0]:mine[0] + 1] = [block]
        blocks = [b for i, b in enumerate(blocks) if i not in mine[1:]]
    else:
        blocks.append(block)
    path.write_text(f"{head.lstrip(chr(10))}{start}\n{section_head}\n\n" + "\n\n".join(blocks)
                    + f"\n{end}{tail}")


# ----- main -----

def worker_concurrency() -> int:
    """Jobs one node process analyses at once by default (1 before the setting existed)."""
    from node.settings import WorkerSettings

    return int(getattr(WorkerSettings(), "concurrency", 1))


def node_poll_intervals(override: float | None) -> dict[str, float]:
    """The shipped defaults of ``[worker]`` and ``[send]`` poll_interval_s unless overridden."""
    from node.settings import SendSettings, WorkerSettings

    if override is not None:
        return {"worker": override, "send": override}
    return {"worker": WorkerSettings().poll_interval_s, "send": SendSettings().poll_interval_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="latency runs per image (after one warm-up)")
    parser.add_argument("--throughput-n", type=int, default=20, help="DX in the throughput association")
    parser.add_argument("--ingest-per-assoc", type=int, default=50, help="small DX per ingest association")
    parser.add_argument("--ingest-dx-per-assoc", type=int, default=None,
                        help="2048 DX per ingest association (default: --ingest-per-assoc)")
    parser.add_argument("--node-poll-s", type=float, default=None,
                        help="worker and sender poll interval (default: the node's shipped defaults)")
    parser.add_argument("--record", action="store_true", help="write the figures into RESULTS.md")
    parser.add_argument("--label", default="current", help="the table's label in RESULTS.md")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the file --record writes")
    args = parser.parse_args()
    if args.ingest_dx_per_assoc is None:
        args.ingest_dx_per_assoc = args.ingest_per_assoc
    poll_s = node_poll_intervals(args.node_poll_s)

    print("preparing images ...", flush=True)
    dx = make_dx(FIXTURE_DIR / "MCUCXR_0017_0.png", size=(2048, 2048))
    small = make_dx(FIXTURE_DIR / "MCUCXR_0017_0.png", size=(512, 512))
    cr = dcmread(nema_chest_cr_path())
    rss: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        work = Path(tmp)
        tp_files = write_copies(dx, work / "throughput", args.throughput_n)
        orthanc = Orthanc(work / "orthanc", free_port(), free_port()).start()
        pacs = {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
        try:
            print("node -> Orthanc: latency and throughput ...", flush=True)
            node = start_node(work, "node-orthanc", [pacs], poll_s)
            try:
                lat = measure_latency(orthanc, node, {"DX 2048": dx, "NEMA CR": cr}, args.runs, work)
                tp = {"Orthanc": measure_throughput(node, tp_files, lambda: orthanc_instances(orthanc))}
                rss["node -> Orthanc (latency + throughput)"] = node.peak_rss_mb()
            finally:
                node.stop()
        finally:
            orthanc.stop()

        print("node -> storescp: throughput ...", flush=True)
        scp = StoreSCP(work / "storescp-results").start()
        try:
            node = start_node(work, "node-storescp", [
                {"name": "storescp", "ae_title": scp.aet, "host": "127.0.0.1", "port": scp.port}], poll_s)
            try:
                warm_up = work / "warm-up.dcm"
                write_copy(dx, warm_up)
                measure_throughput(node, [warm_up], scp.count)  # first-call costs excluded
                tp["storescp"] = measure_throughput(node, tp_files, scp.count)
                rss["node -> storescp (throughput)"] = node.peak_rss_mb()
            finally:
                node.stop()
        finally:
            scp.stop()
        shutil.rmtree(work / "throughput")

        print("ingest: storescp vs node (worker disabled) ...", flush=True)
        ingest: dict[str, dict[str, float]] = {}
        scp = StoreSCP(work / "storescp-ingest").start()
        node = start_node(work, "node-ingest", [pacs], poll_s, worker_enabled=False)
        try:
            for payload, ds, per in (("DX 512x512", small, args.ingest_per_assoc),
                                     ("DX 2048x2048", dx, args.ingest_dx_per_assoc)):
                files = write_copies(ds, work / "ingest", INGEST_ASSOCIATIONS * per)
                ingest[payload] = {"storescp": ingest_storescp(scp, files), "node": ingest_node(node, files)}
                print(f"  {payload}: {ingest[payload]}", flush=True)
                shutil.rmtree(work / "ingest")
            rss["node, worker disabled (ingest)"] = node.peak_rss_mb()
        finally:
            node.stop()
            scp.stop()

    rows = build_rows(lat, tp, ingest, rss)
    print(f"\nresults polled every {POLL_S * 1000:.0f} ms; node poll intervals: worker {poll_s['worker']} s, "
          f"sender {poll_s['send']} s; {os.cpu_count()} CPU cores; load average now "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    for name, values in lat.items():
        print(f"latency runs {name} (s): {seconds(values.totals)}")
    print(table(rows))
    if args.record:
        record(args.results, args.label, record_block(args, rows, lat, poll_s))
        print(f"recorded as `{args.label}` in {args.results}")


if __name__ == "__main__":
    sys.exit(main())
