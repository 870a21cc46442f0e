"""Evaluators declared in `config.evals` (evals/runner.py) on a tiny motion DiT with random
weights: the SynthDyad table equals an independent per-clip computation (raw audio -> log-mel ->
generate in chunks -> metrics, as evaluation did before it read the pipeline), a model that
conditions on its partner's motion evaluates and samples, a FLAME 56-d system is scored without a
renderer, and `run` fires evaluators at the steps their config says."""
from __future__ import annotations

import json
import os

import av
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import trainer_harness as harness
from avatar_jax import system as system_lib
from avatar_jax.data import features, pipeline
from avatar_jax.data.synthdyad import flame
from avatar_jax.evals import dualtalk, runner, synthdyad_metrics
from avatar_jax.models import registry

CLIPS, BATCH = 3, 2   # two generation batches (2 + 1): the per-batch rng offsets matter


def _config(**overrides):
  return harness.load_quickstart(**{"evals.test.num_clips": CLIPS, "evals.test.batch_size": BATCH,
                                    "evals.test.crosstalk": True, **overrides})


def _model(config):
  """System and a MotionDiT with random (non-zero) weights, so the output depends on the audio."""
  system = registry.get(config.model.name)(config)
  it = pipeline.make(config.data, "train", keys=system.data_spec().keys, seed=0)
  model = system.build(rngs=nnx.Rngs(0), stats=system.fit_stats([next(it)]))
  params = nnx.state(model, nnx.Param)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(model, jax.tree.unflatten(
      tree, [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]))
  return system, model


