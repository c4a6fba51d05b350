"""Evaluate the shipped models on any data folder, through the node's own inference path.

:func:`evaluate` runs :meth:`models.inference.LungAnalyzer.analyze` (same class, same
weights as the node) on every case and compares the masks with the data set's own masks
at the masks' size (the prediction is mapped to that geometry by the shared transforms).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from models import data, metrics, plausibility
from models.inference import LungAnalyzer

#: WHO target product profile for TB screening: sensitivity >= 0.90 with specificity >= 0.70.
WHO_MIN_SENSITIVITY = 0.90
WHO_MIN_SPECIFICITY = 0.70
#: Cases of lowest lung Dice listed in the result (``worst_cases``) and the table.
WORST_CASES = 5
#: The columns of ``cxrnode evaluate --per-case FILE.csv``.
PER_CASE_COLUMNS = ("case_id", "source", "tb_label", "tb_score", "tb_call", "plausibility", "dice", "jaccard", "hd95")
#: Seed of the simulated acquisition shifts (``--shift``); with the case id and the shift it fixes each draw.
SHIFT_SEED = 20240611


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _summary(rows: list[dict[str, Any]], threshold: float, n_boot: int) -> dict[str, Any]:
    seg = [r for r in rows if "dice" in r]
    lab = [r for r in rows if r["label"] is not None]
    y = np.array([r["label"] for r in lab], dtype=int)
    s = np.array([r["score"] for r in lab], dtype=float)
    both = len(y) > 0 and 0 < y.sum() < len(y)
    auc = metrics.roc_auc(y, s) if both else float("nan")
    ci = metrics.roc_auc_ci(y, s, n_boot=n_boot) if both else (float("nan"), float("nan"))
    sens, spec = metrics.sensitivity_specificity(y, s, threshold) if len(y) else (float("nan"), float("nan"))
    calibration = metrics.calibration(y, s) if len(y) else None
    return {
        "calibration": calibration,
        "n_cases": len(rows),
        "n_masks": len(seg),
        "n_labelled": len(lab),
        "lung_dice_mean": _mean([r["dice"] for r in seg]),
        "lung_dice_min": float(min((r["dice"] for r in seg), default=float("nan"))),
        "lung_jaccard_mean": _mean([r["jaccard"] for r in seg]),
        "lung_hd95_mean": _mean([r["hd95"] for r in seg]),
        "plausibility_min": float(min((r["plausibility"] for r in rows), default=float("nan"))),
        "n_implausible": sum(r["plausibility"] < plausibility.PLAUSIBLE for r in rows),
        "tb_auc": auc,
        "tb_auc_ci95": list(ci),
        "sensitivity": sens,
        "specificity": spec,
        "threshold": threshold,
        "who_target_met": bool(sens >= WHO_MIN_SENSITIVITY and spec >= WHO_MIN_SPECIFICITY),
    }


def _clean(obj: Any) -> Any:
    """Replace NaN/inf with None so the result is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def analyse_case(analyzer: LungAnalyzer, case: data.Case) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None, Any]:
    """One case through the node's inference path: (row, image, reference mask or None, analysis).

    The row holds case_id, source, label, score, the segmentation's anatomical plausibility
    (:func:`models.plausibility.analysis_plausibility`, no reference needed) and, when the case has a
    mask, dice, jaccard and hd95 at the mask's size. :func:`evaluate` and the promotion gate (:mod:`models.gate`) both use it.
    """
    image = data.load_image(case.image_path)
    truth = data.load_mask(case.mask_path) if case.mask_path is not None else None
    row, result = analyse_image(analyzer, case, image, truth)
    return row, image, truth, result


def analyse_image(analyzer: LungAnalyzer, case: data.Case, image: np.ndarray,
                  truth: np.ndarray | None) -> tuple[dict[str, Any], Any]:
    """:func:`analyse_case` on pixels already loaded (and perhaps shifted): (row, analysis)."""
    result = analyzer.analyze(image, out_shape=truth.shape if truth is not None else None)
    row: dict[str, Any] = {"case_id": case.case_id, "source": case.source, "label": case.tb_label,
                           "score": result.tb_score, "plausibility": plausibility.analysis_plausibility(result)}
    if truth is not None:
        row.update(dice=metrics.dice(result.lung_mask, truth), jaccard=metrics.jaccard(result.lung_mask, truth),
                   hd95=metrics.hd95(result.lung_mask, truth))
    return row, result


