"""Connected-component labelling and hole filling in pure numpy (no scipy).

Run-length based: each row is cut into runs of foreground pixels, runs in adjacent
rows that touch are merged with a union-find, and the runs are painted with their
root label. Cost grows with the number of runs, not pixels, which keeps it fast on
lung masks even at 4096 x 4096.
"""

from __future__ import annotations

import numpy as np


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, start, stop) of every horizontal foreground run, in row-major order."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    rs, starts = np.nonzero(d == 1)
    re, stops = np.nonzero(d == -1)
    assert np.array_equal(rs, re)
    return rs, starts, stops


def label_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Label the connected components of a 2-D boolean mask.

    Returns ``(labels, sizes)``: ``labels`` is int32 with 0 for background and
    1..n for components; ``sizes[i]`` is the pixel count of label ``i + 1``.
    ``connectivity`` is 4 or 8.
    """
    if connectivity not in (4, 8):
        raise ValueError("connectivity must be 4 or 8")
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    rows, starts, stops = _runs(mask)
    n = rows.size
    labels = np.zeros(mask.shape, dtype=np.int32)
    if n == 0:
        return labels, np.zeros(0, dtype=np.int64)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    slack = 1 if connectivity == 8 else 0
    row_first = np.searchsorted(rows, np.arange(mask.shape[0] + 1))
    r_list, s_list, e_list = rows.tolist(), starts.tolist(), stops.tolist()
    for r in range(1, mask.shape[0]):
        a, a_end = int(row_first[r - 1]), int(row_first[r])
        b, b_end = a_end, int(row_first[r + 1])
        i, j = a, b
        while i < a_end and j < b_end:
            # runs are half-open [start, stop); touching rule widened by the slack
            if s_list[i] < e_list[j] + slack and s_list[j] < e_list[i] + slack:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
            if e_list[i] < e_list[j]:
                i += 1
            else:
                j += 1
    del r_list
    roots = np.fromiter((find(i) for i in range(n)), dtype=np.int64, count=n)
    _, compact = np.unique(roots, return_inverse=True)
    run_label = compact.astype(np.int32) + 1
    lengths = stops - starts
    flat = labels.reshape(-1)
    offsets = np.repeat(rows * mask.shape[1] + starts - np.cumsum(lengths) + lengths, lengths)
    flat[offsets + np.arange(lengths.sum())] = np.repeat(run_label, lengths)
    sizes = np.bincount(run_label, weights=lengths, minlength=int(run_label.max()) + 1)[1:]
    return labels, sizes.astype(np.int64)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions (4-connected) that do not touch the image border."""
    mask = np.asarray(mask, dtype=bool)
    bg, _ = label_components(~mask, connectivity=4)
    border = np.unique(np.concatenate([bg[0], bg[-1], bg[:, 0], bg[:, -1]]))
    holes = (bg > 0) & ~np.isin(bg, border[border > 0])
    return mask | holes
