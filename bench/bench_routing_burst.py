"""Chest latency behind a burst of off-target objects (a whole CT study routed by mistake).

A real Orthanc (the PACS receiving the results) and a real ``cxrnode serve`` (CPU) on loopback.
The clock runs from the DX's association request to both its SEG and SR listed by Orthanc.
Three conditions, measured side by side in one run, each a median of ``--runs``:

- ``alone``: the DX with nothing else arriving;
- ``during``: the DX in its own association while another association is storing a burst of
  ``--burst`` CT slices (started ``--head`` slices before the DX);
- ``after``: the DX sent right after the whole burst was acknowledged, on the same association
  (what a PACS that routes one study after the other does).

    python -m bench.bench_routing_burst [--runs 5] [--burst 500] [--record]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from pydicom import Dataset
from pynetdicom import AE

from tests.dicom_factory import FIXTURE_DIR, make_ct_slice, make_dx, new_instance
from tests.servers import NodeProcess, Orthanc, free_port

RESULTS = Path(__file__).with_name("RESULTS.md")
MARK = "routing_burst"


def associate(node: NodeProcess, *datasets: Dataset):  # type: ignore[no-untyped-def]
    ae = AE(ae_title="BENCHSCU")
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    if not assoc.is_established:
        raise RuntimeError("association refused")
    return assoc


def wait_results(orthanc: Orthanc, ds: Dataset) -> None:
    orthanc.wait_for_result_series(ds.StudyInstanceUID, 600, interval_s=0.05)


def store(assoc, ds: Dataset) -> None:  # type: ignore[no-untyped-def]
    status = assoc.send_c_store(ds)
    if status.Status != 0:
        raise RuntimeError(f"C-STORE answered 0x{status.Status:04X}")


def alone(orthanc: Orthanc, node: NodeProcess, dx: Dataset) -> float:
    ds = new_instance(dx)
    started = time.perf_counter()
    assoc = associate(node, ds)
    store(assoc, ds)
    assoc.release()
    wait_results(orthanc, ds)
    return time.perf_counter() - started


def during(orthanc: Orthanc, node: NodeProcess, dx: Dataset, ct: Dataset, burst: int,
           head: int) -> tuple[float, float]:
    """The DX while a burst is stored; returns (DX seconds, burst objects per second)."""
    slices = [new_instance(ct) for _ in range(burst)]
    sent, burst_s = threading.Event(), [0.0]

    def send_burst() -> None:
        assoc = associate(node, ct)
        started = time.perf_counter()
        for i, ds in enumerate(slices):
            store(assoc, ds)
            if i + 1 == head:
                sent.set()
        burst_s[0] = time.perf_counter() - started
        assoc.release()

    thread = threading.Thread(target=send_burst)
    thread.start()
    sent.wait(600)
    ds = new_instance(dx)
    started = time.perf_counter()
    assoc = associate(node, ds)
    store(assoc, ds)
    assoc.release()
    wait_results(orthanc, ds)
    took = time.perf_counter() - started
    thread.join()
    return took, burst / burst_s[0]


def after(orthanc: Orthanc, node: NodeProcess, dx: Dataset, ct: Dataset, burst: int) -> float:
    slices = [new_instance(ct) for _ in range(burst)]
    ds = new_instance(dx)
    assoc = associate(node, ct, ds)
    for s in slices:
        store(assoc, s)
    started = time.perf_counter()
    store(assoc, ds)
    assoc.release()
    wait_results(orthanc, ds)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--burst", type=int, default=500)
    parser.add_argument("--head", type=int, default=50, help="burst slices stored before the DX starts")
    parser.add_argument("--record", action="store_true", help="write the table into bench/RESULTS.md")
    args = parser.parse_args()
    dx = make_dx(FIXTURE_DIR / "MCUCXR_0017_0.png", size=(2048, 2048))
    ct = make_ct_slice(size=512)
    times: dict[str, list[float]] = {"alone": [], "during": [], "after": []}
    rates: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        node_port, http_port, dicom_port = free_port(), free_port(), free_port()
        orthanc = Orthanc(work / "orthanc", http_port, dicom_port).start()
        node = NodeProcess(work / "node", node_port, destinations=[
            {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": dicom_port}])
        try:
            node.start()
            alone(orthanc, node, dx)  # warm-up: first-call costs excluded
            for _ in range(args.runs):  # interleaved, so that drift hits every condition alike
                times["alone"].append(alone(orthanc, node, dx))
                took, rate = during(orthanc, node, dx, ct, args.burst, args.head)
                times["during"].append(took)
                rates.append(rate)
                times["after"].append(after(orthanc, node, dx, ct, args.burst))
            jobs = node.cli("status", "--json").stdout
        finally:
            if node.proc is not None:
                node.stop()
            orthanc.stop()
    base = statistics.median(times["alone"])
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        rows.append(f"| {name} | {median:.2f} | {median / base:.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    table = "\n".join([
        "| DX sent | median s (C-STORE -> SEG+SR in Orthanc) | ratio to alone | runs s |",
        "| --- | ---: | ---: | --- |", *rows])
    summary = (f"Burst of {args.burst} CT slices (512x512, 16-bit) acknowledged at a median "
               f"{statistics.median(rates):.0f} objects/s while the DX was analysed.")
    print(table)
    print(summary)
    print("node jobs by state:", json.loads(jobs)["counts"])
    if args.record:
        record(table, summary, args)


def record(table: str, summary: str, args: argparse.Namespace) -> None:
    import os
    import platform

    section = "\n".join([
        f"<!-- {MARK}: start -->",
        "## Chest latency behind a burst of off-target objects (bench/bench_routing_burst.py)",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, host `{platform.node()}`, {os.cpu_count()} CPU cores, "
        f"device cpu, unet. 2048x2048 12-bit DX from `tests/data/MCUCXR_0017_0.png`, new UIDs each run; "
        f"median of {args.runs} after one warm-up, conditions interleaved. `during`: the DX's own "
        f"association starts after {args.head} of the {args.burst} CT slices were acknowledged. "
        "Off-target objects are recorded as discarded jobs at C-STORE without keeping their bytes, "
        "so they never reach the worker's queue.",
        "",
        table,
        "",
        summary,
        "",
        f"Command: `python -m bench.bench_routing_burst --runs {args.runs} --burst {args.burst} --record`",
        f"<!-- {MARK}: end -->",
    ])
    text = RESULTS.read_text()
    start, end = f"<!-- {MARK}: start -->", f"<!-- {MARK}: end -->"
    if start in text:
        text = text[:text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
