"""Per-image cost of the worker pipeline (read → analyse → SEG + SR → verify), CPU vs GPU.

Runs ``node.worker.pipeline.Pipeline.run`` on one DICOM file, the same code path as the node, on
each requested device side by side in one process, and also times ``LungAnalyzer.analyze`` alone.

    python -m bench.bench_pipeline FILE.dcm [--devices cpu,cuda] [--runs 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from pydicom import dcmread

from node.imaging import display_pixels
from node.settings import load_settings
from node.worker.pipeline import Pipeline


def timed(fn, runs: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--devices", default="cpu")
    parser.add_argument("--arch", default="unet")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    pixels = display_pixels(dcmread(args.file))
    print(f"image {pixels.shape[1]}x{pixels.shape[0]}; cpu threads {os.cpu_count()}; runs {args.runs}")
    print("| device | analyze() median ms | pipeline run() median ms | images/s (run) |")
    print("| --- | ---: | ---: | ---: |")
    for device in args.devices.split(","):
        # a fresh model registry, so that its champion is the --arch segmenter (not var/models' champion)
        settings = load_settings(None, env={"CXRNODE_WORKER_DEVICE": device,
                                            "CXRNODE_WORKER_ARCHITECTURE": args.arch,
                                            "CXRNODE_MODELS_REGISTRY": tempfile.mkdtemp(prefix="cxrnode-bench-")})
        pipeline = Pipeline.load(settings)
        assert pipeline.analyzer.device.startswith(device), pipeline.analyzer.device
        for _ in range(3):
            pipeline.run(args.file)
        analyze = statistics.median(timed(lambda: pipeline.analyzer.analyze(pixels), args.runs))
        run = statistics.median(timed(lambda: pipeline.run(args.file), args.runs))
        print(f"| {pipeline.analyzer.device} ({args.arch}) | {analyze * 1000:.1f} | {run * 1000:.1f} "
              f"| {1 / run:.2f} |")


if __name__ == "__main__":
    main()
