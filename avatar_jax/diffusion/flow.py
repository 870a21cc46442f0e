"""Rectified flow matching (x_t = t·x1 + (1−t)·x0, x0 ~ N(0, I), velocity target x1 − x0).

t = 0 is pure noise, t = 1 is data. Noise levels may be per example [B] or per frame [B, T]
(diffusion forcing), so the same code serves offline and block-streaming models.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

T_SAMPLERS = ("uniform", "logit_normal")


def sample_t(rng, shape, kind: str = "logit_normal", mean: float = 0.0, std: float = 1.0):
  """Training noise levels in (0, 1): [*shape]."""
  if kind == "uniform":
    return jax.random.uniform(rng, shape)
  if kind == "logit_normal":
    return jax.nn.sigmoid(mean + std * jax.random.normal(rng, shape))
  raise ValueError(f"flow time sampler {kind!r}: expected one of {T_SAMPLERS}")


def _expand(t, x):
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(x1, x0, t):
  """Point on the straight path: x1, x0 [B, ...]; t [B] or [B, T] -> x_t like x1."""
  t = _expand(t, x1)
  return t * x1 + (1.0 - t) * x0


def target_velocity(x1, x0):
  return x1 - x0


def loss(v_pred, v_target, mask=None):
  """Mean squared velocity error; mask [B, T] (True = counts) over the frame axis."""
  err = jnp.square(v_pred.astype(jnp.float32) - v_target.astype(jnp.float32))
  err = jnp.mean(err, axis=tuple(range(2, err.ndim))) if err.ndim > 2 else err
  if mask is None:
    return jnp.mean(err)
  mask = mask.astype(jnp.float32)
  return jnp.sum(err * mask) / jnp.maximum(jnp.sum(mask), 1.0)