def _reference_rows(system, model, config, rng, *, partner: bool = False):
  """The table computed clip by clip from the source, without the pipeline."""
  source = pipeline.make_source(config.data, "test")
  samples = [source.get(i, render=False) for i in range(CLIPS)]
  mel_cfg = features.mel_config_from(config.data.features)
  graphdef, state = nnx.split(model)
  gen = jax.jit(lambda s, b, r: system.generate(nnx.merge(graphdef, s), b, r).value)

  def generate(order, partner_order=None):
    """Own voice of clips `order`; every partner input of clips `partner_order` (or `order`,
    except partner motion, which shuffled audio leaves in place)."""
    who = {"self": order, "partner": order if partner_order is None else partner_order}
    batch = {f"mel_{s}": np.stack([features.log_mel(samples[j][f"audio_{s}"], mel_cfg)
                                   for j in who[s]]) for s in ("self", "partner")}
    if partner:
      batch["motion_partner"] = np.stack([samples[j]["motion_partner"] for j in
                                          (range(CLIPS) if partner_order is None else partner_order)])
    outs = [np.asarray(gen(state, {k: jnp.asarray(v[i:i + BATCH]) for k, v in batch.items()},
                           jax.random.fold_in(rng, i))) for i in range(0, CLIPS, BATCH)]
    return np.concatenate(outs)

  nxt = np.roll(np.arange(CLIPS), -1)
  preds = {"model": generate(range(CLIPS)), "shuffled audio": generate(nxt)}
  preds["mean motion"] = np.broadcast_to(np.asarray(model.mean[...]), preds["model"].shape)
  preds["ground truth"] = np.stack([s["motion_self"] for s in samples])
  rows = {name: synthdyad_metrics.aggregate([synthdyad_metrics.clip_metrics(p, s)
                                             for p, s in zip(pred, samples)])
          for name, pred in preds.items()}
  # Crosstalk: own voice, the partner of the next clip from another conversation (sample i is
  # conversation i // 2); scored with that partner's speaking flags (all test clips have the
  # same length), no listening-event metrics.
  other = [next(j % CLIPS for j in range(i + 1, i + CLIPS) if j % CLIPS // 2 != i // 2)
           for i in range(CLIPS)]
  crossed = generate(range(CLIPS), other)
  clips = []
  for i, p in enumerate(crossed):
    m = synthdyad_metrics.clip_metrics(
        p, dict(samples[i], speaking_partner=samples[other[i]]["speaking_partner"]))
    m.update(nod_f1=np.nan, smile_resp=np.nan, brow_resp=np.nan, nod_tp=0, nod_fp=0, nod_fn=0)
    clips.append(m)
  rows["crosstalk (another conversation's partner)"] = synthdyad_metrics.aggregate(clips)
  return rows


def _assert_rows_equal(got, want):
  assert set(got) == set(want)
  for name in want:
    assert set(got[name]) == set(want[name]), name
    for k, v in want[name].items():
      np.testing.assert_allclose(got[name][k], v, rtol=1e-4, atol=1e-5, equal_nan=True,
                                 err_msg=f"{name}/{k}")


@pytest.fixture(scope="module")
def motion_run():
  config = _config()
  return (config, *_model(config))


def test_synthdyad_table_matches_per_clip_reference(motion_run, tmp_path):
  config, system, model = motion_run
  res = runner.run(system, model, config, str(tmp_path), step=7, only=["test"], force=True)
  rows = res["test"]["test"]["rows"]
  _assert_rows_equal(rows, _reference_rows(system, model, config, jax.random.key(config.seed + 1)))
  # The audio reaches the motion: shuffling it changes the lips.
  assert rows["model"]["lip_corr"] != rows["shuffled audio"]["lip_corr"]
  # The crosstalk row heard another partner over the same own voice.
  crossed = rows["crosstalk (another conversation's partner)"]
  assert crossed["jaw_leak"] != rows["model"]["jaw_leak"] and np.isnan(crossed["smile_resp"])
  assert rows["ground truth"]["lip_corr"] == pytest.approx(1.0) and rows["model"]["clips"] == CLIPS
  with open(tmp_path / "eval" / "test.json") as f:
    saved = json.load(f)
  assert (saved["split"], saved["step"]) == ("test", 7)
  _assert_rows_equal(saved["rows"], rows)
  assert "### SynthDyad `test` split, step 7" in (tmp_path / "eval" / "test.md").read_text()


def test_crosstalk_partners_come_from_another_conversation():
  from avatar_jax.evals import motion  # pylint: disable=g-import-not-at-top
  # Sample i is conversation i // 2: 0 and 1 are one conversation seen from both sides.
  np.testing.assert_array_equal(motion.crosstalk_partners(np.array([0, 1, 2])), [2, 2, 0])
  # Tiles of one clip share its example index.
  np.testing.assert_array_equal(motion.crosstalk_partners(np.array([4, 4, 5, 6])), [3, 3, 3, 0])
  with pytest.raises(ValueError, match="need.* >= 2 conversations.*examples \\[0, 1\\]"):
    motion.crosstalk_partners(np.array([0, 1]))


def test_tiled_windows_crop_the_truth(motion_run, tmp_path):
  """Tiles of 2 s: the ground-truth row of each window is perfect on its own clock."""
  config, system, model = motion_run
  config.evals.test.windows = "tile"
  config.evals.test.clip_frames = 50
  try:
    res = runner.run(system, model, config, str(tmp_path), only=["test"], force=True,
                     overrides={"num_clips": 5, "crosstalk": False})  # 5 tiles: one conversation
  finally:
    config.evals.test.windows = "full"
    config.evals.test.clip_frames = None
  rows = res["test"]["test"]["rows"]
  assert rows["model"]["clips"] == 5
  truth = rows["ground truth"]
  assert truth["lip_corr"] == pytest.approx(1.0) and truth["lip_offset"] == 0
  assert truth["nod_f1"] == 1.0 or np.isnan(truth["nod_f1"])


def _frames(path):
  with av.open(str(path)) as c:
    return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_partner_motion_model_evaluates_and_samples(tmp_path):
  config = _config(**{"model.use_partner_motion": True, "evals.sample.every": 5,
                     "evals.test.at_end": True})
  system, model = _model(config)
  res = runner.run(system, model, config, str(tmp_path), step=10, final=True)
  assert set(res) == {"sample", "test"}   # video every 5 steps, the table at the end
  rows = res["test"]["test"]["rows"]
  _assert_rows_equal(rows, _reference_rows(system, model, config, jax.random.key(config.seed + 1),
                                           partner=True))
  frames = _frames(res["sample"]["test"])
  assert res["sample"]["test"].endswith("samples/step_0000010.mp4")
  assert frames.shape == (200, 64, 128, 3)   # a whole 8 s test clip, avatar | partner
  # The right half is the partner's true motion: it moves.
  assert np.abs(np.diff(frames[..., 64:, :].astype(np.float32), axis=0)).mean() > 0.1


class _FlameSystem(system_lib.System):
  """A 56-d FLAME system (no SynthDyad renderer): the motion DiT's output, exported to 56-d."""

  def __init__(self, config, inner):
    super().__init__(config)
    self.inner = inner

  def data_spec(self):
    return self.inner.data_spec()

  def build(self, *, rngs, stats=None):
    return self.inner.build(rngs=rngs, stats=stats)

  def loss(self, model, batch, rng, aux=None):
    return self.inner.loss(model, batch, rng, aux)


def test_flame56_space_is_scored_without_a_renderer(motion_run, tmp_path):
  config, inner, model = motion_run
  rng = jax.random.key(3)
  motion = runner.generate(inner, model, list(runner.batches(
      runner.Context(inner, model, config, str(tmp_path), name="x"),
      ml_collections.ConfigDict(runner.defaults("flame56") | {"num_clips": CLIPS, "batch_size": BATCH}),
      inner.data_spec().keys, "test")), rng).value
  want56 = np.stack([flame.to_flame56(m) for m in motion])

  class Flame(_FlameSystem):   # SynthDyad motion, scored through its 56-d export
    def generate(self, model, batch, rng, **options):
      out = self.inner.generate(model, batch, rng, **options)
      return system_lib.Outputs(value=out.value, space="motion")

  # A system whose outputs live in FLAME space: the 56-d values themselves.
  class Flame56(_FlameSystem):
    def generate(self, model, batch, rng, **options):
      out = self.inner.generate(model, batch, rng, **options)
      return system_lib.Outputs(value=jnp.asarray(flame_export(out.value)), space="flame56")

  def flame_export(m):
    return jax.pure_callback(lambda x: np.stack([flame.to_flame56(v) for v in np.asarray(x)]),
                             jax.ShapeDtypeStruct(m.shape[:2] + (56,), jnp.float32), m)

  evals = {"f56": dict(type="flame56", split="test", num_clips=CLIPS, batch_size=BATCH, seed=3),
           "vid": dict(type="video", split="test"),
           "tab": dict(type="synthdyad", split="test", num_clips=CLIPS, batch_size=BATCH)}
  with config.unlocked():
    config.evals = evals
  try:
    source = pipeline.make_source(config.data, "test")
    samples = [source.get(i, render=False) for i in range(CLIPS)]
    want, _ = dualtalk.evaluate_arrays(list(want56), [s["flame56_self"] for s in samples],
                                       [s["flame56_partner"] for s in samples])
    for cls in (Flame, Flame56):
      system = cls(config, inner)
      res = runner.run(system, model, config, str(tmp_path), only=["f56", "vid"], force=True)
      got = res["f56"]["test"]["rows"]["model"]
      assert set(got) == set(want) and got["clips"] == CLIPS
      for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-4, atol=1e-6, equal_nan=True, err_msg=k)
      assert res["vid"] == {}   # no decode: no video, and no error
    # The SynthDyad table reads FLAME outputs back through the inverse export map: the same
    # numbers as the motion they were exported from.
    with config.unlocked():
      config.evals.tab.baselines = False
    tabs = [runner.run(cls(config, inner), model, config, str(tmp_path), only=["tab"],
                       force=True)["tab"]["test"]["rows"]["model"] for cls in (Flame, Flame56)]
    assert set(tabs[0]) == set(tabs[1]) and "jaw_leak" in tabs[0]
    for k, v in tabs[0].items():
      np.testing.assert_allclose(tabs[1][k], v, rtol=1e-4, atol=1e-5, equal_nan=True, err_msg=k)
    with config.unlocked():
      config.evals.tab = dict(type="synthdyad", split="test", num_clips=CLIPS, batch_size=BATCH)

    class Latent(_FlameSystem):
      def generate(self, model, batch, rng, **options):
        out = self.inner.generate(model, batch, rng, **options)
        return system_lib.Outputs(value=out.value, space="video_latent")
    with pytest.raises(ValueError, match="generates 'video_latent'"):
      runner.run(Latent(config, inner), model, config, str(tmp_path), only=["tab"], force=True)
  finally:
    with config.unlocked():
      config.evals = harness.load_quickstart().evals
  assert (tmp_path / "eval" / "f56_test.json").exists()
  assert not (tmp_path / "samples").exists()


def test_declared_evaluators_and_their_steps(tmp_path):
  calls = []
  if "_record" not in runner.types():
    runner.register("_record", tag="")(lambda ctx, cfg: calls.append((ctx.step, cfg.tag)) or cfg.tag)
  config = ml_collections.ConfigDict(dict(seed=0, evals=dict(
      a=dict(type="_record", every=3, at_end=False, tag="a"),
      b=dict(type="_record", tag="b"))))
  built = []

  def model():
    built.append(1)
    return nnx.Linear(1, 1, rngs=nnx.Rngs(0))

  for step in range(1, 8):
    runner.run(None, model, config, str(tmp_path), step=step, final=step == 7)
  assert [c for c in calls] == [(3, "a"), (6, "a"), (7, "b")]
  assert len(built) == 3                      # the model is built only when an evaluator is due
  full = runner.declared(config)["a"]
  assert (full.split, full.num_clips, full.windows) == ("test", 32, "full")
  config.evals.c = dict(type="_record", evry=2)
  with pytest.raises(KeyError, match="evry"):
    runner.declared(config)
  config.evals.c = dict(type="nope")
  with pytest.raises(KeyError, match="unknown evaluator type 'nope'"):
    runner.declared(config)
