"""Research baseline, not used by the node: TB from hand-made lung texture and shape features.

In the spirit of Jaeger et al. 2014 (IEEE TMI 33:233), the reference the TB floor cites:
per lung (left, right, both) and per zone (upper, middle, lower third of the lung's height),
intensity statistics of the 512 px image and of gradient-magnitude and difference-of-Gaussian
responses at four scales, plus a uniform local-binary-pattern histogram; shape features are
the lung areas and their ratio. Lungs come from the shipped segmenter through the node's own
code. An L2-regularised logistic regression is tuned by 5-fold cross-validation on the train
split (folds stratified by source x label), refitted on all of train and scored on val, alone
and averaged (logit mean) with the shipped CNN ensemble.

    python -m models.experiments.tb_texture_baseline --data ../shared/data [--json]

It answers "would classical features, or a blend with them, beat the CNN?" with numbers; the
model card quotes them. It trains in seconds, so nothing is saved.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models import data, metrics, transforms
from models.inference import LungAnalyzer

FEATURE_SIZE = 512
SCALES = (1.0, 2.0, 4.0, 8.0)
MIN_PER_CLASS = 10
PENALTIES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


def _gauss(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(3 * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma * sigma))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))


def _stats(v: np.ndarray) -> list[float]:
    if v.size < 10:
        return [0.0] * 7
    m, s = float(v.mean()), float(v.std()) + 1e-6
    return [m, s, float(((v - m) ** 3).mean() / s**3), float(((v - m) ** 4).mean() / s**4),
            *np.percentile(v, [10, 50, 90]).tolist()]


def _uniform_lbp(x: np.ndarray) -> np.ndarray:
    """8-neighbour LBP code per pixel: number of set bits for uniform patterns (0..8), else 9."""
    c = x[1:-1, 1:-1]
    bits = []
    for dr, dc in ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)):
        bits.append(x[1 + dr : x.shape[0] - 1 + dr, 1 + dc : x.shape[1] - 1 + dc] >= c)
    b = np.stack(bits, -1)
    transitions = (b != np.roll(b, 1, axis=-1)).sum(-1)
    return np.pad(np.where(transitions <= 2, b.sum(-1), 9), 1)


def case_features(image: np.ndarray, lung_prob: np.ndarray) -> np.ndarray:
    """Feature vector of one radiograph (display orientation) and its lung probabilities."""
    img = transforms.preprocess(image, FEATURE_SIZE)
    lungs = transforms.probabilities_to_masks(lung_prob, img.shape)
    t = torch.from_numpy(img)[None, None]
    maps = {"image": img}
    for s in SCALES:
        g = _gauss(t, s)
        gy, gx = torch.gradient(g[0, 0])
        maps[f"grad{s}"] = torch.sqrt(gx**2 + gy**2).numpy()
        maps[f"dog{s}"] = (g - _gauss(t, 2 * s))[0, 0].abs().numpy()
    lbp = _uniform_lbp(img)
    left, right, both = lungs.image_left, lungs.image_right, lungs.lung
    f: list[float] = [both.mean(), left.mean() / (right.mean() + 1e-6), left.mean(), right.mean()]
    per_zone = len(maps) * 7 + 10
    for side in (left, right, both):
        rows = np.flatnonzero(side.any(axis=1))
        if rows.size == 0:
            f += [0.0] * (3 * per_zone)
            continue
        cuts = np.linspace(rows[0], rows[-1] + 1, 4).astype(int)
        for z in range(3):
            zone = side.copy()
            zone[: cuts[z]] = False
            zone[cuts[z + 1] :] = False
            for m in maps.values():
                f += _stats(m[zone])
            h = np.bincount(lbp[zone], minlength=10)[:10].astype(np.float64)
            f += list(h / max(1.0, h.sum()))
    return np.nan_to_num(np.asarray(f, dtype=np.float64))


class LogisticModel:
    """Standardised features, L2-penalised logistic regression fitted with L-BFGS."""

    def __init__(self, x: np.ndarray, y: np.ndarray, penalty: float) -> None:
        self.mu, self.sd = x.mean(0), x.std(0) + 1e-8
        xt = torch.tensor((x - self.mu) / self.sd, dtype=torch.float64)
        yt = torch.tensor(y, dtype=torch.float64)
        self.w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        self.b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([self.w, self.b], max_iter=500, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(xt @ self.w + self.b, yt) + penalty * (self.w**2).sum()
            loss.backward()
            return loss

        opt.step(closure)

    def logits(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return (torch.tensor((x - self.mu) / self.sd, dtype=torch.float64) @ self.w + self.b).numpy()


def stratified_folds(strata: list[str], k: int, seed: int) -> np.ndarray:
    """Fold number per case, each stratum dealt round-robin after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    keys = np.asarray(strata)
    fold = np.zeros(len(keys), dtype=int)
    for s in np.unique(keys):
        j = np.flatnonzero(keys == s)
        rng.shuffle(j)
        fold[j] = np.arange(len(j)) % k
    return fold


