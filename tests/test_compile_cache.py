"""The persistent compilation cache (avatar_jax/compile_cache.py): `config.compile_cache` in every
config, its precedence over JAX_COMPILATION_CACHE_DIR, and a second training run that loads its
programs from the cache the first one filled."""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trainer_harness as harness
from avatar_jax import checkpointing, compile_cache

CONFIGS = sorted(glob.glob(os.path.join(harness.REPO, "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_has_the_key_off_by_default(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3] + "_cc", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert config.compile_cache == ""
  saved = module.get_config()
  config.compile_cache = "/shared/xla_cache"    # settable on the locked config (--config.compile_cache)
  # Where a run compiles, not what it computes: resuming with another cache is not refused.
  assert checkpointing.config_differences(saved, config) == {}
  # Checkpoints written before the key existed resume too.
  with saved.unlocked():
    del saved["compile_cache"]
  assert checkpointing.config_differences(saved, config) == {}


@pytest.fixture
def restore_jax_cache():
  """Leaves JAX's cache settings as they were (other tests in this process compile uncached)."""
  before = {k: jax.config.values[k] for k in ("jax_compilation_cache_dir",
                                               "jax_persistent_cache_min_compile_time_secs")}
  yield
  for k, v in before.items():
    jax.config.update(k, v)
  from jax.experimental.compilation_cache import compilation_cache as cc  # pylint: disable=g-import-not-at-top
  cc.reset_cache()


def test_apply_sets_the_directory_and_programs_land_in_it(tmp_path, restore_jax_cache):
  del restore_jax_cache
  env_dir = compile_cache.current()   # JAX_COMPILATION_CACHE_DIR of this process, if any
  # "" (the default, also of configs saved before the key existed) leaves JAX's setting alone.
  assert compile_cache.apply(harness.load_quickstart()) == env_dir
  assert compile_cache.apply({}) == env_dir and compile_cache.current() == env_dir
  # A directory wins over the environment; it is created, made absolute and opened even after
  # this process compiled without a cache.
  jnp.sin(jnp.ones(3)).block_until_ready()
  target = tmp_path / "sub" / "cache"
  config = harness.load_quickstart()
  config.compile_cache = str(target)
  assert compile_cache.apply(config) == str(target) == compile_cache.current()
  assert target.is_dir()
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  before = compile_cache.counts()["stored"]
  # A program no other test compiles (its constant), so it is not in any in-memory cache.
  f = jax.jit(lambda x: jnp.tanh(x * 0.8125) + 31.0625)
  np.testing.assert_allclose(f(np.ones(4, np.float32)), np.tanh(0.8125) + 31.0625, rtol=1e-6)
  assert os.listdir(target), "the compiled program was not written to the cache"
  assert compile_cache.counts()["stored"] > before
  assert compile_cache.summary().startswith(f"Persistent compilation cache {target}: ")
  # Another directory later in the process (the cache JAX opened is reopened there).
  other = tmp_path / "other"
  config.compile_cache = str(other)
  compile_cache.apply(config)
  g = jax.jit(lambda x: jnp.tanh(x * 0.4375) - 17.5)
  g(np.ones(4, np.float32)).block_until_ready()
  assert os.listdir(other)


_SUMMARY = re.compile(r"Persistent compilation cache (\S+): (\d+) programs loaded "
                      r"\(([\d.]+) s of compilation saved\), (\d+) compiled and stored\.")


def _train(workdir, cache_dir, env_cache_dir, config_cache):
  """A 2-step tiny training in a fresh process; returns (cache path, loaded, stored) from its
  end-of-training summary."""
  env = harness.subprocess_env(env_cache_dir)   # min compile time 0: every program is stored
  cmd = harness.train_command(str(workdir), f"--config.compile_cache={config_cache}",
                              "--config.train.num_steps=2")
  out = subprocess.run(cmd, cwd=harness.REPO, env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-4000:]
  found = _SUMMARY.findall(out.stderr)
  assert len(found) == 1, out.stderr[-4000:]
  path, loaded, _, stored = found[0]
  assert os.path.samefile(path, cache_dir), (path, cache_dir)
  return int(loaded), int(stored)


def test_second_training_loads_its_programs_from_the_cache(tmp_path):
  cache, env_cache = tmp_path / "cache", tmp_path / "env_cache"
  env_cache.mkdir()
  # First run: --config.compile_cache beats JAX_COMPILATION_CACHE_DIR; every program compiles.
  loaded, first = _train(tmp_path / "run1", cache, env_cache, str(cache))
  assert loaded == 0 and first > 0
  entries = sorted(os.listdir(cache))
  assert entries and not os.listdir(env_cache)
  # Second run, another workdir, in a fresh process: compile_cache="" leaves JAX's own
  # environment variable in charge, here pointing at the first run's cache. Every program the
  # first run stored is loaded, none compiled again.
  loaded, stored = _train(tmp_path / "run2", cache, str(cache), "")
  assert (loaded, stored) == (first, 0)
  assert sorted(os.listdir(cache)) == entries
