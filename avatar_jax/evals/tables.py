"""Markdown / JSON result tables in the layouts of the papers the project reproduces.

    render_table(name, rows) -> str      markdown
    table_json(name, rows) -> dict       the same numbers, machine-readable
    write_table(name, rows, path)        path.md + path.json

`rows` is a list of result dicts, one per (run, seed): `{"name": "gaussian", "seed": 0,
"lip_corr": 0.81, ...}` (the run label is `name`, or `run`). Rows with the same label are one
table row: the mean over seeds, with ± the half-width of the 95% t-interval when there are two or
more. Metric keys are the ones `evals/` produces (docs/metrics.md); a column lists the keys it
accepts, first found wins, and missing ones print "–". Streaming latency columns (ms/frame,
end-to-end ms) are appended to any table when a row carries `latency_ms_per_frame` or
`latency_e2e_ms` (and are part of the Avatar Forcing layout).
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from avatar_jax.evals import stats


@dataclasses.dataclass(frozen=True)
class Column:
  header: str
  keys: tuple[str, ...]       # candidate result keys, first present wins
  arrow: str = ""             # ↑ higher is better, ↓ lower is better
  scale: float = 1.0          # publication scaling, applied to every seed before averaging
  digits: int = 3
  group: str = ""             # header group (talking / listening / ...)


def _c(header, keys, arrow="", scale=1.0, digits=3, group=""):
  keys = (keys,) if isinstance(keys, str) else tuple(keys)
  return Column(header, keys, arrow, scale, digits, group)


def _dualtalk_columns(sid_key: str) -> list[Column]:
  from avatar_jax.evals.dualtalk import PUBLICATION_SCALE as S  # pylint: disable=g-import-not-at-top
  cols = []
  for metric, label, arrow in (("fd", "FD", "↓"), ("pfd", "P-FD", "↓"), ("mse", "MSE", "↓"),
                               (sid_key, "SID", "↑"), ("rpcc", "rPCC", "↓")):
    for g in ("exp", "jaw", "pose"):
      key = f"{metric}_{g}"
      cols.append(_c(f"{label} {g}", key, arrow, S.get(key, 1.0), 2, label))
  return cols


LATENCY = [_c("ms/frame", "latency_ms_per_frame", "↓", digits=1, group="streaming"),
           _c("E2E ms", "latency_e2e_ms", "↓", digits=0, group="streaming")]

_SYNTHDYAD = [
    _c("lip_corr", "lip_corr", "↑", group="talking"),
    _c("lip_offset", "lip_offset", "↓", digits=2, group="talking"),
    _c("lip_conf", "lip_conf", "↑", group="talking"),
    _c("jaw_leak", "jaw_leak", "↓", group="listening"),
    _c("nod_f1", ("nod_f1_micro", "nod_f1"), "↑", group="listening"),
    _c("smile_resp", "smile_resp", "↑", group="listening"),
    _c("brow_resp", "brow_resp", "↑", group="listening"),
]

LAYOUTS: dict[str, list[Column]] = {
    # DualTalk / TIMAR tables (FD, P-FD, MSE, SID, rPCC per exp/jaw/pose) in TIMAR's published
    # units. TIMAR's SID fits k-means on the ground truth; DualTalk's on the prediction.
    "timar": _dualtalk_columns("sid_gt_fit"),
    "dualtalk": _dualtalk_columns("sid_pred_fit"),
    # SynthDyad §6, plus FD-face / FVD-face and the face reader's R^2 for video models.
    "synthdyad": _SYNTHDYAD + [
        _c("FD-face", "fd_face", "↓", group="video"),
        _c("FVD-face", "fvd_face", "↓", group="video"),
        _c("reader R² jaw", "reader_r2_jaw_open", "", group="video"),
    ],
    # The attention ablation (frame-aligned / global / Gaussian fixed-σ / Gaussian learned-σ).
    "synthdyad_ablation": _SYNTHDYAD,
    # Avatar Forcing: latency, reactiveness (rPCC), motion richness (SID, Var), visual quality,
    # lip sync.
    "avatar_forcing": [
        _c("Latency ms", ("latency_e2e_ms",), "↓", digits=0, group="streaming"),
        _c("rPCC-Exp", "rpcc_exp", "↓", group="reactiveness"),
        _c("rPCC-Pose", "rpcc_pose", "↓", group="reactiveness"),
        _c("SID", ("sid", "sid_pred_fit_exp"), "↑", digits=2, group="richness"),
        _c("Var", ("var", "variance_pred_exp"), "↑", group="richness"),
        _c("FID", ("fid", "fd_face"), "↓", digits=2, group="visual"),
        _c("FVD", ("fvd", "fvd_face"), "↓", digits=2, group="visual"),
        _c("CSIM", "csim", "↑", group="visual"),
        _c("LSE-D", "lse_d", "↓", digits=2, group="lip sync"),
        _c("LSE-C", "lse_c", "↑", digits=2, group="lip sync"),
    ],
    # ECHO: visual fidelity, lip sync, interaction (see docs/metrics.md on this layout).
    "echo": [
        _c("FID", ("fid", "fd_face"), "↓", digits=2, group="visual"),
        _c("FVD", ("fvd", "fvd_face"), "↓", digits=2, group="visual"),
        _c("CSIM", "csim", "↑", group="visual"),
        _c("LSE-D", "lse_d", "↓", digits=2, group="lip sync"),
        _c("LSE-C", "lse_c", "↑", digits=2, group="lip sync"),
        _c("FD exp", "fd_exp", "↓", digits=2, group="interaction"),
        _c("rPCC exp", "rpcc_exp", "↓", group="interaction"),
        _c("SID", ("sid", "sid_pred_fit_exp"), "↑", digits=2, group="interaction"),
        _c("Var", ("var", "variance_pred_exp"), "↑", group="interaction"),
    ],
}


def _label(row: Mapping[str, Any]) -> str:
  for k in ("name", "run"):
    if k in row:
      return str(row[k])
  raise KeyError(f"table row needs a 'name' (or 'run') label; found keys {sorted(row)}")


def _value(row: Mapping[str, Any], col: Column) -> float:
  for k in col.keys:
    if k in row and row[k] is not None:
      return float(row[k]) * col.scale
  return math.nan


def _columns(name: str, rows: Sequence[Mapping[str, Any]]) -> list[Column]:
  if name not in LAYOUTS:
    raise KeyError(f"unknown table layout {name!r}; known: {sorted(LAYOUTS)}")
  cols = list(LAYOUTS[name])
  have = {c.header for c in cols}
  for c in LATENCY:
    if c.header not in have and any(k in r for r in rows for k in c.keys):
      if not (c.keys == ("latency_e2e_ms",) and "Latency ms" in have):
        cols.append(c)
  return cols


def table_json(name: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """{'table', 'columns': [{header, keys, arrow, scale}], 'rows': [{name, n, cells}]}.

  Each cell: {'mean', 'ci95' (half-width, NaN for one seed), 'values' (per seed, scaled)}.
  Row order is the order labels first appear in `rows`.
  """
  cols = _columns(name, rows)
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for r in rows:
    groups.setdefault(_label(r), []).append(r)
  out_rows = []
  for label, members in groups.items():
    cells = {}
    for c in cols:
      vals = [_value(r, c) for r in members]
      m, hw = stats.mean_ci(vals)
      cells[c.header] = {"mean": m, "ci95": hw, "values": vals}
    seeds = [r.get("seed") for r in members]
    out_rows.append({"name": label, "n": len(members), "seeds": seeds, "cells": cells})
  return {"table": name,
          "columns": [dict(header=c.header, keys=list(c.keys), arrow=c.arrow, scale=c.scale,
                           group=c.group) for c in cols],
          "rows": out_rows}


def _fmt(cell: Mapping[str, Any], digits: int) -> str:
  m, hw = cell["mean"], cell["ci95"]
  if math.isnan(m):
    return "–"
  s = f"{m:.{digits}f}"
  if not math.isnan(hw):
    s += f" ± {hw:.{digits}f}"
  return s


def render_table(name: str, rows: Sequence[Mapping[str, Any]]) -> str:
  """Markdown table `name` (a key of LAYOUTS) of result rows; see the module docstring."""
  if not rows:
    raise ValueError(f"render_table({name!r}): no rows")
  data = table_json(name, rows)
  cols = _columns(name, rows)
  heads = [f"{c.header} {c.arrow}".strip() for c in cols]
  lines = []
  group_names = [c.group for c in cols]
  if any(group_names):
    lines.append("| | " + " | ".join(g if i == 0 or g != group_names[i - 1] else ""
                                     for i, g in enumerate(group_names)) + " | |")
    lines.append("|---|" + "---|" * (len(cols) + 1))
    lines.append("| method | " + " | ".join(heads) + " | n |")
  else:
    lines.append("| method | " + " | ".join(heads) + " | n |")
    lines.append("|---|" + "---|" * (len(cols) + 1))
  for r in data["rows"]:
    lines.append(f"| {r['name']} | " + " | ".join(_fmt(r["cells"][c.header], c.digits)
                                                  for c in cols) + f" | {r['n']} |")
  note = "mean ± 95% CI half-width (t-distribution) over seeds; n = seeds"
  if name in ("timar", "dualtalk"):
    note += ("; scaled as published: FD/P-FD jaw ×10³, pose ×10²; MSE exp ×10, jaw ×10³, "
             "pose ×10²; rPCC exp ×10², jaw/pose ×10")
  return "\n".join(lines) + f"\n\n_{note}._\n"


def write_table(name: str, rows: Sequence[Mapping[str, Any]], path: str) -> None:
  """Writes `path`.md (render_table) and `path`.json (table_json, NaN as null)."""
  with open(path + ".md", "w") as f:
    f.write(render_table(name, rows))
  def clean(x):
    if isinstance(x, float) and math.isnan(x):
      return None
    if isinstance(x, dict):
      return {k: clean(v) for k, v in x.items()}
    if isinstance(x, list):
      return [clean(v) for v in x]
    return x
  with open(path + ".json", "w") as f:
    json.dump(clean(table_json(name, rows)), f, indent=1)