def run(data_dir: str, device: str = "cpu", seed: int = 20240611) -> dict[str, Any]:
    """Features for every labelled case, CV on train, fit on train, scores on val."""
    analyzer = LungAnalyzer.load("unet", device)
    cases = [c for c in data.read_index(data_dir, None) if c.tb_label is not None]
    y = np.array([c.tb_label for c in cases])
    tr = np.array([c.split == "train" for c in cases])
    va = np.array([c.split == "val" for c in cases])
    if not tr.any() or not va.any():
        raise data.DataError("the baseline needs a split column with train and val cases")
    if min(int(y[tr].sum()), int((1 - y[tr]).sum())) < MIN_PER_CLASS or len(set(y[va].tolist())) < 2:
        raise data.DataError(f"the baseline needs >= {MIN_PER_CLASS} train cases per class and both classes in val")
    feats, cnn = [], []
    for n, c in enumerate(cases, 1):
        image = data.load_image(c.image_path)
        net_image = transforms.preprocess(image, analyzer.seg_size)
        prob = analyzer.lung_probabilities(net_image)
        feats.append(case_features(image, prob))
        p = min(max(analyzer.tb_probability(net_image, prob), 1e-7), 1 - 1e-7)
        cnn.append(float(np.log(p / (1 - p))))
        if n % 50 == 0:
            print(f"{n}/{len(cases)} cases", file=sys.stderr, flush=True)
    x, z = np.stack(feats), np.asarray(cnn)
    idx = np.flatnonzero(tr)
    fold = stratified_folds([f"{cases[i].source}:{y[i]}" for i in idx], 5, seed)
    cv = {}
    for lam in PENALTIES:
        oof = np.zeros(len(idx))
        for k in range(5):
            model = LogisticModel(x[idx[fold != k]], y[idx[fold != k]], lam)
            oof[fold == k] = model.logits(x[idx[fold == k]])
        cv[lam] = metrics.roc_auc(y[idx], oof)
    best = max(cv, key=cv.__getitem__)
    model = LogisticModel(x[tr], y[tr], best)
    feat_val = model.logits(x[va])
    blend = 0.5 * (feat_val + z[va])
    out: dict[str, Any] = {
        "n_features": int(x.shape[1]), "n_train": int(tr.sum()), "n_val": int(va.sum()),
        "cv_auc_by_penalty": {str(k): round(v, 4) for k, v in cv.items()}, "penalty": best,
        "train_cv_auc": round(cv[best], 4),
        "val_auc_features": round(metrics.roc_auc(y[va], feat_val), 4),
        "val_auc_cnn": round(metrics.roc_auc(y[va], z[va]), 4),
        "val_auc_blend": round(metrics.roc_auc(y[va], blend), 4),
        "per_source": {},
    }
    for source in sorted({c.source for c in cases}):
        k = np.array([c.source == source for c in cases])[va]
        yk = y[va][k]
        if 0 < yk.sum() < len(yk):
            out["per_source"][source] = {
                "n_val": int(k.sum()),
                "val_auc_features": round(metrics.roc_auc(yk, feat_val[k]), 4),
                "val_auc_cnn": round(metrics.roc_auc(yk, z[va][k]), 4),
                "val_auc_blend": round(metrics.roc_auc(yk, blend[k]), 4),
            }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.experiments.tb_texture_baseline", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder with index.csv including a split column")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    try:
        result = run(args.data, args.device)
    except data.DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
