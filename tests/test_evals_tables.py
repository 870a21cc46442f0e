"""Result tables: seed aggregation with t-intervals, published scaling, layouts, JSON."""
import json
import math

import numpy as np
import pytest
from scipy import stats as sp_stats

from avatar_jax.evals import stats, tables


def test_mean_ci_matches_scipy_interval():
  rng = np.random.default_rng(0)
  for n in (2, 3, 7, 30):
    x = rng.standard_normal(n) * 3 + 1
    lo, hi = sp_stats.t.interval(0.95, n - 1, loc=x.mean(), scale=sp_stats.sem(x))
    m, hw = stats.mean_ci(x)
    assert m == pytest.approx(x.mean()) and hw == pytest.approx((hi - lo) / 2, rel=1e-10)
  assert stats.mean_ci([1.5])[0] == 1.5 and math.isnan(stats.mean_ci([1.5])[1])
  assert stats.mean_ci([1.0, float("nan"), 3.0])[0] == 2.0
  assert all(math.isnan(v) for v in stats.mean_ci([]))


def test_synthdyad_ablation_rows_and_seeds():
  rows = [dict(name="frame", seed=s, lip_corr=0.9 + 0.01 * s, jaw_leak=0.01, nod_f1=0.2)
          for s in range(3)]
  rows += [dict(name="gaussian", seed=0, lip_corr=0.88, nod_f1_micro=0.7, nod_f1=0.1)]
  md = tables.render_table("synthdyad_ablation", rows)
  m, hw = stats.mean_ci([0.90, 0.91, 0.92])
  assert f"{m:.3f} ± {hw:.3f}" in md
  assert "| gaussian |" in md and "0.700" in md  # micro F1 preferred over the clip mean
  assert "lip_corr ↑" in md and "jaw_leak ↓" in md and "talking" in md and "listening" in md
  assert "ms/frame" not in md
  data = tables.table_json("synthdyad_ablation", rows)
  assert [r["name"] for r in data["rows"]] == ["frame", "gaussian"]
  assert data["rows"][0]["n"] == 3 and data["rows"][0]["cells"]["lip_corr"]["values"] == [
      0.9, 0.91, 0.92]
  assert math.isnan(data["rows"][1]["cells"]["jaw_leak"]["mean"])


def test_timar_scaling_and_latency(tmp_path):
  rows = [dict(run="ours", seed=s, fd_exp=10.0 + s, fd_jaw=0.001, fd_pose=0.02, mse_exp=0.5,
               mse_jaw=0.002, mse_pose=0.01, rpcc_exp=0.03, rpcc_jaw=0.2, rpcc_pose=0.1,
               sid_gt_fit_exp=3.1, sid_pred_fit_exp=2.0, latency_ms_per_frame=4.2 + s)
          for s in range(2)]
  data = tables.table_json("timar", rows)
  cells = data["rows"][0]["cells"]
  assert cells["FD jaw"]["mean"] == pytest.approx(1.0)       # ×10^3
  assert cells["FD pose"]["mean"] == pytest.approx(2.0)      # ×10^2
  assert cells["MSE exp"]["mean"] == pytest.approx(5.0)      # ×10
  assert cells["rPCC exp"]["mean"] == pytest.approx(3.0)     # ×10^2
  assert cells["rPCC jaw"]["mean"] == pytest.approx(2.0)     # ×10
  assert cells["SID exp"]["mean"] == pytest.approx(3.1)      # TIMAR fits on the GT
  assert tables.table_json("dualtalk", rows)["rows"][0]["cells"]["SID exp"]["mean"] == 2.0
  assert cells["ms/frame"]["mean"] == pytest.approx(4.7)
  tables.write_table("timar", rows, str(tmp_path / "t"))
  assert "ms/frame ↓" in (tmp_path / "t.md").read_text()
  loaded = json.loads((tmp_path / "t.json").read_text())
  assert loaded["rows"][0]["cells"]["SID jaw"]["mean"] is None


def test_video_layouts_and_errors():
  rows = [dict(name="m", fd_face=12.0, fvd_face=80.0, csim=0.9, lse_d=7.5, lse_c=6.1,
               rpcc_exp=0.02, rpcc_pose=0.05, sid_pred_fit_exp=2.5, variance_pred_exp=0.3,
               latency_e2e_ms=480.0)]
  md = tables.render_table("avatar_forcing", rows)
  assert "Latency ms ↓" in md and "480" in md and "LSE-C ↑" in md and "E2E ms" not in md
  assert "12.00" in md
  md = tables.render_table("echo", rows)
  assert "FID ↓" in md and "E2E ms ↓" in md
  with pytest.raises(KeyError, match="unknown table layout"):
    tables.render_table("nope", rows)
  with pytest.raises(KeyError, match="label"):
    tables.render_table("echo", [dict(fd_face=1.0)])
