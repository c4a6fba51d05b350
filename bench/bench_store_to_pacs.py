"""Time from C-STORE to both results stored in the PACS, end to end.

A real Orthanc and a real ``cxrnode serve`` (CPU unless ``--device``) on loopback ports; the NEMA
chest CR (JPEG 2000, 1955x1841, from ``pydicom-data``) is sent N times with new UIDs by a pynetdicom
SCU, and the clock stops when Orthanc holds both the SEG and the SR of that study.

    python -m bench.bench_store_to_pacs [--runs 5] [--device cpu|cuda] [--arch unet|resunet]

Prints the per-run seconds and the median, and appends a line to bench/RESULTS.md with --record.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE

from tests.dicom_factory import nema_chest_cr_path
from tests.servers import NodeProcess, Orthanc, free_port

RESULTS = Path(__file__).with_name("RESULTS.md")


def one_run(orthanc: Orthanc, node: NodeProcess, source: Path) -> float:
    ds = dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    started = time.perf_counter()
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    status = assoc.send_c_store(ds)
    assoc.release()
    if status.Status != 0:
        raise RuntimeError(f"C-STORE answered 0x{status.Status:04X}")
    orthanc.wait_for_result_series(ds.StudyInstanceUID, 600, interval_s=0.05)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="unet")
    parser.add_argument("--record", action="store_true", help="append the result to bench/RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        node_port, http_port, dicom_port = free_port(), free_port(), free_port()
        orthanc = Orthanc(work / "orthanc", http_port, dicom_port).start()
        node = NodeProcess(work / "node", node_port, destinations=[
            {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": dicom_port}],
            extra={"worker": {"device": args.device, "architecture": args.arch}})
        try:
            node.start()
            source = nema_chest_cr_path()
            one_run(orthanc, node, source)  # warm-up: first-call costs (model, highdicom) excluded
            times = [one_run(orthanc, node, source) for _ in range(args.runs)]
        finally:
            if node.proc is not None:
                node.stop()
            orthanc.stop()
    median = statistics.median(times)
    print("runs (s):", " ".join(f"{t:.2f}" for t in times))
    print(f"median C-STORE -> SEG+SR in Orthanc: {median:.2f} s ({args.device}, {args.arch})")
    if args.record:
        record(f"| {datetime.now(UTC):%Y-%m-%d %H:%M} | {args.device}, {args.arch} | "
               f"{platform.node()} | {median:.2f} | {', '.join(f'{t:.2f}' for t in times)} |")


START, END = "<!-- store_to_pacs: start -->", "<!-- store_to_pacs: end -->"
HEADER = f"""{START}
## C-STORE to SEG+SR stored in Orthanc (bench/bench_store_to_pacs.py)

NEMA chest CR (JPEG 2000, 1955x1841), new UIDs each run, one warm-up run excluded; the clock runs
from association request to both results listed by Orthanc's REST API (50 ms polling).
Command: `python -m bench.bench_store_to_pacs --runs 5 --record`

| when (UTC) | device, arch | host | median s | runs s |
| --- | --- | --- | ---: | --- |
{END}"""


def record(row: str) -> None:
    """Add ``row`` to this benchmark's own section of RESULTS.md, leaving other sections alone."""
    text = RESULTS.read_text() if RESULTS.exists() else ""
    if START not in text:
        text = text.rstrip("\n") + "\n\n" + HEADER + "\n"
    head, _, tail = text.partition(END)
    RESULTS.write_text(f"{head}{row}\n{END}{tail}")


if __name__ == "__main__":
    main()
