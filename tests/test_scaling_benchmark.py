"""benchmarks/scaling.py on the tiny config (8 fake CPU devices): its table has every layout's
weak and strong rows, every layout computes the one-device step, and its efficiencies are
numbers. Speed is not asserted (fake devices share 2 cores)."""
from __future__ import annotations

import contextlib
import io
import math

import pytest

import trainer_harness as harness
from benchmarks import scaling


LAYOUTS = ("data", "fsdp", "context")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(rows, printed table, markdown file) of a scaling run over 1 and 2 devices."""
  out_md = tmp_path_factory.mktemp("scaling") / "scaling.md"
  mp = pytest.MonkeyPatch()
  # The harness's tiny config (its overrides are not command-line arguments of the benchmark).
  mp.setattr(scaling, "load_config", lambda spec: harness.load_quickstart())
  printed = io.StringIO()
  try:
    with contextlib.redirect_stdout(printed):
      # A given peak skips the CPU matmul that would measure one per run; 4 = the strong batch.
      rows = scaling.main(["--config", "configs/quickstart.py", "--devices", "1,2,16",
                           "--batch_per_device", "2", "--steps", "1", "--warmup", "1",
                           "--peak_tflops", "1", "--rtol", "1e-4", "--out_md", str(out_md)])
  finally:
    mp.undo()
  return rows, printed.getvalue(), out_md.read_text()


def _table(text: str) -> list[list[str]]:
  lines = [l for l in text.splitlines() if l.startswith("| ")]
  return [[c.strip() for c in l.strip("|").split("|")] for l in lines]


def test_table_has_every_layout_kind_and_device_count(run):
  rows, printed, md = run
  assert "(only 8 devices: no runs on [16])" in printed
  header, *body = _table(printed)
  assert header == list(scaling.COLUMNS)
  expected = [(layout, kind, str(n)) for layout in LAYOUTS for kind in ("weak", "strong")
              for n in (1, 2)]
  assert [tuple(r[:3]) for r in body] == expected
  meshes = {(r[0], r[2]): r[3] for r in body}
  assert meshes[("data", "2")] == "data=2" and meshes[("fsdp", "2")] == "fsdp=2"
  assert meshes[("context", "2")] == "context=2" and meshes[("data", "1")] == "1 device"
  # Weak: batch_per_device per device (context shares one batch); strong: 2 x 2 everywhere.
  batches = {(r[0], r[1], r[2]): int(r[4]) for r in body}
  assert batches[("data", "weak", "1")] == 2 and batches[("data", "weak", "2")] == 4
  assert batches[("context", "weak", "2")] == 2
  assert {b for (l, k, n), b in batches.items() if k == "strong"} == {4}
  assert len(rows) == len(body)
  # The markdown file holds the same table and verdict.
  assert _table(md) == _table(printed) and "match the one-device run" in md


def test_every_layout_computes_the_one_device_step(run):
  rows, printed, _ = run
  assert "match the one-device run on the same global batch (rtol 0.0001)" in printed
  for r in rows:
    ref = rows[r["reference"]]
    assert ref["n"] == 1 and ref["global_batch"] == r["global_batch"]
    assert math.isfinite(r["loss"]) and r["grad_norm"] > 0
    assert r["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
  # The check is not vacuous: batches of 2 and 4 examples have different losses.
  by_batch = {r["global_batch"]: r["loss"] for r in rows}
  assert abs(by_batch[2] - by_batch[4]) > 1e-3 * abs(by_batch[4])


def test_efficiencies_are_finite_and_positive(run):
  rows, _, _ = run
  for r in rows:
    assert math.isfinite(r["efficiency"]) and r["efficiency"] > 0, r
    assert r["step_ms"] > 0 and r["examples_per_s"] > 0 and 0 < r["mfu"] < math.inf
    if r["n"] == 1:
      assert r["efficiency"] == 1.0
    else:   # weak: t1 / tn; strong: t1 / (n tn), against the same layout's one-device row
      one = next(d for d in rows if (d["layout"], d["kind"], d["n"]) == (r["layout"], r["kind"], 1))
      div = 1 if r["kind"] == "weak" else r["n"]
      assert r["efficiency"] == pytest.approx(one["step_ms"] / (div * r["step_ms"]))


def test_a_layout_that_computes_another_step_is_reported():
  row = lambda layout, n, batch, loss, gn: dict(layout=layout, kind="weak", n=n,
                                                global_batch=batch, loss=loss, grad_norm=gn)
  done = [row("data", 1, 4, 2.0, 1.0), row("data", 2, 4, 2.0, 1.0 + 1e-7),
          row("context", 2, 4, 2.5, 1.0), row("fsdp", 2, 8, 3.0, 1.0),
          row("fsdp", 4, 8, float("nan"), 1.0)]
  bad = scaling.check_agreement(done, rtol=1e-4)
  assert len(bad) == 2
  assert bad[0].startswith("context weak on 2 devices: loss 2.5, but data weak on 1 device(s)")
  # No one-device run of batch 8: the first row with it is the reference.
  assert bad[1].startswith("fsdp weak on 4 devices: loss nan, but fsdp weak on 2 device(s)")
  assert [r["reference"] for r in done] == [0, 0, 0, 3, 3]
