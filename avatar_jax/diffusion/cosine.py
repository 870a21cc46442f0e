"""Cosine-schedule diffusion with x0 prediction (TIMAR's diffusion head), beside flow matching.

Convention of this module (DDPM's, opposite to flow.py): t ∈ [0, 1], t = 0 is data, t = 1 is
noise; x_t = sqrt(ᾱ(t))·x0 + sqrt(1 − ᾱ(t))·ε with ᾱ(t) = cos²(π/2·(t + s)/(1 + s)) / ᾱ_raw(0)
(Nichol & Dhariwal's cosine schedule, s = 0.008, normalised so ᾱ(0) = 1). Levels may be per
example [B] or per token [B, T]. The model predicts x0; sampling is deterministic DDIM.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

S_OFFSET = 0.008
T_MAX = 0.999  # ᾱ(1) would be 0 exactly; stop just short so ε is recoverable from x_t


def _expand(t, x):
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def alpha_bar(t):
  f = lambda u: jnp.cos(0.5 * math.pi * (u + S_OFFSET) / (1.0 + S_OFFSET)) ** 2
  return f(jnp.asarray(t, jnp.float32)) / f(0.0)


def q_sample(x0, eps, t):
  """Noisy x_t of data x0 [B, ...] with noise eps at levels t [B] or [B, T]."""
  ab = _expand(alpha_bar(t), x0)
  return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps


def sample_t(rng, shape):
  """Training levels, uniform in (0, T_MAX]."""
  return jax.random.uniform(rng, shape, minval=1e-3, maxval=T_MAX)


def loss_x0(x0_pred, x0, mask=None):
  """Mean squared x0 error; mask [B, T] (True = counts)."""
  err = jnp.square(x0_pred.astype(jnp.float32) - x0.astype(jnp.float32))
  err = jnp.mean(err, axis=tuple(range(2, err.ndim))) if err.ndim > 2 else err
  if mask is None:
    return jnp.mean(err)
  mask = mask.astype(jnp.float32)
  return jnp.sum(err * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def ddim_sample(denoise, x_noise, *, steps: int, levels=None):
  """Deterministic DDIM from t = T_MAX to t = 0 with an x0-predicting `denoise(x_t, t) -> x0`.

  levels(s): optional per-token levels for progress s ∈ [0, 1] going from 1 (noise) to 0
  (data), broadcast to [B, T]; default T_MAX·(1 − s) for every example.
  """
  if steps < 1:
    raise ValueError(f"DDIM steps must be >= 1, got {steps}")
  b = x_noise.shape[0]
  if levels is None:
    level_at = lambda s: jnp.full((b,), T_MAX * (1.0 - s), jnp.float32)
  else:
    level_at = lambda s: jnp.broadcast_to(levels(s), (b,) + jnp.shape(levels(s))[-1:])

  def step(i, x):
    t, t_next = level_at(i / steps), level_at((i + 1) / steps)
    ab, ab_next = _expand(alpha_bar(t), x), _expand(alpha_bar(t_next), x)
    x0 = denoise(x, t)
    eps = (x - jnp.sqrt(ab) * x0) / jnp.sqrt(jnp.maximum(1.0 - ab, 1e-12))
    return jnp.sqrt(ab_next) * x0 + jnp.sqrt(1.0 - ab_next) * eps

  return jax.lax.fori_loop(0, steps, step, x_noise)
