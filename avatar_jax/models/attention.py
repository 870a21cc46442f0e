"""Multi-head attention over time-stamped tokens with a per-head Gaussian time-distance bias.

Narrow heads (σ of a frame or two) can lock lips to the own audio; wide heads (seconds) can
gather the listening context of the partner's speech. The same module gives the ablation
modes of the Beyond Monologue paper:
  - "gaussian": learned or fixed per-head σ (seconds),
  - "global":   no time bias (σ = ∞),
  - "frame":    strict frame-aligned attention (a hard window of ±`window` seconds).
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avatar_jax.kernels.gaussian_attention import api as gattn
from avatar_jax.models.layers import dense

MODES = ("gaussian", "global", "frame")


def init_sigmas(num_heads: int, lo: float, hi: float) -> np.ndarray:
  """Per-head widths spread geometrically from lo to hi seconds: [H]."""
  if num_heads == 1:
    return np.array([lo], np.float32)
  return np.geomspace(lo, hi, num_heads).astype(np.float32)


class TimeAttention(nnx.Module):
  """x: [B, Nq, D] at times t_q [B, Nq] attends to ctx: [B, Nk, Dc] at times t_k [B, Nk]."""

  def __init__(self, d: int, dctx: int, num_heads: int, *, rngs: nnx.Rngs, mode: str = "gaussian",
               sigma_range: Sequence[float] = (0.04, 2.0), learn_sigma: bool = True,
               window: float = 0.04, implementation: str = "auto"):
    if mode not in MODES:
      raise ValueError(f"attention mode {mode!r}: expected one of {MODES}")
    if d % num_heads:
      raise ValueError(f"model width {d} is not divisible by num_heads={num_heads}")
    self.num_heads, self.head_dim = num_heads, d // num_heads
    self.mode, self.learn_sigma, self.window = mode, learn_sigma, window
    self.implementation = implementation
    self.q = dense(d, d, ("embed", "heads"), rngs=rngs, use_bias=False)
    self.k = dense(dctx, d, ("embed", "heads"), rngs=rngs, use_bias=False)
    self.v = dense(dctx, d, ("embed", "heads"), rngs=rngs, use_bias=False)
    self.o = dense(d, d, ("heads", "embed"), rngs=rngs, zero_init=True)
    # σ lives in log space so it stays positive under any optimiser step.
    log_sigma = jnp.log(init_sigmas(num_heads, *sigma_range))
    self.log_sigma = nnx.Param(log_sigma, sharding=("heads",), eager_sharding=False) if learn_sigma else nnx.Variable(log_sigma)

  def sigma(self) -> jax.Array:
    """Per-head width in seconds: [H]."""
    if self.mode != "gaussian":
      return jnp.full((self.num_heads,), jnp.inf, jnp.float32)
    return jnp.exp(self.log_sigma[...])

  def __call__(self, x, t_q, ctx, t_k, *, kv_segment_ids=None, causal=False):
    b, nq, _ = x.shape
    nk = ctx.shape[1]
    h, hd = self.num_heads, self.head_dim
    q = self.q(x).reshape(b, nq, h, hd)
    k = self.k(ctx).reshape(b, nk, h, hd)
    v = self.v(ctx).reshape(b, nk, h, hd)
    out = gattn.gaussian_attention(
        q, k, v, t_q, t_k, self.sigma(), causal=causal,
        window=self.window if self.mode == "frame" else None,
        kv_segment_ids=kv_segment_ids, implementation=self.implementation)
    return self.o(out.reshape(b, nq, h * hd))
