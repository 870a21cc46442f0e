"""Train state beyond 'train every parameter': frozen sub-models, auxiliary (reference) models,
multi-stage training with `config.init_from` onto another mesh, and `restore_model` (EMA only).

The systems are toys defined here — a new system is a module exporting `System` plus a config, and
`config.model.name = "test_stages"` names this very module (imported as user code would be).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import trainer_harness as harness
from avatar_jax import checkpointing, config_lib, convert, sharding, system as system_lib, trainer
from avatar_jax.data import pipeline
from avatar_jax.models import registry
from avatar_jax.models.layers import dense

WIDTH, BATCH, STEPS = 16, 8, 4
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class Stats(nnx.Variable):
  """A non-Param variable (goes to state['rest'])."""


class Toy(nnx.Module):
  """x [B, D] -> head(gelu(body(x))) * scale [B, D]."""

  def __init__(self, d: int, *, rngs: nnx.Rngs):
    self.body = dense(d, d, ("embed", "mlp"), rngs=rngs)
    self.head = dense(d, d, ("mlp", "embed"), rngs=rngs)
    self.scale = Stats(jnp.full((d,), 2.0))

  def __call__(self, x):
    return self.head(jax.nn.gelu(self.body(x))) * self.scale[...]


class System(system_lib.System):
  """Regression toy; `model.freeze_body` trains only the head; `model.dpo` adds a frozen reference
  policy and a DPO loss on on-policy negatives drawn inside the step (prepare_batch)."""

  def __init__(self, config):
    super().__init__(config)
    self.cfg = config.model

  @property
  def trainable(self):
    return nnx.PathContains("head") if self.cfg.freeze_body else nnx.Param

  def data_spec(self):
    return system_lib.DataSpec(keys=("x", "y"))

  def build(self, *, rngs, stats=None):
    return Toy(self.cfg.width, rngs=rngs)

  def aux_models(self, *, rngs):
    return {"reference": Toy(self.cfg.width, rngs=rngs)} if self.cfg.dpo else {}

  def prepare_batch(self, model, aux, batch, rng):
    if not self.cfg.dpo:
      return batch
    # A sample of the current policy (Gaussian around its mean) is the rejected answer.
    noise = 0.3 * jax.random.normal(rng, batch["y"].shape)
    return {**batch, "y_rejected": model(batch["x"]) + noise}

  def loss(self, model, batch, rng, aux=None):
    del rng
    if not self.cfg.dpo:
      err = jnp.mean((model(batch["x"]) - batch["y"]) ** 2)
      return err, {"mse": err}
    ref = aux["reference"]
    logp = lambda m, y: -jnp.sum((m(batch["x"]) - y) ** 2, axis=-1)
    margin = ((logp(model, batch["y"]) - logp(ref, batch["y"]))
              - (logp(model, batch["y_rejected"]) - logp(ref, batch["y_rejected"])))
    loss = -jnp.mean(jax.nn.log_sigmoid(self.cfg.beta * margin))
    return loss, {"margin": jnp.mean(margin)}


def toy_config(**model) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = dict(name="test_stages", width=WIDTH, freeze_body=False, dpo=False, beta=0.1)
  c.model.update(model)
  c.optim = dict(lr=3e-2, warmup_steps=0, end_lr_factor=1.0, b1=0.9, b2=0.99, weight_decay=0.0,
                 clip_norm=10.0, ema_decay=0.5)
  c.train = dict(num_steps=STEPS, stats_batches=1)
  c.init_from = config_lib.init_from()
  return c


def toy_batch(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((BATCH, WIDTH)).astype(np.float32)
  return {"x": x, "y": np.tanh(x[:, ::-1]).copy()}


def _mesh(shape):
  return sharding.make_mesh(shape, devices=jax.devices()[:int(np.prod(list(shape.values())))])


def _run(config, mesh_shape, steps=STEPS):
  """(setup, initial host state, final state, losses, metrics of the last step)."""
  s = trainer.setup(config, _mesh(mesh_shape), fit=False, compiler_options=FAST_COMPILE)
  init, state, losses = jax.device_get(s.state), s.state, []
  for i in range(steps):
    state, metrics = s.train_step(state, s.batch(toy_batch(i)))
    losses.append(float(metrics["loss"]))
  return s, init, state, losses, jax.device_get(metrics)


def _flat(tree):
  return {trainer._path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _save(workdir, state, config, step=STEPS):
  ckpt = checkpointing.Checkpointer(str(workdir / "checkpoints"), async_save=False)
  ckpt.save(step, state, None, config)
  ckpt.close()


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
  """A run of the full toy (every parameter trained) on data=8, checkpointed: (workdir, host state)."""
  config = toy_config()
  _, _, state, losses, _ = _run(config, {"data": 8})
  assert losses[-1] < losses[0]
  workdir = tmp_path_factory.mktemp("stage1")
  _save(workdir, state, config)
  return workdir, jax.device_get(state)


def test_registry_imports_the_module_named_by_the_config():
  assert registry.get("test_stages") is System
  assert registry.get("motion.motion_dit").__module__ == "avatar_jax.models.motion.motion_dit"
  with pytest.raises(KeyError, match="avatar_jax.models.no_such_model or no_such_model"):
    registry.get("no_such_model")
  with pytest.raises(TypeError, match="must export `System`"):
    registry.get("layers")   # a module under avatar_jax.models that is not a system


def test_frozen_submodel_has_no_optimiser_state_and_does_not_move():
  s, init, state, losses, _ = _run(toy_config(freeze_body=True), {"data": 2, "fsdp": 2, "tensor": 2})
  state = jax.device_get(state)
  assert set(_flat(state["params"])) == {"head/kernel", "head/bias"}
  assert set(_flat(state["frozen"])) == {"body/kernel", "body/bias"}
  assert set(_flat(state["ema"])) == set(_flat(state["params"]))
  assert set(_flat(state["rest"])) == {"scale"}
  # Adam moments exist for the head only: two moments per trained array.
  opt_sizes = sorted(x.size for x in jax.tree.leaves(state["opt"]) if x.ndim > 0)
  assert opt_sizes == sorted(2 * [WIDTH * WIDTH, WIDTH])
  assert s.num_params == {"trainable": WIDTH * WIDTH + WIDTH, "frozen": WIDTH * WIDTH + WIDTH,
                          "aux": 0}
  for path, x in _flat(state["frozen"]).items():
    np.testing.assert_array_equal(x, _flat(init["frozen"])[path], err_msg=path)
  assert np.abs(_flat(state["params"])["head/kernel"] - _flat(init["params"])["head/kernel"]).max() > 1e-3
  assert losses[-1] < losses[0]


def test_init_from_loads_a_subset_onto_another_mesh(stage1, tmp_path):
  workdir, src = stage1
  config = toy_config()
  config.init_from = config_lib.init_from(str(workdir), include=("body/",), exclude=("bias$",))
  mesh = {"fsdp": 4, "data": 2}
  s = trainer.setup(config, _mesh(mesh), fit=False)
  fresh = jax.device_get(trainer.setup(toy_config(), _mesh(mesh), fit=False).state)
  got = _flat(jax.device_get(s.state["params"]))
  # The body kernel is stage 1's EMA (not its raw params); the rest is this run's initialisation.
  np.testing.assert_array_equal(got["body/kernel"], _flat(src["ema"])["body/kernel"])
  assert np.abs(_flat(src["ema"])["body/kernel"] - _flat(src["params"])["body/kernel"]).max() > 0
  np.testing.assert_array_equal(_flat(jax.device_get(s.state["ema"]))["body/kernel"], got["body/kernel"])
  for path in ("body/bias", "head/kernel", "head/bias"):
    np.testing.assert_array_equal(got[path], _flat(fresh["params"])[path], err_msg=path)
  # Resharded: the [D, D] kernel is split over fsdp on this mesh (it was replicated on data=8).
  kernel = s.state["params"]["body"]["kernel"][...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert {sh.data.shape for sh in kernel.addressable_shards} == {(WIDTH // 4, WIDTH)}
  # Training goes on from the loaded weights.
  state, metrics = s.train_step(s.state, s.batch(toy_batch()))
  assert np.isfinite(float(metrics["loss"]))


def test_init_from_errors_name_the_problem(stage1):
  workdir, _ = stage1
  config = toy_config()
  config.init_from = config_lib.init_from(str(workdir), include=("decoder/",))
  with pytest.raises(ValueError, match=r"pattern 'decoder/' matches no variable.*body/bias"):
    trainer.setup(config, _mesh({"data": 8}), fit=False)
  wider = toy_config(width=2 * WIDTH)
  wider.init_from = config_lib.init_from(str(workdir), include=("head/kernel",))
  with pytest.raises(ValueError, match=r"'head/kernel' has shape \(16, 16\).*\(32, 32\)"):
    trainer.setup(wider, _mesh({"data": 8}), fit=False)
  config.init_from = config_lib.init_from(str(workdir), into="model/body")
  with pytest.raises(ValueError, match="no counterpart 'model/body/body/bias'"):
    trainer.setup(config, _mesh({"data": 8}), fit=False)


def test_dpo_step_trains_the_policy_and_not_the_reference(stage1):
  workdir, src = stage1
  config = toy_config(dpo=True, beta=0.5)
  config.optim.lr = 1e-2
  # Both the policy and its frozen reference start from stage 1 (two named init_from entries).
  config.init_from = ml_collections.ConfigDict(dict(
      policy=config_lib.init_from(str(workdir)),
      reference=config_lib.init_from(str(workdir), into="aux/reference")))
  s, init, state, losses, metrics = _run(config, {"fsdp": 2, "data": 4}, steps=8)
  state = jax.device_get(state)
  ref = _flat(state["aux"]["reference"])
  assert set(ref) == {"body/kernel", "body/bias", "head/kernel", "head/bias", "scale"}
  for path in ("body/kernel", "head/kernel"):
    np.testing.assert_array_equal(ref[path], _flat(src["ema"])[path], err_msg=path)
    np.testing.assert_array_equal(_flat(init["params"])[path], _flat(src["ema"])[path])
  # Auxiliary models get no optimiser state and no EMA.
  assert sorted(x.size for x in jax.tree.leaves(state["opt"]) if x.ndim > 0) == \
      sorted(2 * [WIDTH * WIDTH, WIDTH, WIDTH * WIDTH, WIDTH])
  assert set(_flat(state["ema"])) == set(_flat(state["params"]))
  # At the start policy == reference, so the margin is 0 and the loss log 2; it then trains.
  assert losses[0] == pytest.approx(np.log(2.0), abs=1e-5)
  assert np.mean(losses[-3:]) < 0.45 and metrics["margin"] > 0
  assert np.abs(_flat(state["params"])["head/kernel"] - ref["head/kernel"]).max() > 1e-3


def test_restore_model_restores_ema_onto_a_chosen_mesh(stage1):
  workdir, src = stage1
  system, model, config, step = trainer.restore_model(str(workdir), mesh_shape={"fsdp": 4, "data": 2})
  assert isinstance(system, System) and step == STEPS and config.model.width == WIDTH
  kernel = model.body.kernel[...]
  np.testing.assert_array_equal(np.asarray(kernel), _flat(src["ema"])["body/kernel"])
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)   # not replicated
  np.testing.assert_array_equal(np.asarray(model.scale[...]), np.full(WIDTH, 2.0))
  _, raw, _, _ = trainer.restore_model(str(workdir), ema=False)
  np.testing.assert_array_equal(np.asarray(raw.body.kernel[...]), _flat(src["params"])["body/kernel"])


def test_motion_dit_generates_with_partner_motion():
  config = harness.load_quickstart(**{"model.use_partner_motion": True})
  s = trainer.setup(config, _mesh({"data": 1}), fit=False)
  keys = s.system.data_spec().keys
  assert "motion_partner" in keys and "fps" not in config.model
  batch = next(pipeline.make(config.data, "test", keys=keys, shuffle=False))
  batch = {k: jnp.asarray(batch[k][:2]) for k in keys}
  out = s.system.generate(s.model(), batch, jax.random.key(0), steps=2)
  assert isinstance(out, system_lib.Outputs) and out.space == "motion"
  assert out.value.shape == batch["motion_partner"].shape == (2, config.data.clip_frames, 10)
  assert np.all(np.isfinite(np.asarray(out.value)))
  with pytest.raises(KeyError, match="motion_partner"):
    s.system.generate(s.model(), {k: batch[k] for k in ("mel_self", "mel_partner")}, jax.random.key(0))


def test_exported_weights_restore_and_init_like_the_workdir(stage1, tmp_path):
  workdir, src = stage1
  out = str(tmp_path / "weights")
  assert convert.main(["weights", "--src", str(workdir), "--out", out]) == 0
  saved = checkpointing.Checkpointer(os.path.join(out, "checkpoints"), async_save=False)
  # Only what sampling and init_from read: no raw parameters, optimiser state or data position.
  assert set(saved.state_metadata(STEPS)) == set(checkpointing.WEIGHT_PARTS)
  saved.close()
  system, model, config, step = trainer.restore_model(out, mesh_shape={"fsdp": 4, "data": 2})
  assert step == STEPS and config.model.width == WIDTH
  np.testing.assert_array_equal(np.asarray(model.body.kernel[...]), _flat(src["ema"])["body/kernel"])
  np.testing.assert_array_equal(np.asarray(model.scale[...]), np.full(WIDTH, 2.0))
  with pytest.raises(ValueError, match=r"not \[.params.\].*EMA only"):   # no raw parameters
    trainer.restore_model(out, ema=False)
  config = toy_config()
  config.init_from = config_lib.init_from(out)
  s = trainer.setup(config, _mesh({"data": 8}), fit=False)
  np.testing.assert_array_equal(_flat(jax.device_get(s.state["params"]))["head/kernel"],
                                _flat(src["ema"])["head/kernel"])
  with pytest.raises(FileExistsError, match="empty directory"):
    checkpointing.export_weights(str(workdir), out)
  with pytest.raises(FileNotFoundError, match="nothing to export"):
    checkpointing.export_weights(str(tmp_path / "none"), str(tmp_path / "w2"))
