"""torch vs onnxruntime on the CPU, per image (``[worker] runtime``), written to bench/RESULTS.md.

Usage::

    PYTHONPATH=. .venv/bin/python bench/bench_runtime.py [--image PNG] [--rounds 5] [--repeats 10] [--no-write]

Both runtimes are loaded in one process from the shipped weights (ONNX exported into a fresh
temporary cache: the one-off export and a cached load are timed too) and timed side by side:
each round times every step ``--repeats`` times in torch and in onnxruntime, the order of the two
alternating from round to round, so that a change of the machine's load hits both. Steps: each
segmenter's call as ``analyze`` makes it (``lung_probabilities``: forward + sigmoid), the TB
scorer's (``_tb_score`` on a fixed input: forward + sigmoid, 5-member ensemble), the whole
``LungAnalyzer.analyze`` on a 512 x 512 image, and two threads analysing at once on one analyzer
(``worker.concurrency = 2``, images/s). Reported: the median over all rounds (ms), the ratio
onnx / torch of the medians (below 1: ONNX faster) and the per-round ratios, with torch's and
onnxruntime's thread settings and the load average before and after. Only this script's section
of RESULTS.md (between HTML-comment markers) is rewritten.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import data, onnx_runtime, registry, transforms
from models.inference import LungAnalyzer

REPO = Path(__file__).resolve().parents[1]
RUNTIMES = ("torch", "onnx")


def markers(label: str) -> tuple[str, str]:
    """The HTML comments around this benchmark's section for ``label`` in RESULTS.md."""
    return f"<!-- bench_runtime {label}: start -->", f"<!-- bench_runtime {label}: end -->"


def write_section(path: Path, section: str, label: str) -> None:
    """Replace this benchmark's section of ``path`` for ``label`` (between its markers), or append it."""
    start, end = markers(label)
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + section + "\n"
    path.write_text(text, encoding="utf-8")


