"""Ahead-of-time compilation: for TPU slices (python -m avatar_jax.compile: topology names, the
collective count, and — where libtpu is installed — the tiny train step with its Pallas TPU
kernels compiled for a v5e slice from this CPU-only machine), and the per-device memory of the
video DiT with its tokens split over the `context` axis."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import trainer_harness as harness
from avatar_jax import compile as compile_lib
from avatar_jax import sharding
from avatar_jax.models import dit

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.parametrize("spec,name,chips,host", [
    ("v5p-128", "v5p:4x4x4", 64, (2, 2, 1)),      # v5p counts 2 TensorCores per chip
    ("v5p-8", "v5p:2x2x1", 4, (2, 2, 1)),          # one host
    ("v4-32", "v4:2x2x4", 16, (2, 2, 1)),
    ("v5e-256", "v5e:16x16", 256, (2, 2, 1)),
    ("v5litepod-32", "v5e:4x8", 32, (2, 2, 1)),
    ("v5e-8", "v5e:2x4", 8, (2, 4, 1)),           # the 8-chip host
    ("v6e-64", "v6e:8x8", 64, (2, 2, 1)),
    ("v6e:4x4", "v6e:4x4", 16, (2, 2, 1)),        # libtpu's own name passes through
])
def test_parse_topology(spec, name, chips, host):
  assert compile_lib.parse_topology(spec) == compile_lib.Topology(name, chips, host)


@pytest.mark.parametrize("spec,match", [("v7x-64", "expected one of"), ("v5e-12", "power-of-two"),
                                        ("v5p-9", "multiple of")])
def test_bad_topology_names(spec, match):
  with pytest.raises(ValueError, match=match):
    compile_lib.parse_topology(spec)


def test_collectives_counted_in_compiled_text():
  """A shard_map psum and an all-gathered reshard, compiled on the 8 CPU devices."""
  mesh = sharding.make_mesh({"data": 8})

  def f(x):
    total = jax.shard_map(lambda a: jax.lax.psum(a, "data"), mesh=mesh, in_specs=P("data"),
                          out_specs=P())(x)
    return total, jax.lax.with_sharding_constraint(x * 2, jax.sharding.NamedSharding(mesh, P()))

  x = jax.device_put(np.ones((8, 4), np.float32), sharding.batch_sharding(mesh, 2))
  counts = compile_lib.collectives(jax.jit(f).lower(x).compile().as_text())
  assert counts["all-reduce"] >= 1 and counts["all-gather"] >= 1, counts
  assert counts["all-to-all"] == 0 and counts["collective-permute"] == 0, counts


def _compile(tmp_path, *overrides):
  out = tmp_path / "report.json"
  flags_ = [f"--config.{k}={v}" for k, v in harness.OVERRIDES.items()]
  cmd = [sys.executable, "-m", "avatar_jax.compile",
         f"--config={harness.QUICKSTART}:{harness.CONFIG_ARG}", *flags_, *overrides,
         "--topology=v5e-8", f"--json={out}"]
  env = dict(os.environ, PYTHONPATH=harness.REPO)
  env.pop("XLA_FLAGS", None)   # the TPU compiler rejects the CPU test flags
  res = subprocess.run(cmd, cwd=harness.REPO, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-4000:]
  assert "TPU v5 lite x 8 (v5e:2x4)" in res.stdout, res.stdout
  return json.loads(out.read_text())


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install \"jax[tpu]==<jax "
                    "version>\"); CI compiles for CPU only")
def test_train_step_compiles_for_a_tpu_slice(tmp_path):
  data = _compile(tmp_path)
  assert data["device_kind"] == "TPU v5 lite" and data["devices"] == 8
  assert data["mesh"] == {"data": 8, "fsdp": 1, "context": 1, "tensor": 1}
  # The Gaussian attention resolved to the Pallas TPU kernel (Mosaic custom calls), which only
  # partitions inside shard_map; data parallelism all-reduces the gradients.
  assert data["tpu_kernels"] > 0
  assert data["collectives"]["all-reduce"] >= 1
  # FSDP over the 8 chips: parameters are all-gathered and per-device arguments shrink.
  fsdp = _compile(tmp_path, "--config.mesh.data=1", "--config.mesh.fsdp=8")
  assert fsdp["collectives"]["all-gather"] >= 1 and fsdp["tpu_kernels"] > 0
  assert fsdp["per_device_gib"]["arguments"] < data["per_device_gib"]["arguments"]


# ------------------------------------------------------------------ long video on `context`
def test_video_dit_split_over_context_same_numbers_less_memory_per_device():
  """Loss and gradients of the tiny video DiT with its 256 tokens split over 8 devices (ring
  self-attention, text-free) equal the unsplit model on one device; the compiled step's
  temporaries per device shrink by more than 4x."""
  cfg = dit.default_config("tiny")
  cfg.dtype, cfg.num_layers = "float32", 1   # one block shows it; each costs compile time
  graphdef, state = nnx.split(dit.DiT(cfg, rngs=nnx.Rngs(0)))
  # Away from the zero-initialised output layer, so every block's gradient is non-zero.
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
  state = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape, p.dtype), state)
  x = np.random.default_rng(0).standard_normal((1, 16, 8, 8, 16)).astype(np.float32)
  ts = np.array([300.0], np.float32)

  def loss(state, x, ts):
    return jnp.mean(nnx.merge(graphdef, state)(x, ts) ** 2)

  step = jax.jit(jax.value_and_grad(loss))
  fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
  results, temps = {}, {}
  for n in (1, 8):
    with jax.set_mesh(sharding.make_mesh({"context": n}, devices=jax.devices()[:n])):
      compiled = step.lower(state, x, ts).compile(fast)
      results[n] = jax.device_get(compiled(state, x, ts))
      if n > 1:   # the ring really runs: K/V blocks pass between devices
        assert compile_lib.collectives(compiled.as_text())["collective-permute"] > 0
    temps[n] = compiled.memory_analysis().temp_size_in_bytes
  (want_loss, want_grads), (got_loss, got_grads) = results[1], results[8]
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  assert float(want_loss) > 0
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)
  assert temps[8] * 4 < temps[1], temps
