"""The mask-convention audit (models/experiments): its measure on synthetic masks and a run on real fixtures."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from models.experiments import mask_convention_audit as audit


def test_missed_share_counts_only_the_heart_side():
    ref = np.zeros((100, 100), bool)
    ref[20:80, 10:40] = True  # image-left lung: 1800 px
    ref[20:80, 60:90] = True  # image-right lung (patient's left, beside the heart): 1800 px
    pred = ref.copy()
    pred[60:80, 60:75] = False  # 300 px missed behind the heart
    assert audit.missed_heart_side_share(pred, ref) == pytest.approx(300 / 3600)
    pred2 = ref.copy()
    pred2[20:80, 10:20] = False  # missing on the image-left side does not count
    assert audit.missed_heart_side_share(pred2, ref) == 0.0
    assert audit.missed_heart_side_share(pred, np.zeros_like(ref)) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        audit.missed_heart_side_share(pred[:50], ref)


def test_audit_on_real_fixture_cases(fixture_dir, tmp_path, capsys):
    rows = list(csv.DictReader((fixture_dir / "index.csv").open()))
    for r in rows:  # Montgomery masks define the cut-off: mark them as training cases
        r["split"] = "train" if r["source"] == "montgomery" else "val"
        for key in ("image_path", "mask_path"):
            if r[key]:
                r[key] = str(fixture_dir / r[key])
    with (tmp_path / "index.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "cases.csv"
    assert audit.main(["--data", str(tmp_path), "--json", "--csv", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["cutoff"] > 0 and "2 Montgomery training masks" in result["cutoff_rule"]
    per_case = list(csv.DictReader(out.open()))
    assert len(per_case) == 5  # the fixture's masked cases
    # a Montgomery mask cannot be above a cut-off of twice its own group's 95th percentile
    assert all(r["convention"] == audit.NLM for r in per_case if r["source"] == "montgomery")
    groups = result["groups"]
    assert groups["montgomery/train"]["masks"] == 2 and groups["shenzhen/val"]["masks"] == 3
    assert sum(g[audit.NLM]["masks"] + g[audit.INCLUDES]["masks"] for g in groups.values()) == 5


def test_audit_needs_montgomery_training_masks(fixture_dir, capsys):
    assert audit.main(["--data", str(fixture_dir)]) == 2  # the fixture's rows are all val
    assert "Montgomery training masks" in capsys.readouterr().err
