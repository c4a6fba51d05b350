"""Segmentation and classification metrics in pure numpy.

Conventions:

* Dice and Jaccard of two empty masks are 1.0 (perfect agreement).
* HD95 follows MONAI's ``compute_hausdorff_distance(percentile=95)``: the larger of the
  two directed 95th-percentile distances between the masks' boundary pixels, in pixels
  (Euclidean). ``inf`` if exactly one mask is empty, 0.0 if both are.
* ROC AUC is the Mann-Whitney probability that a positive scores above a negative
  (ties count one half). The 95% interval is a percentile bootstrap over cases.
* A case is called positive when ``score >= threshold``.
"""

from __future__ import annotations

import numpy as np


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    return a, b


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """2|A∩B| / (|A|+|B|)."""
    a, b = _pair(pred, truth)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def jaccard(pred: np.ndarray, truth: np.ndarray) -> float:
    """|A∩B| / |A∪B|."""
    a, b = _pair(pred, truth)
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def boundary(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with at least one 4-neighbour in the background (or off-image)."""
    m = np.asarray(mask, dtype=bool)
    p = np.pad(m, 1, constant_values=False)
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~interior


def _directed_distances(src: np.ndarray, dst: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """For each point of ``src`` (N x 2), the distance to the nearest point of ``dst``."""
    out = np.empty(len(src), dtype=np.float64)
    d = dst.astype(np.float64)
    for i in range(0, len(src), chunk):
        s = src[i : i + chunk].astype(np.float64)
        d2 = (s[:, None, 0] - d[None, :, 0]) ** 2 + (s[:, None, 1] - d[None, :, 1]) ** 2
        out[i : i + chunk] = np.sqrt(d2.min(axis=1))
    return out


def hd95(pred: np.ndarray, truth: np.ndarray) -> float:
    """95th-percentile symmetric Hausdorff distance between mask boundaries, in pixels."""
    a, b = _pair(pred, truth)
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return float("inf")
    pa, pb = np.argwhere(boundary(a)), np.argwhere(boundary(b))
    d_ab = np.percentile(_directed_distances(pa, pb), 95)
    d_ba = np.percentile(_directed_distances(pb, pa), 95)
    return float(max(d_ab, d_ba))


def _check_scores(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(int).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError("labels and scores differ in length")
    if not set(np.unique(y).tolist()) <= {0, 1}:
        raise ValueError("labels must be 0 or 1")
    return y, s


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos * n_neg)); nan if one class is absent."""
    y, s = _check_scores(labels, scores)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties (1-based)
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_auc_ci(
    labels: np.ndarray, scores: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC (resampling cases; draws with one class skipped)."""
    y, s = _check_scores(labels, scores)
    if y.sum() == 0 or y.sum() == len(y):
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        yb = y[idx]
        if 0 < yb.sum() < len(yb):
            aucs.append(roc_auc(yb, s[idx]))
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(aucs, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def sensitivity_specificity(
    labels: np.ndarray, scores: np.ndarray, threshold: float
) -> tuple[float, float]:
    """(TP/(TP+FN), TN/(TN+FP)) with ``score >= threshold`` called positive; nan if undefined."""
    y, s = _check_scores(labels, scores)
    called = s >= threshold
    pos, neg = y == 1, y == 0
    sens = float(called[pos].mean()) if pos.any() else float("nan")
    spec = float((~called[neg]).mean()) if neg.any() else float("nan")
    return sens, spec


def threshold_for_sensitivity(labels: np.ndarray, scores: np.ndarray, target: float = 0.9) -> float:
    """The highest threshold whose sensitivity is at least ``target`` (for choosing an operating point)."""
    y, s = _check_scores(labels, scores)
    pos = np.sort(s[y == 1])[::-1]
    if pos.size == 0:
        raise ValueError("no positive cases")
    k = int(np.ceil(target * pos.size)) - 1
    return float(pos[max(0, k)])


def calibration(labels: np.ndarray, scores: np.ndarray, bins: int = 10) -> dict:
    """How far the scores are from probabilities: the reliability diagram's bins (equal widths on
    [0, 1]: count, mean score, fraction positive) and the expected calibration error (the bins'
    |mean score - fraction positive| weighted by their counts; Guo et al. 2017), through MONAI's
    :func:`monai.metrics.calibration_binning`; and the Brier score. Scores must lie in [0, 1]."""
    import torch
    from monai.metrics import calibration_binning

    labels, scores = _check_scores(np.asarray(labels), np.asarray(scores, dtype=float))
    if np.any((scores < 0) | (scores > 1)):
        raise ValueError("calibration needs scores in [0, 1]")
    pred = torch.as_tensor(scores, dtype=torch.float64).reshape(1, 1, -1)
    truth = torch.as_tensor(labels, dtype=torch.float64).reshape(1, 1, -1)
    mean_score, positive_rate, counts = (t[0, 0].numpy() for t in calibration_binning(pred, truth, num_bins=bins))
    weights = counts / len(scores)
    ece = float(np.nansum(weights * np.abs(mean_score - positive_rate)))
    table = [{"lower": round(i / bins, 6), "upper": round((i + 1) / bins, 6), "n": int(counts[i]),
              "mean_score": round(float(mean_score[i]), 6) if counts[i] else None,
              "positive_rate": round(float(positive_rate[i]), 6) if counts[i] else None} for i in range(bins)]
    return {"ece": round(ece, 6), "brier": round(float(np.mean((scores - labels) ** 2)), 6), "bins": table}


def fit_platt(labels: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """Platt scaling (Platt 1999; Guo et al. 2017 for networks): the ``(slope, intercept)`` that
    minimise the log loss of ``sigmoid(slope * logit + intercept)`` against ``labels``, fitted by
    L-BFGS through scipy. Needs both classes; the slope is kept positive (the ranking, and so
    the AUC, never changes)."""
    from scipy.optimize import minimize

    y, z = _check_scores(np.asarray(labels), np.asarray(logits, dtype=float))
    if y.sum() == 0 or y.sum() == len(y):
        raise ValueError("Platt scaling needs both classes")

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = params
        t = a * z + b
        # log(1 + e^t) - y t, computed stably; its gradient is (sigmoid(t) - y) * (z, 1)
        nll = np.logaddexp(0.0, t) - y * t
        r = 1 / (1 + np.exp(-t)) - y
        return float(nll.mean()), np.array([(r * z).mean(), r.mean()])

    res = minimize(loss, x0=np.array([1.0, 0.0]), jac=True, method="L-BFGS-B",
                   bounds=[(1e-3, 1e2), (-1e2, 1e2)])
    if not res.success:
        raise ValueError(f"Platt scaling did not converge: {res.message}")
    return float(res.x[0]), float(res.x[1])
