"""ODE samplers for flow models: integrate dx/dt = v(x, t) from t=0 (noise) to t=1 (data).

Noise levels may be one per example ([B]) or one per token ([B, T]): diffusion forcing and
block streaming denoise later frames less far than earlier ones (`pyramid_levels`). The
sampler takes a `levels(s)` schedule mapping solver progress s ∈ [0, 1] to the levels; every
token moves by its own increment, so with all tokens at one level it is the scalar sampler.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

METHODS = ("euler", "heun", "midpoint")


def _expand(t, x):
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def pyramid_levels(s, num_tokens: int, block: int, lag: float):
  """Per-token levels [T] at progress s: block k (tokens [k·block, (k+1)·block)) starts `lag`
  (in units of one block's denoising time) after block k−1 and all end at 1 when s = 1."""
  k = jnp.arange(num_tokens) // block
  num_blocks = -(-num_tokens // block)
  span = 1.0 + lag * (num_blocks - 1)
  return jnp.clip(s * span - lag * k, 0.0, 1.0).astype(jnp.float32)


def sample_ode(velocity, x0, *, steps: int, method: str = "euler", t0: float = 0.0,
               t1: float = 1.0, levels: Callable[[jax.Array], jax.Array] | None = None):
  """velocity(x, t) -> dx/dt; x0: [B, ...] noise. Returns x at the end of the schedule.

  t is [B] (default: t0 + s·(t1 − t0) for every example) or, with `levels`, whatever
  `levels(s)` returns broadcast to [B, T] (per-token levels; s runs over steps + 1 points
  from 0 to 1). Runs in a `fori_loop`, so the number of steps does not grow the program.
  """
  if method not in METHODS:
    raise ValueError(f"ODE method {method!r}: expected one of {METHODS}")
  if steps < 1:
    raise ValueError(f"ODE steps must be >= 1, got {steps}")
  b = x0.shape[0]
  if levels is None:
    level_at = lambda s: jnp.full((b,), t0 + s * (t1 - t0), jnp.float32)
  else:
    level_at = lambda s: jnp.broadcast_to(levels(s), (b,) + jnp.shape(levels(s))[-1:])

  def step(i, x):
    t = level_at(i / steps)
    t_next = level_at((i + 1) / steps)
    dt = _expand(t_next - t, x)
    v = velocity(x, t)
    if method == "euler":
      return x + dt * v
    if method == "midpoint":
      return x + dt * velocity(x + 0.5 * dt * v, 0.5 * (t + t_next))
    v2 = velocity(x + dt * v, t_next)  # heun
    return x + 0.5 * dt * (v + v2)

  return jax.lax.fori_loop(0, steps, step, x0)
