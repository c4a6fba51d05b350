"""Models for the registry tests: re-versioned copies of the shipped weights and a deliberately degraded segmenter."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

from models import registry

#: How far the degraded segmenter's output logits are lowered: the lung masks shrink at their
#: borders; mean Dice on the fixture drops by about 0.02 (four times the gate's margin) while the
#: lungs are still found, and the TB scorer reading those lungs loses specificity too.
DEGRADE_LOGIT_SHIFT = -2.5


def shipped_version(stem: str) -> str:
    """The version of the bundled ``stem`` as its sidecar (``models/weights/<stem>.json``) records it."""
    return registry.read_meta(stem)["version"]


def shipped_ref(stem: str) -> str:
    """``<stem>@<version>`` of the bundled ``stem``: the ref a freshly seeded registry gives it."""
    return f"{stem}@{shipped_version(stem)}"


def later_version(stem: str, step: int = 1) -> str:
    """``X.(Y+step).0`` from the bundled ``stem``'s ``X.Y.Z``: a version above the shipped one (as
    :meth:`models.catalog.ModelRegistry.next_version` counts), so a clone under it is never the
    shipped entry; steps 1, 2 ... give distinct versions."""
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)", shipped_version(stem))
    if m is None or step < 1:
        raise ValueError(f"no later version of {stem} {shipped_version(stem)!r} by {step}")
    return f"{m[1]}.{int(m[2]) + step}.0"


def clone_version(stem: str, version: str, out: Path, src: Path = registry.WEIGHTS_DIR) -> Path:
    """``out`` holding the shipped ``stem`` under another version: the same weight bytes, a sidecar
    with ``version``, and a SHA256SUMS line, as :func:`models.registry.save` writes them."""
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((src / f"{stem}.json").read_text())
    shutil.copy(src / meta["weights_file"], out / meta["weights_file"])
    meta["version"] = version
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    sums = registry.read_sums(out)
    sums[meta["weights_file"]] = meta["sha256"]
    registry.write_sums(out, sums)
    return out


def degraded_segmenter(out: Path, version: str = "1.0.1-degraded", shift: float = DEGRADE_LOGIT_SHIFT) -> dict:
    """The shipped UNet with its output layer's bias lowered by ``-shift`` logits, saved with
    :func:`models.registry.save` as ``lung-unet`` ``version`` in ``out``; returns the sidecar."""
    import torch

    shipped = registry.load("lung-unet", "cpu")
    net = copy.deepcopy(shipped.net)
    state = net.state_dict()
    last_bias = [k for k in state if k.endswith("bias")][-1]  # the final 1-channel convolution
    assert state[last_bias].numel() == 1, last_bias
    with torch.no_grad():
        state[last_bias] += shift
    net.load_state_dict(state)
    meta = {k: v for k, v in shipped.meta.items() if k not in ("sha256", "weights_file", "storage_dtype")}
    meta["version"] = version
    meta["training"] = {"command": f"tests: {last_bias} {shift:+g}", "n_train": 0, "n_val": 0}
    return registry.save(net, meta, "lung-unet", out)


#: Four cases of the committed fixture (tests/models/fixtures), two with TB and two without, all
#: with a lung mask: enough for every gated metric, small enough for a CPU-fast comparison.
SMALL_SET = ("MCUCXR_0017_0", "MCUCXR_0182_1", "CHNCXR_0005_0", "CHNCXR_0327_1")


def small_reference_set(out: Path, fixture_dir: Path = Path(__file__).parent / "fixtures",
                        case_ids: tuple[str, ...] = SMALL_SET) -> Path:
    """A data folder whose index.csv lists ``case_ids`` of the fixture (absolute paths, nothing copied)."""
    import csv

    out.mkdir(parents=True, exist_ok=True)
    with (fixture_dir / "index.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["case_id"] in case_ids]
    for r in rows:
        r["image_path"] = str((fixture_dir / r["image_path"]).resolve())
        r["mask_path"] = str((fixture_dir / r["mask_path"]).resolve()) if r["mask_path"] else ""
    with (out / "index.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out