def evaluate(
    data_dir: str | Path,
    split: str | None = None,
    arch: str = "unet",
    device: str = "auto",
    weights_dir: str | Path | None = None,
    n_boot: int = 2000,
    progress: bool = True,
    overlays_dir: str | Path | None = None,
    per_case_csv: str | Path | None = None,
    worst: int = WORST_CASES,
    shifts: str | Sequence[str] | None = None,
    shift_seed: int = SHIFT_SEED,
    runtime: str = "torch",
    onnx_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Metrics of the shipped models on ``data_dir`` (``split`` None = all cases).

    Keys: lung_dice_mean, lung_dice_min, lung_jaccard_mean, lung_hd95_mean, tb_auc,
    tb_auc_ci95, sensitivity, specificity, threshold, who_target_met, n_cases, n_masks,
    n_labelled, per_source {source: same metrics}, arch, split, segmenter, tb_model.
    Undefined values (e.g. AUC with one class) are None. With ``overlays_dir``, every case
    with a reference mask also gets a picture there (:mod:`models.overlays`) and the result
    names the index page (``overlays_index``). ``calibration`` (of all labelled cases, and per
    source): the reliability diagram's bins and the expected calibration error of the TB score
    (:func:`models.metrics.calibration`). ``worst_cases``: the ``worst`` cases of lowest lung Dice.
    ``plausibility_min`` / ``n_implausible``: the lowest anatomical plausibility of a segmentation and
    how many score below :data:`models.plausibility.PLAUSIBLE` (:mod:`models.plausibility`; every
    case, with a reference mask or not), and ``least_plausible``: the ``worst`` cases of lowest score.
    With ``per_case_csv``, one row per case is written there (:data:`PER_CASE_COLUMNS`).
    ``runtime`` / ``onnx_cache``: as for :meth:`models.inference.LungAnalyzer.load` (torch or ONNX).

    ``shifts`` (``"invert,blur"``, ``blur:0.01`` for another strength, or a list): the stress test of
    :func:`evaluate_shifted` instead -- one such result per simulated acquisition shift plus ``none``.
    """
    if shifts is not None:
        return evaluate_shifted(data_dir, shifts, split=split, arch=arch, device=device, weights_dir=weights_dir,
                                n_boot=n_boot, progress=progress, overlays_dir=overlays_dir,
                                per_case_csv=per_case_csv, worst=worst, seed=shift_seed, runtime=runtime,
                                onnx_cache=onnx_cache)
    cases = data.read_index(data_dir, split)
    analyzer = LungAnalyzer.load(arch=arch, device=device, weights_dir=weights_dir, runtime=runtime,
                                 onnx_cache=onnx_cache)
    rows: list[dict[str, Any]] = []
    pictures: list[Any] = []
    if overlays_dir is not None:
        from models import overlays

        overlays_dir = Path(overlays_dir)
        overlays_dir.mkdir(parents=True, exist_ok=True)
    for case in tqdm(cases, desc=f"evaluate {arch}", disable=not progress, leave=False):
        row, image, truth, result = analyse_case(analyzer, case)
        if truth is not None and overlays_dir is not None:
            pictures.append(_write_case_picture(overlays_dir, case, image, result, truth, row))
        rows.append(row)
    out = _summary(rows, analyzer.tb_threshold, n_boot)
    out["worst_cases"] = _worst_cases(rows, worst)
    out["least_plausible"] = _least_plausible(rows, worst)
    if per_case_csv is not None:
        out["per_case_csv"] = str(_write_per_case(Path(per_case_csv), rows, analyzer.tb_threshold))
    out["per_source"] = _per_source(rows, analyzer.tb_threshold, n_boot)
    seg_id, tb_id = analyzer.segmenter_identity, analyzer.tb_identity
    out.update(arch=arch, split=split, segmenter=f"{seg_id.name} {seg_id.version}", tb_model=f"{tb_id.name} {tb_id.version}")
    if overlays_dir is not None:
        out["overlays_index"] = str(overlays.write_index(overlays_dir, pictures))
    return _clean(out)


def _worst_cases(rows: list[dict[str, Any]], worst: int) -> list[dict[str, Any]]:
    return [{k: r[k] for k in ("case_id", "source", "dice", "jaccard", "hd95", "plausibility")}
            for r in sorted((r for r in rows if "dice" in r), key=lambda r: r["dice"])[:worst]]


def _least_plausible(rows: list[dict[str, Any]], worst: int) -> list[dict[str, Any]]:
    return [{"case_id": r["case_id"], "source": r["source"], "plausibility": r["plausibility"], "dice": r.get("dice")}
            for r in sorted(rows, key=lambda r: (r["plausibility"], r["case_id"]))[:worst]]


def _per_source(rows: list[dict[str, Any]], threshold: float, n_boot: int) -> dict[str, Any]:
    by_source: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_source[r["source"]].append(r)
    return {src: _summary(rs, threshold, n_boot) for src, rs in sorted(by_source.items())}


#: The headline figures of each shift, side by side in ``comparison`` and the table.
COMPARISON_KEYS = ("tb_auc", "tb_auc_ci95", "sensitivity", "specificity", "who_target_met", "lung_dice_mean",
                   "lung_dice_min", "lung_hd95_mean", "n_implausible")


def evaluate_shifted(
    data_dir: str | Path,
    shifts: str | Sequence[str],
    split: str | None = None,
    arch: str = "unet",
    device: str = "auto",
    weights_dir: str | Path | None = None,
    n_boot: int = 2000,
    progress: bool = True,
    overlays_dir: str | Path | None = None,
    per_case_csv: str | Path | None = None,
    worst: int = WORST_CASES,
    seed: int = SHIFT_SEED,
    runtime: str = "torch",
    onnx_cache: str | Path | None = None,
) -> dict[str, Any]:
    """The stress test: :func:`evaluate` under each simulated acquisition shift (:mod:`models.shifts`).

    Every image is loaded once and analysed unshifted (``none``, always first) and under each named
    shift (``"invert,blur"``, ``blur:0.01`` for a strength other than the default, or a list), with a
    generator fixed by ``seed``, the case id and the shift (:func:`models.shifts.case_rng`), so reruns
    are identical. Geometric shifts (``crop``) move the reference mask with the image; the others keep
    it (a border hides lung, it does not remove it: see :mod:`models.shifts`). The threshold is the
    shipped one throughout.

    Keys: ``shifts`` (labels, ``none`` first), ``shift_seed``, ``threshold``, arch, split, segmenter,
    tb_model; ``comparison``: one row per shift with :data:`COMPARISON_KEYS`, ``ece`` and ``brier``;
    ``results``: per shift label, everything :func:`evaluate` returns for that shift (without arch, split,
    segmenter, tb_model) plus ``shift``, ``shift_name``, ``shift_strength`` and ``shift_mimics``. With
    ``per_case_csv``, one CSV with a ``shift`` column; with ``overlays_dir``, one subfolder per shift.
    """
    from models import shifts as acquisition

    specs = [acquisition.ShiftSpec(acquisition.NONE)]
    specs += [s for s in acquisition.parse_specs(shifts) if s.name != acquisition.NONE]
    cases = data.read_index(data_dir, split)
    analyzer = LungAnalyzer.load(arch=arch, device=device, weights_dir=weights_dir, runtime=runtime,
                                 onnx_cache=onnx_cache)
    threshold = analyzer.tb_threshold
    rows: dict[str, list[dict[str, Any]]] = {s.label: [] for s in specs}
    pictures: dict[str, list[Any]] = {s.label: [] for s in specs}
    folders: dict[str, Path] = {}
    if overlays_dir is not None:
        from models import overlays

        for s in specs:
            folders[s.label] = Path(overlays_dir) / s.label.replace(":", "-")
            folders[s.label].mkdir(parents=True, exist_ok=True)
    for case in tqdm(cases, desc=f"evaluate {arch} x {len(specs)} shifts", disable=not progress, leave=False):
        image = data.load_image(case.image_path)
        truth = data.load_mask(case.mask_path) if case.mask_path is not None else None
        for s in specs:
            if s.name == acquisition.NONE:
                img, ref = image, truth
            else:
                rng = acquisition.case_rng(seed, case.case_id, s.label)
                img, ref = acquisition.apply_with_mask(s.name, image, truth, rng, s.strength)
            row, result = analyse_image(analyzer, case, img, ref)
            row["shift"] = s.label
            if ref is not None and overlays_dir is not None:
                pictures[s.label].append(_write_case_picture(folders[s.label], case, img, result, ref, row))
            rows[s.label].append(row)
    results: dict[str, Any] = {}
    for s in specs:
        rs = rows[s.label]
        out = _summary(rs, threshold, n_boot)
        out["worst_cases"] = _worst_cases(rs, worst)
        out["least_plausible"] = _least_plausible(rs, worst)
        out["per_source"] = _per_source(rs, threshold, n_boot)
        shift = acquisition.get(s.name) if s.name != acquisition.NONE else None
        strength = None if shift is None else shift.default_strength if s.strength is None else s.strength
        out.update(shift=s.label, shift_name=s.name, shift_strength=strength,
                   shift_mimics="no shift: the images as stored" if shift is None else shift.mimics)
        if overlays_dir is not None:
            out["overlays_index"] = str(overlays.write_index(folders[s.label], pictures[s.label]))
        results[s.label] = out
    comparison = []
    for label, r in results.items():
        cal = r["calibration"] or {}
        comparison.append({"shift": label, **{k: r[k] for k in COMPARISON_KEYS},
                           "ece": cal.get("ece"), "brier": cal.get("brier")})
    seg_id, tb_id = analyzer.segmenter_identity, analyzer.tb_identity
    top: dict[str, Any] = {
        "shifts": [s.label for s in specs], "shift_seed": seed, "threshold": threshold, "arch": arch, "split": split,
        "segmenter": f"{seg_id.name} {seg_id.version}", "tb_model": f"{tb_id.name} {tb_id.version}",
        "note": "simulated acquisition shifts (models.shifts) of the same images, not data from other sources",
        "comparison": comparison, "results": results,
    }
    if per_case_csv is not None:
        top["per_case_csv"] = str(_write_per_case(Path(per_case_csv), [r for s in specs for r in rows[s.label]],
                                                  threshold, with_shift=True))
    return _clean(top)


def _write_per_case(path: Path, rows: list[dict[str, Any]], threshold: float, with_shift: bool = False) -> Path:
    """One CSV row per case (:data:`PER_CASE_COLUMNS`); empty cells where a case has no mask or label.
    ``with_shift``: a first column ``shift`` (the rows of :func:`evaluate_shifted`)."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    columns = ("shift", *PER_CASE_COLUMNS) if with_shift else PER_CASE_COLUMNS
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            cells = {"shift": row["shift"]} if with_shift else {}
            cells |= {"case_id": row["case_id"], "source": row["source"],
                     "tb_label": "" if row["label"] is None else row["label"],
                     "tb_score": f"{row['score']:.6f}", "tb_call": int(row["score"] >= threshold),
                     "plausibility": f"{row['plausibility']:.3f}"}
            cells.update({k: f"{row[k]:.6f}" if k in row and math.isfinite(row[k]) else "" for k in ("dice", "jaccard", "hd95")})
            writer.writerow(cells)
    return path


def _write_case_picture(folder: Path, case: data.Case, image: np.ndarray, result: Any, truth: np.ndarray,
                        row: dict[str, Any]) -> Any:
    from PIL import Image

    from models import overlays

    if image.shape != truth.shape:  # the masks' geometry, as the metrics
        image = np.asarray(Image.fromarray(image.astype(np.float32)).resize(truth.shape[::-1], Image.Resampling.BILINEAR))
    low, high = float(image.min()), float(image.max())
    image = (image - low) / (high - low) if high > low else np.zeros_like(image)
    caption = [case.case_id, f"Dice {row['dice']:.4f}, TB score {result.tb_score:.3f}"]
    picture = overlays.case_picture(image, result.image_left, result.image_right, truth, caption)
    name = f"{case.case_id}.png"
    picture.save(folder / name)
    return overlays.CasePicture(case.case_id, case.source, float(row["dice"]), float(result.tb_score),
                                case.tb_label, name)


def format_table(result: dict[str, Any]) -> str:
    """A human-readable table of an :func:`evaluate` result."""

    def f(v: Any, nd: int = 4) -> str:
        return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    head = f"{'':14}{'cases':>6}{'masks':>6}{'Dice':>8}{'Jaccard':>9}{'HD95 px':>9}{'TB AUC':>8}{'AUC 95% CI':>17}{'sens':>7}{'spec':>7}"
    if "results" in result:
        return _format_shift_table(result, f)
    lines = [(f"segmenter {result['segmenter']} ({result['arch']}), TB {result['tb_model']}, "
              f"split {result['split'] or 'all'}, threshold {f(result['threshold'], 3)}"), head]
    for name, r in [("all", result)] + list(result["per_source"].items()):
        ci = r["tb_auc_ci95"]
        ci_s = "-" if ci[0] is None else f"{ci[0]:.3f}-{ci[1]:.3f}"
        lines.append(f"{name:14}{r['n_cases']:>6}{r['n_masks']:>6}{f(r['lung_dice_mean']):>8}{f(r['lung_jaccard_mean']):>9}"
                     f"{f(r['lung_hd95_mean'], 2):>9}{f(r['tb_auc'], 3):>8}{ci_s:>17}{f(r['sensitivity'], 3):>7}{f(r['specificity'], 3):>7}")
    lines.append(f"WHO target (sens >= {WHO_MIN_SENSITIVITY}, spec >= {WHO_MIN_SPECIFICITY}) met: {'yes' if result['who_target_met'] else 'no'}")
    if result.get("calibration"):
        cal = result["calibration"]
        lines.append(f"TB score calibration: expected calibration error {f(cal['ece'], 3)}, Brier {f(cal['brier'], 3)} "
                     f"({len(cal['bins'])} bins in --json)")
    if result.get("worst_cases"):
        lines.append("lowest lung Dice: " + ", ".join(f"{c['case_id']} ({c['source']}) {f(c['dice'])}"
                                                      for c in result["worst_cases"]))
    if result.get("least_plausible"):
        lines.append(f"implausible segmentations (plausibility < {plausibility.PLAUSIBLE}): {result['n_implausible']} "
                     f"of {result['n_cases']}; lowest: " + ", ".join(f"{c['case_id']} {f(c['plausibility'], 3)}"
                                                                   for c in result["least_plausible"][:3]))
    return "\n".join(lines)


def _format_shift_table(result: dict[str, Any], f: Callable[..., str]) -> str:
    """The table of an :func:`evaluate_shifted` result: one line per shift, ``none`` first."""
    head = (f"{'shift':14}{'cases':>6}{'masks':>6}{'Dice':>8}{'Dice min':>9}{'HD95 px':>9}{'TB AUC':>8}"
            f"{'AUC 95% CI':>17}{'sens':>7}{'spec':>7}{'ECE':>7}{'WHO':>5}{'implaus':>8}")
    lines = [(f"segmenter {result['segmenter']} ({result['arch']}), TB {result['tb_model']}, "
              f"split {result['split'] or 'all'}, threshold {f(result['threshold'], 3)}"),
             (f"simulated acquisition shifts (models.shifts, seed {result['shift_seed']}): the same images shifted, "
              "not data from other sources"), head]
    for label, r in result["results"].items():
        ci = r["tb_auc_ci95"]
        ci_s = "-" if ci[0] is None else f"{ci[0]:.3f}-{ci[1]:.3f}"
        ece = (r.get("calibration") or {}).get("ece")
        lines.append(f"{label:14}{r['n_cases']:>6}{r['n_masks']:>6}{f(r['lung_dice_mean']):>8}{f(r['lung_dice_min']):>9}"
                     f"{f(r['lung_hd95_mean'], 2):>9}{f(r['tb_auc'], 3):>8}{ci_s:>17}{f(r['sensitivity'], 3):>7}"
                     f"{f(r['specificity'], 3):>7}{f(ece, 3):>7}{'yes' if r['who_target_met'] else 'no':>5}"
                     f"{r['n_implausible']:>8}")
    lines.append(f"WHO: sens >= {WHO_MIN_SENSITIVITY} with spec >= {WHO_MIN_SPECIFICITY}; ECE: expected calibration "
                 f"error of the TB score; implaus: segmentations of plausibility < {plausibility.PLAUSIBLE} "
                 "(models.plausibility); per source and per case in --json")
    return "\n".join(lines)
