"""The promotion gate: a challenger and the model in service on the same reference set, paired.

:func:`compare` runs both through the node's inference path (:func:`models.evaluation.analyse_case`,
the code ``cxrnode evaluate`` measures) on every case of a data folder and reports, per metric,
both point estimates, the difference challenger - champion with a 95 % paired-bootstrap interval
(cases resampled with replacement, the same resample for both models, seeded), and the verdict
against the configured margin.

What a challenger affects decides what is compared:

* a **segmenter** changes the lungs and, through them, the TB scorer's input: lung Dice, and TB
  AUC, sensitivity and specificity with the TB scorer in service, all gated;
* a **TB scorer**: TB AUC, sensitivity and specificity, both scorers fed by the segmenter in
  service (the lungs are the same, so Dice is not compared).

Sensitivity and specificity are taken at each TB model's own operating threshold (its sidecar's,
as the node uses unless ``[worker] tb_threshold`` overrides it). A metric fails when its point
estimate drops by more than its margin; a gated metric the data cannot measure (no masks, no TB
labels of both classes) fails as "unmeasured": the gate does not pass what it has not seen.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from models import data, metrics
from models.catalog import Entry, ModelRegistry, RegistryError

#: Metric name -> what people read.
METRICS = {"lung_dice": "lung Dice", "tb_auc": "TB AUC", "sensitivity": "sensitivity", "specificity": "specificity"}
#: The metrics each slot's challenger is compared (and gated) on.
GATED = {"segmenter": ("lung_dice", "tb_auc", "sensitivity", "specificity"),
         "tb": ("tb_auc", "sensitivity", "specificity")}
#: The defaults of ``[models]`` (node.settings.ModelsSettings.margins).
DEFAULT_MARGINS = {"lung_dice": 0.005, "tb_auc": 0.02, "sensitivity": 0.02, "specificity": 0.05}
BOOTSTRAP_SEED = 20240611
LEVEL = 0.95


class _Scores:
    """Per-case arrays of one model pair on the reference set (NaN / -1 where a case has no mask / label)."""

    def __init__(self, rows: list[dict[str, Any]], threshold: float) -> None:
        self.rows = rows
        self.threshold = float(threshold)
        self.dice = np.array([r.get("dice", np.nan) for r in rows], dtype=float)
        self.labels = np.array([-1 if r["label"] is None else int(r["label"]) for r in rows], dtype=int)
        self.scores = np.array([r["score"] for r in rows], dtype=float)


def _metric(name: str, s: _Scores, idx: np.ndarray) -> float:
    """Metric ``name`` of the cases ``idx`` (with repeats); NaN when undefined on them."""
    if name == "lung_dice":
        d = s.dice[idx]
        d = d[np.isfinite(d)]
        return float(d.mean()) if d.size else math.nan
    lab = s.labels[idx]
    keep = lab >= 0
    y, sc = lab[keep], s.scores[idx][keep]
    if name == "tb_auc":
        return metrics.roc_auc(y, sc) if y.size and 0 < y.sum() < y.size else math.nan
    if not y.size:
        return math.nan
    sens, spec = metrics.sensitivity_specificity(y, sc, s.threshold)
    return sens if name == "sensitivity" else spec


def paired_bootstrap(against: _Scores, challenger: _Scores, names: tuple[str, ...], n_boot: int,
                     seed: int = BOOTSTRAP_SEED, level: float = LEVEL) -> dict[str, dict[str, Any]]:
    """Point estimates, difference (challenger - against) and its percentile interval per metric.

    Each resample draws cases with replacement once and scores both models on it; resamples on
    which a metric is undefined (e.g. one TB class drawn) are left out of that metric's interval
    and counted in ``resamples``.
    """
    n = len(against.rows)
    everything = np.arange(n)
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, n, n) for _ in range(n_boot)] if n else []
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        a, c = _metric(name, against, everything), _metric(name, challenger, everything)
        diffs = []
        for idx in draws:
            da, dc = _metric(name, against, idx), _metric(name, challenger, idx)
            if math.isfinite(da) and math.isfinite(dc):
                diffs.append(dc - da)
        alpha = (1.0 - level) / 2.0
        ci = [float(v) for v in np.quantile(diffs, [alpha, 1.0 - alpha])] if diffs else [math.nan, math.nan]
        measured = math.isfinite(a) and math.isfinite(c)
        out[name] = {"against": a, "challenger": c, "difference": (c - a) if measured else math.nan,
                     "ci95": ci, "resamples": len(diffs)}
    return out


#: Rows already computed in this process, per (segmenter entry, TB entry, device, case files): a
#: registry entry never changes once registered (its folder and sha256 name its weights), and a
#: case is keyed by its files' paths, sizes and modification times, so a row is recomputed
#: whenever anything it depends on may differ. A second comparison against the same champion on
#: the same reference set (compare, then promote) only runs the challenger.
_ROWS: dict[tuple[Any, ...], dict[str, Any]] = {}
_ROWS_MAX = 50_000


def _file_key(path: Path | None) -> tuple[Any, ...]:
    if path is None:
        return ()
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _pair_rows(seg: Entry, tb: Entry, cases: list[data.Case], device: str, progress: bool) -> list[dict[str, Any]]:
    """Per-case rows of (seg, tb) through :func:`models.evaluation.analyse_case`."""
    from tqdm import tqdm

    from models.evaluation import analyse_case
    from models.inference import LungAnalyzer, resolve_device

    dev = resolve_device(device)
    pair = (str(seg.folder.resolve()), seg.identity.sha256, str(tb.folder.resolve()), tb.identity.sha256, dev)
    keys = [(*pair, case.case_id, case.source, case.tb_label, _file_key(case.image_path), _file_key(case.mask_path))
            for case in cases]
    if len(_ROWS) + len(keys) > _ROWS_MAX:
        _ROWS.clear()
    todo = [(key, case) for key, case in zip(keys, cases, strict=True) if key not in _ROWS]
    if todo:
        analyzer = LungAnalyzer.from_entries(seg, tb, dev)
        for key, case in tqdm(todo, desc=f"{seg.ref} + {tb.ref}", disable=not progress, leave=False):
            _ROWS[key] = analyse_case(analyzer, case)[0]
    return [dict(_ROWS[key]) for key in keys]


def compare(reg: ModelRegistry, challenger: str, data_dir: str | Path, *, against: str | None = None,
            split: str | None = None, device: str = "auto", margins: dict[str, float] | None = None,
            n_boot: int = 2000, seed: int = BOOTSTRAP_SEED, progress: bool = False) -> dict[str, Any]:
    """Compare registry entry ``challenger`` with ``against`` (default: the champion of its slot).

    Returns a JSON-ready report: the models (refs, identities, which segmenter and TB scorer
    each side ran with), the data (folder, split, counts), the bootstrap settings, ``metrics``
    (one dict per compared metric: against, challenger, difference, ci95, resamples, margin,
    drop, verdict pass/fail/unmeasured), ``cases`` (per case: Dice and TB score of each side),
    ``passed`` and ``failed`` (the names of the metrics that failed).
    """
    margins = {**DEFAULT_MARGINS, **(margins or {})}
    chal = reg.entry(challenger)
    base = reg.entry(against) if against is not None else reg.champion(chal.slot)
    if base.slot != chal.slot:
        raise RegistryError(f"{chal.ref} is a {chal.slot}, {base.ref} a {base.slot}: compare models of one slot")
    cases = data.read_index(data_dir, split)
    if chal.slot == "segmenter":
        tb = reg.champion("tb")
        pairs = {"against": (base, tb), "challenger": (chal, tb)}
    else:
        seg = reg.champion("segmenter")
        pairs = {"against": (seg, base), "challenger": (seg, chal)}
    rows = {side: _pair_rows(s, t, cases, device, progress) for side, (s, t) in pairs.items()}
    scores = {side: _Scores(rows[side], float(pairs[side][1].meta["threshold"])) for side in pairs}
    names = GATED[chal.slot]
    stats = paired_bootstrap(scores["against"], scores["challenger"], names, n_boot, seed)
    results, failed = [], []
    for name in names:
        st = stats[name]
        drop = -st["difference"] if math.isfinite(st["difference"]) else math.nan
        verdict = "unmeasured" if not math.isfinite(drop) else ("fail" if drop > margins[name] + 1e-12 else "pass")
        if verdict != "pass":
            failed.append(METRICS[name])
        results.append({"metric": name, "label": METRICS[name], **st, "margin": margins[name], "drop": drop,
                        "verdict": verdict})
    labelled = [r for r in rows["against"] if r["label"] is not None]
    report = {
        "challenger": _side(chal, *pairs["challenger"]),
        "against": _side(base, *pairs["against"]),
        "slot": chal.slot,
        "data": {"folder": str(Path(data_dir).resolve()), "split": split, "n_cases": len(cases),
                 "n_masks": sum("dice" in r for r in rows["against"]), "n_labelled": len(labelled),
                 "n_tb": sum(r["label"] == 1 for r in labelled)},
        "bootstrap": {"samples": n_boot, "seed": seed, "level": LEVEL, "paired": True,
                      "method": "percentile interval of the challenger - against difference over case resamples"},
        "thresholds": {"against": scores["against"].threshold, "challenger": scores["challenger"].threshold},
        "metrics": results,
        "passed": not failed,
        "failed": failed,
        "cases": [{"case_id": ra["case_id"], "source": ra["source"], "label": ra["label"],
                   "dice_against": ra.get("dice"), "dice_challenger": rc.get("dice"),
                   "score_against": ra["score"], "score_challenger": rc["score"]}
                  for ra, rc in zip(rows["against"], rows["challenger"], strict=True)],
    }
    return _clean(report)


def _side(entry: Entry, seg: Entry, tb: Entry) -> dict[str, Any]:
    return {"ref": entry.ref, "name": entry.identity.name, "version": entry.identity.version,
            "sha256": entry.identity.sha256, "segmenter": seg.ref, "tb": tb.ref}


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The report without its per-case rows: what the history keeps."""
    return {k: v for k, v in report.items() if k != "cases"}


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (np.floating, np.integer)):
        return _clean(obj.item())
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def format_report(report: dict[str, Any]) -> str:
    """The comparison as a table for people."""
    def f(v: Any, nd: int = 4, sign: bool = False) -> str:
        return "-" if v is None else (f"{v:+.{nd}f}" if sign else f"{v:.{nd}f}")

    c, a, d = report["challenger"], report["against"], report["data"]
    lines = [
        f"challenger {c['ref']} ({c['name']} {c['version']}, sha256 {c['sha256'][:12]})",
        f"against    {a['ref']} ({a['name']} {a['version']}, sha256 {a['sha256'][:12]})",
        (f"lungs from {c['segmenter']} / {a['segmenter']}, TB from {c['tb']} / {a['tb']}; "
         f"TB thresholds {f(report['thresholds']['challenger'], 3)} / {f(report['thresholds']['against'], 3)}"),
        (f"data {d['folder']} (split {d['split'] or 'all'}): {d['n_cases']} cases, {d['n_masks']} with masks, "
         f"{d['n_labelled']} TB-labelled ({d['n_tb']} TB); paired bootstrap, {report['bootstrap']['samples']} resamples"),
        "",
        f"{'metric':<13}{'against':>9}{'challenger':>11}{'difference':>11}{'95% CI':>20}{'margin':>8}  verdict",
    ]
    for m in report["metrics"]:
        lo, hi = m["ci95"]
        ci = "-" if lo is None else f"[{lo:+.4f}, {hi:+.4f}]"
        lines.append(f"{m['label']:<13}{f(m['against']):>9}{f(m['challenger']):>11}{f(m['difference'], sign=True):>11}"
                     f"{ci:>20}{m['margin']:>8.3f}  {m['verdict']}")
    lines.append("")
    lines.append("gate: passed" if report["passed"] else f"gate: FAILED on {', '.join(report['failed'])}")
    return "\n".join(lines)