def samples_ms(fn: Callable[[], object], repeats: int) -> list[float]:
    """``repeats`` wall times of ``fn`` in ms, after one warm-up call."""
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def two_threads_ms(analyzer: LungAnalyzer, image: np.ndarray, per_thread: int) -> list[float]:
    """Two threads each analysing ``image`` ``per_thread`` times on one analyzer: ms per image
    (wall time / images), one value per run (three runs)."""
    out = []
    for _ in range(3):
        def work() -> None:
            for _ in range(per_thread):
                analyzer.analyze(image)

        threads = [threading.Thread(target=work) for _ in range(2)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out.append((time.perf_counter() - t0) * 1000 / (2 * per_thread))
    return out


def load_average() -> str:
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", default=str(REPO / "tests" / "data" / "MCUCXR_0017_0.png"),
                   help="a chest radiograph (PNG); resized to 512 x 512 if it is another size")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10, help="timed calls per step, runtime and round")
    p.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    p.add_argument("--label", default="default",
                   help="names this run's section in RESULTS.md (one section per label, e.g. per environment)")
    args = p.parse_args(argv)
    import onnxruntime as ort
    import torch

    load_before = load_average()
    image = data.load_image(args.image)
    if image.shape != (512, 512):
        image = transforms.resize_bilinear(image, (512, 512))
    cache = Path(tempfile.mkdtemp(prefix="cxrnode-bench-onnx-"))

    analyzers = {(rt, arch): LungAnalyzer.load(arch, "cpu", runtime=rt, onnx_cache=cache)
                 for arch in ("unet", "resunet") for rt in RUNTIMES}
    # One-off costs per network: the export (into an empty cache) and a load from the cache.
    one_off: list[tuple[str, float, float]] = []
    fresh = Path(tempfile.mkdtemp(prefix="cxrnode-bench-onnx-once-"))
    for label, model, size in (("unet", analyzers[("torch", "unet")]._seg, "seg"),
                               ("resunet", analyzers[("torch", "resunet")]._seg, "seg"),
                               ("TB scorer", analyzers[("torch", "unet")]._tb, "tb")):
        a = analyzers[("torch", "unet")]
        shape = (1, 1, a.seg_size, a.seg_size) if size == "seg" else (1, 2, a.tb_size, a.tb_size)
        onnx_runtime.clear_cache()
        t0 = time.perf_counter()
        onnx_runtime.network_for(model, shape, fresh)
        exported = time.perf_counter() - t0
        onnx_runtime.clear_cache()
        t0 = time.perf_counter()
        onnx_runtime.network_for(model, shape, fresh)
        one_off.append((label, exported, time.perf_counter() - t0))
    ort_net = analyzers[("onnx", "unet")]._seg_onnx
    so = ort_net.session.get_session_options()
    threads_line = (f"torch {torch.__version__}: {torch.get_num_threads()} intra-op threads, "
                    f"{torch.get_num_interop_threads()} inter-op, OMP_WAIT_POLICY "
                    f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}; onnxruntime {ort.__version__} (CPUExecutionProvider): "
                    f"intra_op_num_threads {so.intra_op_num_threads}, inter_op_num_threads {so.inter_op_num_threads}, "
                    f"allow_spinning {so.get_session_config_entry('session.intra_op.allow_spinning')}, "
                    f"graph optimisation {so.graph_optimization_level.name}, opset {onnx_runtime.OPSET}")
    print(threads_line, flush=True)
    print(f"{os.cpu_count()} CPU cores; load average before: {load_before}", flush=True)
    for label, exported, cached in one_off:
        print(f"one-off: {label}: export {exported:.2f} s, load from the cache {cached:.2f} s", flush=True)

    unet = analyzers[("torch", "unet")]
    net_image = transforms.preprocess(image, unet.seg_size)
    prob = unet.lung_probabilities(net_image)
    tb_x = transforms.tb_input(net_image, prob, unet.tb_size)
    members = int(registry.read_meta(registry.TB_FILE).get("members", 1))
    steps: list[tuple[str, str, dict[str, Callable[[], object]]]] = [
        ("segmenter: unet", f"1x1x{unet.seg_size}x{unet.seg_size}",
         {rt: (lambda a=analyzers[(rt, "unet")]: a.lung_probabilities(net_image)) for rt in RUNTIMES}),
        ("segmenter: resunet", f"1x1x{unet.seg_size}x{unet.seg_size}",
         {rt: (lambda a=analyzers[(rt, "resunet")]: a.lung_probabilities(net_image)) for rt in RUNTIMES}),
        ("TB scorer", f"smallcnn x{members}, 1x{tb_x.shape[0]}x{unet.tb_size}x{unet.tb_size}",
         {rt: (lambda a=analyzers[(rt, "unet")]: a._tb_score(tb_x)) for rt in RUNTIMES}),
        ("analyze(): unet", "512x512 image",
         {rt: (lambda a=analyzers[(rt, "unet")]: a.analyze(image)) for rt in RUNTIMES}),
        ("analyze(): resunet", "512x512 image",
         {rt: (lambda a=analyzers[(rt, "resunet")]: a.analyze(image)) for rt in RUNTIMES}),
    ]
    # the same answer from both, or the timing compares different work
    a, b = analyzers[("torch", "unet")].analyze(image), analyzers[("onnx", "unet")].analyze(image)
    assert np.array_equal(a.lung_mask, b.lung_mask) and abs(a.tb_score - b.tb_score) < 1e-5

    times: dict[tuple[str, str], list[float]] = {}
    round_ratios: dict[str, list[float]] = {}
    for r in range(args.rounds):
        order = RUNTIMES if r % 2 == 0 else RUNTIMES[::-1]
        for step, _, fns in steps:
            got = {rt: samples_ms(fns[rt], args.repeats) for rt in order}
            for rt in RUNTIMES:
                times.setdefault((step, rt), []).extend(got[rt])
            round_ratios.setdefault(step, []).append(statistics.median(got["onnx"]) / statistics.median(got["torch"]))
        step = "analyze() x 2 threads: unet"
        got = {rt: two_threads_ms(analyzers[(rt, "unet")], image, max(2, args.repeats // 2)) for rt in order}
        for rt in RUNTIMES:
            times.setdefault((step, rt), []).extend(got[rt])
        round_ratios.setdefault(step, []).append(statistics.median(got["onnx"]) / statistics.median(got["torch"]))
        print(f"round {r + 1}/{args.rounds} done; load average {load_average()}", flush=True)
    steps.append(("analyze() x 2 threads: unet", "512x512, ms per image (wall / images)", {}))
    load_after = load_average()

    rows = []
    for step, detail, _ in steps:
        t, o = statistics.median(times[(step, "torch")]), statistics.median(times[(step, "onnx")])
        rows.append((step, detail, t, o, o / t, round_ratios[step]))
        print(f"{step:30} {detail:42} torch {t:8.1f} ms  onnx {o:8.1f} ms  onnx/torch {o / t:5.2f}  "
              f"rounds {', '.join(f'{x:.2f}' for x in round_ratios[step])}", flush=True)
    print(f"load average after: {load_after}")
    for folder in (cache, fresh):
        shutil.rmtree(folder, ignore_errors=True)

    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    env = "".join(f"{k}={os.environ[k]} " for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS") if k in os.environ)
    command = f"{env}PYTHONPATH=. .venv/bin/python bench/bench_runtime.py " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    start, end = markers(args.label)
    lines = [
        start,
        f"## torch vs ONNX Runtime on the CPU (bench/bench_runtime.py, issue 9): {args.label}",
        "",
        (f"{when}; {platform.node()}, {os.cpu_count()} CPU cores, no GPU; Python {platform.python_version()}. "
        f"{threads_line}. Image: `{Path(args.image).name}` at 512 x 512. {args.rounds} rounds of {args.repeats} "
        f"timed calls per step and runtime (after one warm-up), torch and ONNX side by side, their order "
        f"alternating by round; median of all calls. Load average before: {load_before}; after: {load_after}."),
        "",
        "| step | input | torch median ms | ONNX median ms | ONNX / torch | per round |",
        "| --- | --- | ---: | ---: | ---: | --- |",
        *[f"| {s} | {d} | {t:.1f} | {o:.1f} | {q:.2f} | {', '.join(f'{x:.2f}' for x in rr)} |"
          for s, d, t, o, q, rr in rows],
        "",
        "One-off, when a network is loaded: export (first start with these weights; includes the check against "
        "torch) / session from the cache: " + "; ".join(
            f"{label} {exported:.2f} s / {cached:.2f} s" for label, exported, cached in one_off) + ".",
        "",
        f"Command: `{command}`",
        end,
    ]
    if not args.no_write:
        write_section(Path(args.out), "\n".join(lines), args.label)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
