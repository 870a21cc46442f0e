"""Beyond Monologue audio adapters (avatar_jax.models.bm_adapters) on a tiny random Wan DiT:
zero-init leaves the backbone unchanged, time locality of narrow vs. wide σ, shapes for a
1 + 4k frame clip, gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avatar_jax.models import bm_adapters as bm
from avatar_jax.models import dit

K = 5                                   # clip of 1 + 4K = 21 video frames at 25 fps
F = 1 + K                               # latent frames
TA = 42                                 # 0.84 s of audio at 50 Hz
AUDIO_DIM = 8

# Compilation dominates: XLA's CPU optimisations off (as in test_dit.py).
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _dit_cfg(layers=2):
  c = dit.default_config("tiny")
  c.update(num_layers=layers, in_channels=4, out_channels=4, dtype="float32")
  return c


class Model(nnx.Module):
  """The DiT with one cross-attention per stream per block, and the Q-Formers feeding them."""

  def __init__(self, cfg, dit_cfg, adapters=True):
    self.dit = dit.DiT(dit_cfg, rngs=nnx.Rngs(0),
                       make_extra=bm.make_extra(cfg, dit_cfg, rngs=nnx.Rngs(1)) if adapters
                       else None)
    self.qf = bm.QFormers(cfg, dit_cfg, rngs=nnx.Rngs(2)) if adapters else None
    # Wan zero-initialises its head, which would hide everything: a random one, the same in both.
    k = self.dit.proj_out.kernel
    k[...] = jax.random.normal(jax.random.key(4), k.shape, k.dtype) * 0.1

  def __call__(self, x, ts, audio):
    cond = None if self.qf is None else self.qf(audio, num_latent=x.shape[1])
    return self.dit(x, ts, extra=cond)


@_jit
def _fwd(graphdef, state, x, ts, audio):
  return nnx.merge(graphdef, state)(x, ts, audio)


def _run(model, x, ts, audio):
  return np.asarray(_fwd(*nnx.split(model), x, ts, audio))


def _inputs(b=1, seed=0):
  r = np.random.default_rng(seed)
  x = r.normal(size=(b, F, 4, 4, 4)).astype(np.float32)
  audio = {s: r.normal(size=(b, TA, AUDIO_DIM)).astype(np.float32) for s in bm.STREAMS}
  return x, np.full((b,), 500.0, np.float32), audio


_ADAPTER_O = lambda path: "extra" in path and path[-2:] == ("o", "kernel")


def _perturb_outputs(model, seed=3, scale=0.5):
  """Makes the cross-attentions' zero-initialised output projections random."""
  r = np.random.default_rng(seed)
  for path, v in nnx.iter_graph(model):
    if isinstance(v, nnx.Param) and _ADAPTER_O(path):
      v[...] = jnp.asarray(r.normal(size=v.shape) * scale, v.dtype)


def test_zero_init_leaves_backbone_unchanged():
  dc = _dit_cfg()
  cfg = bm.adapter_config(audio_dim=AUDIO_DIM)
  x, ts, audio = _inputs(b=2)
  with_ad, base = Model(cfg, dc), Model(cfg, dc, adapters=False)
  assert len(with_ad.dit.blocks[0].extra) == 2
  ref = _run(base, x, ts, audio)
  assert np.abs(ref).max() > 1e-2
  np.testing.assert_array_equal(_run(with_ad, x, ts, audio), ref)
  _perturb_outputs(with_ad)
  assert np.abs(_run(with_ad, x, ts, audio) - _run(base, x, ts, audio)).max() > 1e-3


def _frame_change(sigma, t=0.5):
  """|Δ output| per latent frame [F] when the self-audio around t seconds changes, one block
  (so the DiT's self-attention cannot spread it: all that follows the adapters is per token)."""
  cfg = bm.adapter_config(audio_dim=AUDIO_DIM, sigma_range=(sigma, sigma), learn_sigma=False)
  m = Model(cfg, _dit_cfg(layers=1))
  _perturb_outputs(m)
  x, ts, audio = _inputs()
  k = int(round(t * cfg.audio_rate))
  moved = dict(audio, self=audio["self"].copy())
  # Random, not a constant offset: the Q-Former's LayerNorm on the features would remove that.
  moved["self"][:, k - 1:k + 2] += np.random.default_rng(9).normal(size=(1, 3, AUDIO_DIM)) * 3
  d = np.abs(_run(m, x, ts, moved) - _run(m, x, ts, audio))
  return d.sum(axis=(0, 2, 3, 4))


def test_narrow_sigma_is_local_wide_is_global():
  centres = bm.latent_times(F, 25.0)
  near = np.argsort(np.abs(centres - 0.5))[:2]          # the two latent frames whose Q-Former
  far = np.setdiff1d(np.arange(F), near)                # windows hold t = 0.5 s
  narrow = _frame_change(0.04)
  assert narrow[near].min() > 1e-3
  assert narrow[far].max() < 1e-2 * narrow.max(), narrow
  wide = _frame_change(2.0)
  assert wide.min() > 0.05 * wide.max(), wide


def test_shapes_one_plus_4k_frames_batch_1():
  dc = _dit_cfg()
  cfg = bm.adapter_config(audio_dim=AUDIO_DIM, progressive=True)
  m = Model(cfg, dc)
  x, ts, audio = _inputs()
  cond = m.qf(audio, num_latent=F)
  d, q = dit.width(dc), cfg.num_queries
  for s in bm.STREAMS:
    assert cond[s]["tokens"].shape == (1, F * q, d)
    assert cond[s]["times"].shape == (1, F * q)
  np.testing.assert_allclose(cond["self"]["times"][0, ::q], [0, .1, .26, .42, .58, .74], atol=1e-6)
  assert _run(m, x, ts, audio).shape == x.shape
  # Progressive: the last block's σ range is (1 + 1/2)× the first's.
  s0, s1 = (np.asarray(b.extra[0].attn.sigma()) for b in m.dit.blocks)
  np.testing.assert_allclose(s1, 1.5 * s0, rtol=1e-5)
  np.testing.assert_allclose(s0[[0, -1]], cfg.sigma_range, rtol=1e-5)


def test_gradients_reach_adapters():
  cfg = bm.adapter_config(audio_dim=AUDIO_DIM)
  m = Model(cfg, _dit_cfg())
  x, ts, audio = _inputs()
  adapters = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("extra"), nnx.PathContains("qf")))

  @_jit
  def grads(graphdef, state):
    def loss(model):
      return jnp.mean(jnp.square(model(x, ts, audio)))
    return nnx.grad(loss, argnums=nnx.DiffState(0, adapters))(nnx.merge(graphdef, state))

  g = nnx.to_flat_state(grads(*nnx.split(m)))
  # At init only the zero-initialised outputs can move (everything behind them sees zero).
  assert all(np.abs(np.asarray(v[...])).max() > 0 for p, v in g if _ADAPTER_O(p))
  _perturb_outputs(m)
  g = nnx.to_flat_state(grads(*nnx.split(m)))
  assert len(g) > 0
  for path, v in g:
    v = np.asarray(v[...])
    assert np.isfinite(v).all(), path
    assert np.abs(v).max() > 0, path
