"""Per-image inference time of the shipped models (CPU by default), written to bench/RESULTS.md.

Usage::

    python bench/bench_inference.py DATA_DIR [--repeats 20] [--device cpu] [--out bench/RESULTS.md]

Reports the median (and min) of N timed runs after two warm-ups for: preprocessing of a
2048x2048 and a 4096x4096 array, each segmenter's forward pass (unet vs resunet), the TB
scorer's forward pass, mapping the probabilities back to 2048/4096 with post-processing,
and the whole ``LungAnalyzer.analyze`` on a data-set image and on a 2048x2048 upscale of it.
Only this script's section of RESULTS.md (between HTML-comment markers) is rewritten.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import data, transforms  # noqa: E402
from models.inference import LungAnalyzer  # noqa: E402

START, END = "<!-- bench_inference: start -->", "<!-- bench_inference: end -->"


def write_section(path: Path, section: str) -> None:
    """Replace this benchmark's section of ``path`` (between START/END), keeping everything else.

    Other benchmarks (e.g. bench_store_to_pacs.py) append their own lines to the same file.
    """
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = section + "\n\n" + text if text else section + "\n"
    path.write_text(text, encoding="utf-8")


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median, min) wall time of ``fn`` in milliseconds, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), min(times)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the results table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="data folder with index.csv (the first case's image is used)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = p.parse_args(argv)
    import torch

    case = data.read_index(args.data)[0]
    image = data.load_image(case.image_path)
    rng = np.random.default_rng(0)
    big = {n: (transforms.resize_bilinear(image, (n, n)) * 16 + rng.normal(0, 4, (n, n))).astype(np.float32)
           for n in (2048, 4096)}
    rows: list[tuple[str, str, float, float]] = []

    def add(step: str, detail: str, fn: Callable[[], object], repeats: int = args.repeats) -> None:
        med, best = timed(fn, repeats)
        rows.append((step, detail, med, best))
        print(f"{step:38} {detail:32} median {med:8.1f} ms  min {best:8.1f} ms", flush=True)

    analyzers = {arch: LungAnalyzer.load(arch=arch, device=args.device) for arch in ("unet", "resunet")}
    size = analyzers["unet"].seg_size
    for n, arr in big.items():
        add("preprocess (area resize + percentiles)", f"{n}x{n} float32 -> {size}", lambda a=arr: transforms.preprocess(a, size))
    net_image = transforms.preprocess(image, size)
    for arch, an in analyzers.items():
        add(f"segmenter forward: {arch}", f"1x1x{an.seg_size}x{an.seg_size}", lambda an=an: an.lung_probabilities(net_image))
    an = analyzers["unet"]
    prob = an.lung_probabilities(net_image)
    members = int(an._tb.meta.get("members", 1))
    add("TB scorer (crop + forward)", f"{an._tb.meta['arch']} x{members}, 2x{an.tb_size}x{an.tb_size}",
        lambda: an.tb_probability(net_image, prob))
    for n in big:
        add("probabilities -> masks (post-process)", f"{size} -> {n}x{n}", lambda n=n: transforms.probabilities_to_masks(prob, (n, n)))
    for arch, a in analyzers.items():
        add(f"analyze() end to end: {arch}", f"{image.shape[0]}x{image.shape[1]} data image", lambda a=a: a.analyze(image))
        add(f"analyze() end to end: {arch}", "2048x2048", lambda a=a: a.analyze(big[2048]), max(9, args.repeats // 2))

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        START,
        "## Inference benchmark (bench/bench_inference.py)",
        "",
        f"{when}; device `{args.device}`; {os.cpu_count()} CPU cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads; Python {platform.python_version()}; median and min of "
        f"{args.repeats} runs after 2 warm-ups (end-to-end 2048 runs: {max(9, args.repeats // 2)}). "
        f"Image: `{case.case_id}` from `{args.data}`. Segmenter input {size} px. The cores are shared "
        "with other work: where a median is far above its min, that row was disturbed (rerun it).",
        "",
        "| step | input | median ms | min ms |",
        "| --- | --- | ---: | ---: |",
        *[f"| {s} | {d} | {m:.1f} | {b:.1f} |" for s, d, m, b in rows],
        "",
        "Command: `python bench/bench_inference.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`",
        END,
    ]
    write_section(Path(args.out), "\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
