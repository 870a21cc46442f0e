"""Configs: `get_config(arg)` arguments, locking, overrides and mesh validation.

A typo anywhere on the command line (config argument, override key at any depth, mesh axis)
must stop the run before it touches the workdir.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import sys

import jax
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

import trainer_harness as harness
from avatar_jax import checkpointing, config_lib, sharding

CONFIGS = sorted(glob.glob(os.path.join(harness.REPO, "configs", "*.py")))


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3] + "_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ------------------------------------------------------------------------- every config file
@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_file_conventions(path):
  module = _load(path)
  # The docstring opens with the command that runs it (within its first lines).
  head = "\n".join(module.__doc__.strip().splitlines()[:5])
  assert "python -m avatar_jax." in head and os.path.relpath(path, harness.REPO) in head, head
  config = module.get_config()
  assert isinstance(config, ml_collections.ConfigDict) and config.is_locked
  with pytest.raises(AttributeError):
    config.nonexistent_key = 1
  # What checkpoints store (JSON) restores to the same values.
  restored = ml_collections.ConfigDict(json.loads(config.to_json_best_effort()))
  normal = lambda c: json.loads(json.dumps(c.to_dict(), default=str))
  assert normal(restored) == normal(config)
  # Mesh axes are the known ones; a mesh that fills with -1 fits these 8 devices too (a config
  # for a fixed pod size need not).
  mesh = dict(config.mesh)
  assert set(mesh) <= set(sharding.MESH_AXES) and all(isinstance(v, int) for v in mesh.values())
  if -1 in mesh.values():
    sharding.make_mesh(mesh)


# ------------------------------------------------------------------------- quickstart arguments
def test_quickstart_arguments_reach_the_config():
  module = _load(harness.QUICKSTART)
  c = module.get_config("steps=7,width=48,depth=2,batch=16,attn=global,learn_sigma=false,"
                        "eval_clips=3,seed=5,clip_frames=30")
  assert c.train.num_steps == 7 and isinstance(c.train.num_steps, int)
  assert (c.model.width, c.model.depth, c.data.batch_size) == (48, 2, 16)
  assert c.model.attention.mode == "global" and c.model.attention.learn_sigma is False
  assert (c.evals.test.num_clips, c.seed, c.data.clip_frames) == (3, 5, 30)
  # Data facts live in config.data only (the system derives them: pipeline.facts).
  assert not {"n_mels", "fps", "mel_rate"} & set(c.model.keys())
  assert (c.model.dtype, c.model.param_dtype) == ("float32", "float32")
  bf16 = module.get_config("dtype=bfloat16").model
  assert (bf16.dtype, bf16.param_dtype) == ("bfloat16", "float32")
  assert c.init_from.workdir == "" and c.init_from.into == "model"
  default = module.get_config()
  assert default.model.attention.learn_sigma is True and default.model.attention.mode == "gaussian"
  # A bare name switches a boolean on.
  assert module.get_config("learn_sigma").model.attention.learn_sigma is True


@pytest.mark.parametrize("arg, error, words", [
    ("bogus=1", KeyError, ["bogus", "steps", "width"]),
    ("steps=ten", ValueError, ["ten"]),
    ("learn_sigma=maybe", ValueError, ["learn_sigma", "true/false"]),
])
def test_quickstart_bad_arguments(arg, error, words):
  module = _load(harness.QUICKSTART)
  with pytest.raises(error) as e:
    module.get_config(arg)
  for w in words:
    assert w in str(e.value)


def test_parse_arg_types():
  out = config_lib.parse_arg("a=3,b=0.5,c=x,d=TRUE,,e=None", a=1, b=1.0, c="s", d=False, e=None)
  assert (out.a, out.b, out.c, out.d, out.e) == (3, 0.5, "x", True, "None")
  assert isinstance(out.a, int) and isinstance(out.b, float)
  assert config_lib.parse_arg(None, a=1).a == 1


# ------------------------------------------------------------------------- command-line overrides
def _parse(*argv):
  """Parses --config flags exactly as train.py defines them (locked config)."""
  fv = flags.FlagValues()
  argv = ["train", *argv]
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_overrides_apply_with_types():
  c = _parse(f"--config={harness.QUICKSTART}:steps=5", "--config.train.num_steps=9",
             "--config.optim.lr=0.002", "--config.data.synthdyad.fps=30", "--config.mesh.data=2")
  assert c.train.num_steps == 9 and c.optim.lr == 0.002 and c.data.synthdyad.fps == 30
  assert c.mesh.data == 2


@pytest.mark.parametrize("override, names", [
    ("--config.train.nonexistent=1", "nonexistent"),       # unknown key
    ("--config.trian.num_steps=1", "train"),               # typo'd section (suggests 'train')
    ("--config.data.synthdyad.fsp=30", "fsp"),             # typo'd key two levels down
    ("--config.mesh.pipeline=2", "pipeline"),              # unknown mesh axis
    ("--config.train.num_steps=many", "many"),             # wrong type
])
def test_bad_overrides_fail(override, names):
  with pytest.raises((AttributeError, KeyError, flags.Error), match=names):
    _parse(f"--config={harness.QUICKSTART}", override)


@pytest.mark.parametrize("args, words", [
    (["--config.train.nonexistent=1"], ["nonexistent"]),
    (["--config.data.synthdyad.fsp=30"], ["fsp"]),
    ([":bogus=1"], ["bogus", "unknown"]),
])
def test_train_rejects_bad_config_before_touching_workdir(tmp_path, args, words):
  workdir = tmp_path / "w"
  config = f"--config={harness.QUICKSTART}" + (args[0] if args[0].startswith(":") else "")
  extra = [a for a in args if not a.startswith(":")]
  out = harness.run([sys.executable, "-m", "avatar_jax.train", config, *extra,
                     f"--workdir={workdir}"], str(tmp_path / "cache"), timeout=120)
  assert out.returncode != 0
  for w in words:
    assert w in out.stderr, out.stderr[-2000:]
  assert not workdir.exists()


# ------------------------------------------------------------------------- mesh validation
def test_make_mesh_fills_and_validates():
  mesh = sharding.make_mesh({"data": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "context": 1, "tensor": 2}
  assert mesh.axis_names == sharding.MESH_AXES
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(sharding.make_mesh({"fsdp": -1}).shape)["fsdp"] == 8
  cases = [
      ({"data": 2, "pipeline": 4}, "unknown axes ['pipeline']"),
      ({"data": -1, "fsdp": -1}, "at most one axis may be -1"),
      ({"data": -1, "tensor": 3}, "not divisible by 3"),
      ({"data": 3}, "needs 3 devices, found 8"),
  ]
  for shape, message in cases:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
      sharding.make_mesh(shape)


def test_logical_rules_drop_unit_and_repeated_axes():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  P = jax.sharding.PartitionSpec
  assert sharding.logical_to_spec(("batch", "time", "embed"), mesh) == P(("data", "fsdp"), None, None)
  assert sharding.logical_to_spec(("embed", "mlp"), mesh) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("heads", "mlp"), mesh) == P("tensor", None)
  with pytest.raises(KeyError, match="no rule"):
    sharding.logical_to_spec(("nonexistent",), mesh)
  # Every logical name the rules mention maps onto existing mesh axes.
  for name, axes in sharding.RULES:
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    assert set(axes) <= set(sharding.MESH_AXES), name
  x = np.arange(16.0).reshape(8, 2)
  arr = jax.device_put(x, sharding.batch_sharding(mesh, 2))
  assert len({d for s in arr.addressable_shards for d in [s.device]}) == 8
  np.testing.assert_array_equal(np.asarray(arr), x)


def test_checkpointed_config_reloads(tmp_path):
  config = harness.load_quickstart()
  ckpt = checkpointing.Checkpointer(str(tmp_path / "c"), async_save=False)
  ckpt.save(1, {"x": np.zeros(2, np.float32)}, None, config)
  again = ckpt.restore_config()
  ckpt.close()
  assert again.train.num_steps == config.train.num_steps
  assert again.model.attention.mode == config.model.attention.mode
  assert tuple(again.model.attention.sigma_range) == tuple(config.model.attention.sigma_range)
  assert again.data.split_sizes.to_dict() == config.data.split_sizes.to_dict()


def test_freeze_makes_a_hashable_copy_of_dict_valued_configs():
  """config_lib.freeze: what a module keeps (jit caches key on it). A dict-valued field (a converted
  checkpoint's architecture) becomes a nested config, lists become tuples, equal configs hash
  equal, and the original stays mutable and unchanged."""
  from avatar_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(dict(width=8, dims=[1, 2], audio=dict(
      arch=ml_collections.config_dict.placeholder(dict))))
  c.audio.arch = {"hidden": 32, "conv": [512, 512]}
  with pytest.raises(AssertionError):   # what FrozenConfigDict alone does with the dict
    ml_collections.FrozenConfigDict(c)
  f = config_lib.freeze(c)
  assert f.audio.arch.hidden == 32 and f.audio.arch.conv == (512, 512) and f.dims == (1, 2)
  assert hash(f) == hash(config_lib.freeze(c)) and f == config_lib.freeze(c)
  assert hash(f) != hash(config_lib.freeze(ml_collections.ConfigDict(dict(c.to_dict(), width=9))))
  with pytest.raises((AttributeError, ValueError)):
    f.width = 9
  c.width = 9   # the source is untouched by freezing and still mutable
  assert f.width == 8 and isinstance(c.audio.arch, dict)
