"""The attention layer the systems build on: KV-cached decoding, block-causal look-ahead, RoPE,
grouped heads, compute dtype, and the `context` mesh axis splitting time (8 fake CPU devices)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from avatar_jax import sharding
from avatar_jax.models import attention
from avatar_jax.models.motion import motion_dit

F32 = jnp.float32


def _layer(**kw):
  return attention.TimeAttention(32, 32, 4, rngs=nnx.Rngs(0), implementation="xla", **kw)


def _nonzero_out(layer):
  # The output projection starts at zero (adaLN-Zero style); give it weights to compare.
  layer.o.kernel[...] = jax.random.normal(jax.random.key(1), layer.o.kernel.shape) * 0.2
  return layer


def test_kv_cache_token_by_token_equals_full_causal():
  layer = _nonzero_out(_layer(causal=True, rope="1d", num_kv_heads=2))
  b, n = 2, 11
  x = jax.random.normal(jax.random.key(2), (b, n, 32))
  t = jnp.broadcast_to(jnp.arange(n, dtype=F32) / 25.0, (b, n))
  full = layer(x, t, x, t)
  cache = attention.KVCache.init(b, 16, 2, 8)
  step = nnx.jit(lambda layer, xi, ti, cache: layer(xi, ti, xi, ti, cache=cache))
  outs = []
  for i in range(n):
    out, cache = step(layer, x[:, i:i + 1], t[:, i:i + 1], cache)
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)
  assert int(cache.end) == n


def test_kv_cache_block_causal_lookahead_equals_full():
  """Blocks of 4 frames seeing one block ahead: a block's outputs are final once the next
  block's keys are in the cache, so streaming feeds keys one block ahead of the queries."""
  blk, look = 4, 1
  layer = _nonzero_out(_layer(causal_block=blk / 25.0, lookahead_blocks=look))
  b, n = 1, 16
  x = jax.random.normal(jax.random.key(3), (b, n, 32))
  t = jnp.broadcast_to((jnp.arange(n, dtype=F32) + 0.5) / 25.0, (b, n))
  full = layer(x, t, x, t)
  cache = attention.KVCache.init(b, n, 4, 8)
  outs = []
  for j in range(n // blk):
    q = slice(j * blk, (j + 1) * blk)
    # New keys: this block's and the next one's on the first call, then one block ahead.
    k = slice(0, 2 * blk) if j == 0 else slice((j + 1) * blk, min((j + 2) * blk, n))
    if k.start >= n:
      k = slice(n, n)
    out, cache = layer(x[:, q], t[:, q], x[:, k], t[:, k], cache=cache)
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_ring_kv_cache_is_a_sliding_window_in_constant_memory():
  """A ring cache of 8 slots fed blocks of 4 tokens for 40 tokens equals full attention under a
  sliding window of one block back (block-causal + |Δt| <= window): the slots overwritten are
  exactly those the window no longer sees."""
  blk = 4
  layer = _nonzero_out(_layer(causal_block=blk / 25.0, history=blk / 25.0 + 1e-4, rope="1d"))
  b, n = 2, 40
  x = jax.random.normal(jax.random.key(5), (b, n, 32))
  t = jnp.broadcast_to(jnp.arange(n, dtype=F32) / 25.0, (b, n))
  full = layer(x, t, x, t)
  cache = attention.KVCache.init(b, 2 * blk, 4, 8, ring=True)
  step = nnx.jit(lambda layer, xi, ti, cache: layer(xi, ti, xi, ti, cache=cache))
  outs = []
  for j in range(n // blk):
    q = slice(j * blk, (j + 1) * blk)
    out, cache = step(layer, x[:, q], t[:, q], cache)
    outs.append(out)
  # The window reaches 4 frames back: a block's queries see at most the block before theirs,
  # which the 8 slots still hold when the block is written.
  np.testing.assert_allclose(np.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)
  assert int(cache.end) == n and cache.k.shape[1] == 2 * blk
  with pytest.raises(ValueError, match="writes that divide it"):
    cache.append(x[:, :3, None, :8].repeat(4, 2), x[:, :3, None, :8].repeat(4, 2), t[:, :3],
                 jnp.zeros((b, 3), jnp.int32))


@pytest.mark.parametrize("kind", ["1d", "3d"])
def test_rope_scores_depend_on_position_differences_only(kind):
  rng = np.random.default_rng(0)
  d = 24
  q, k = (jnp.asarray(rng.standard_normal((1, 5, 2, d)), F32) for _ in range(2))
  shape = (1, 5) if kind == "1d" else (1, 5, 3)
  pq, pk = (jnp.asarray(rng.integers(0, 20, shape), F32) for _ in range(2))
  shift = 7.0 if kind == "1d" else jnp.asarray([3.0, -2.0, 5.0])
  score = lambda pq, pk: jnp.einsum("bqhd,bkhd->bhqk", attention.apply_rope(q, pq, kind),
                                    attention.apply_rope(k, pk, kind))
  np.testing.assert_allclose(score(pq, pk), score(pq + shift, pk + shift), atol=1e-4)
  assert not np.allclose(score(pq, pk), score(pq + shift, pk))  # positions matter
  if kind == "3d":
    assert attention.rope_split(128, "3d") == (44, 42, 42)  # Wan 2.1's split of a 128 head


def _dit_config(dtype="float32"):
  cfg = motion_dit.default_config()
  cfg.width, cfg.depth, cfg.heads, cfg.dtype = 32, 1, 4, dtype
  cfg.attention.implementation = "xla"
  return cfg


def _dit(dtype="float32"):
  facts = dict(fps=25, mel_rate=50.0, n_mels=8, sample_rate=16000)
  return motion_dit.MotionDiT(_dit_config(dtype), facts=facts, rngs=nnx.Rngs(0))


def _dit_loss(model, batch):
  audio = model.encode_audio(batch, jnp.zeros((8,), bool), jnp.zeros((8,), bool))
  v = model(batch["x"], batch["t"], audio)
  return jnp.mean(jnp.square(v - batch["x"]))


def _batch():
  rng = np.random.default_rng(1)
  return {"x": jnp.asarray(rng.standard_normal((8, 16, 10)), F32),
          "t": jnp.asarray(rng.uniform(size=8), F32),
          "mel_self": jnp.asarray(rng.standard_normal((8, 32, 8)), F32),
          "mel_partner": jnp.asarray(rng.standard_normal((8, 32, 8)), F32)}


def test_bf16_compute_keeps_float32_params_and_output():
  model = _dit("bfloat16")
  assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(F32)}
  b = _batch()
  audio = model.encode_audio(b, jnp.zeros((8,), bool), jnp.zeros((8,), bool))
  assert audio[0].dtype == jnp.bfloat16
  v = model(b["x"], b["t"], audio)
  assert v.dtype == F32
  ref = _dit("float32")
  v32 = ref(b["x"], b["t"], ref.encode_audio(b, jnp.zeros((8,), bool), jnp.zeros((8,), bool)))
  np.testing.assert_allclose(v, v32, atol=5e-2)  # same weights, bf16 rounding only


def test_context_axis_splits_time_and_matches_data_parallel():
  """MotionDiT loss and gradients under data=4 x context=2 equal data=8; the attention input
  and the audio activations are laid out split along time over `context`."""
  batch = _batch()

  def run(shape):
    mesh = sharding.make_mesh(shape)
    model = _dit()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(params, batch):
      m = nnx.merge(graphdef, params, rest)
      return _dit_loss(m, batch)

    def enc(params, batch):
      m = nnx.merge(graphdef, params, rest)
      return m.enc_self(batch["mel_self"])

    with jax.set_mesh(mesh):
      batch_s = jax.device_put(batch, sharding.batch_sharding(mesh, 1))
      loss, grads = jax.jit(jax.value_and_grad(f))(params, batch_s)
      h = jax.jit(enc)(params, batch_s)
    return loss, grads, h

  l8, g8, _ = run({"data": 8})
  l42, g42, h42 = run({"data": 4, "context": 2})
  np.testing.assert_allclose(l42, l8, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g42), jax.tree.leaves(g8)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  spec = h42.sharding.spec
  assert spec[0] == "data" and spec[1] == "context", spec
