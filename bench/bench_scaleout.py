"""End-to-end rate with 1, 2 and 3 worker processes (issue 12), against the one-process default.

Run from the repository root:

    PYTHONPATH=. .venv/bin/python -m bench.bench_scaleout [--n 40] [--rounds 2] [--workers 1,2,3]
                                                         [--record --label NAME]

Real servers on loopback: PostgreSQL 15 (the queue), Orthanc (the destination), dcmtk `storescu`
(the sender). One `cxrnode serve --role receiver,sender` process and N `cxrnode serve --role
worker` processes (each `worker.concurrency = 1`, CPU) share the queue and one archive folder.
The reference is the embedded default: one `cxrnode serve` (SQLite, local folder, the shipped
`worker.concurrency`). Each configuration gets a warm-up of 4 radiographs, then `--rounds` rounds
of `--n` 512x512 12-bit DX sent over 4 associations at once; a round's time runs from the first
`storescu` to the last SEG and SR listed in Orthanc. Figures: radiographs per second (median of
the rounds) and the ratio to the one-process default, measured in the same run.

``--record`` writes the table into the ``scale-out`` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.bench_latency import (
    RESULTS,
    batches_of,
    git_commit,
    orthanc_instances,
    parallel_storescu,
    poll_until,
    record,
    write_copies,
)
from tests.dicom_factory import FIXTURE_DIR, make_dx
from tests.servers import NodeProcess, Orthanc, PostgreSQL, free_port

MARK = "scale-out"
ASSOCIATIONS = 4
WARM_UP = 4

SECTION_HEAD = """## Scale-out: end-to-end rate with several worker processes (bench/bench_scaleout.py, issue 12)

Real PostgreSQL 15, Orthanc and dcmtk `storescu` on loopback. `receiver,sender` in one process,
N `worker` processes (`worker.concurrency = 1` each, CPU, unet) on one PostgreSQL queue and one
archive folder; the reference is one `cxrnode serve` on the embedded defaults (SQLite, local
folder). Rate: 512x512 12-bit DX over 4 associations, first `storescu` to the last SEG and SR in
Orthanc, median of the rounds. One table per label."""


class Layout:
    """The node processes of one configuration."""

    def __init__(self, work: Path, name: str, destinations: list[dict], workers: int, queue_url: str) -> None:
        self.name, self.processes = name, []
        if workers == 0:  # the embedded default: one process, SQLite, the shipped concurrency
            self.receiver = NodeProcess(work / name / "serve", free_port(), destinations,
                                        extra={"worker": {"concurrency": _default_concurrency()}})
            self.processes.append(self.receiver)
            return
        archive = str(work / name / "archive")
        shared = {"queue": {"url": queue_url}, "archive": {"url": archive}}
        self.receiver = NodeProcess(work / name / "receiver", free_port(), destinations,
                                    extra=shared | {"node": {"instance_name": "receiver"}}, roles="receiver,sender")
        self.processes.append(self.receiver)
        for n in range(1, workers + 1):
            self.processes.append(NodeProcess(
                work / name / f"worker-{n}", free_port(), destinations, roles="worker",
                extra=shared | {"node": {"instance_name": f"worker-{n}"}, "worker": {"concurrency": 1}}))

    def start(self) -> None:
        for process in self.processes:
            process.start(ready_timeout_s=300)

    def stop(self) -> None:
        for process in self.processes:
            if process.proc is not None:
                process.stop()


def _default_concurrency() -> int:
    from node.settings import WorkerSettings

    return WorkerSettings().concurrency


def send_round(layout: Layout, orthanc: Orthanc, files: list[Path]) -> float:
    want = orthanc_instances(orthanc) + 2 * len(files)
    started = time.perf_counter()
    parallel_storescu(layout.receiver.port, layout.receiver.ae_title, batches_of(files, ASSOCIATIONS))
    done = poll_until(lambda: orthanc_instances(orthanc) >= want, f"{want} instances in Orthanc")
    return done - started


def measure(layout: Layout, orthanc: Orthanc, folder: Path, n: int, rounds: int) -> list[float]:
    source = make_dx(FIXTURE_DIR / "MCUCXR_0017_0.png", size=(512, 512))
    layout.start()
    try:
        send_round(layout, orthanc, write_copies(source, folder / "warm", WARM_UP))
        rates = []
        for r in range(rounds):
            files = write_copies(source, folder / f"round-{r}", n)
            seconds = send_round(layout, orthanc, files)
            rates.append(n / seconds)
            print(f"  {layout.name} round {r + 1}: {n} in {seconds:.1f} s = {rates[-1]:.2f}/s", flush=True)
        return rates
    finally:
        layout.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=40, help="radiographs per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", default="1,2,3", help="worker process counts")
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--label", default="current")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    counts = [int(c) for c in args.workers.split(",")]
    load = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="cxrnode-scaleout-"))
    postgresql = PostgreSQL().start()
    orthanc = Orthanc(work / "orthanc", free_port(), free_port()).start()
    destinations = [{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}]
    rates: dict[str, list[float]] = {}
    try:
        for workers in [0, *counts]:
            name = "default" if workers == 0 else f"{workers}w"
            url = ""
            if workers:
                database = f"scaleout_{workers}"
                postgresql.execute(f"CREATE DATABASE {database}")
                url = postgresql.url(database)
            print(f"{name}: starting", flush=True)
            rates[name] = measure(Layout(work, name, destinations, workers, url), orthanc, work / name, args.n,
                                  args.rounds)
    finally:
        orthanc.stop()
        postgresql.stop()
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(rates["default"])
    rows = ["| layout | radiographs/s (median) | rounds | vs one process |", "| --- | ---: | --- | ---: |"]
    for name, values in rates.items():
        label = ("one `serve` (SQLite, folder, concurrency "
                 f"{_default_concurrency()})" if name == "default" else
                 f"receiver,sender + {name[:-1]} worker process(es), PostgreSQL")
        rows.append(f"| {label} | {statistics.median(values):.2f} | "
                    f"{', '.join(f'{v:.2f}' for v in values)} | {statistics.median(values) / base:.2f}x |")
    table = "\n".join(rows)
    print(table)
    if args.record:
        block = "\n".join([
            (f"### `{args.label}`: commit {git_commit()}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
             f"host `{platform.node()}`, {os.cpu_count()} CPU cores, CPU only"),
            "",
            (f"Load average before: {', '.join(f'{v:.1f}' for v in load)}; {args.n} radiographs per round, "
             f"{args.rounds} round(s) after {WARM_UP} to warm up."),
            "",
            table,
            "",
            (f"Command: `PYTHONPATH=. .venv/bin/python -m bench.bench_scaleout --n {args.n} --rounds {args.rounds} "
             f"--workers {args.workers} --record --label '{args.label}'`"),
        ])
        record(args.results, args.label, block, mark=MARK, section_head=SECTION_HEAD)


if __name__ == "__main__":
    main()
