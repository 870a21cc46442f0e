"""ODE samplers for flow models: integrate dx/dt = v(x, t) from t=0 (noise) to t=1 (data)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

METHODS = ("euler", "heun", "midpoint")


def sample_ode(velocity, x0, *, steps: int, method: str = "euler", t0: float = 0.0, t1: float = 1.0):
  """velocity(x, t [B]) -> dx/dt; x0: [B, ...] noise. Returns x at t1.

  Runs in a `fori_loop`, so the number of steps does not grow the compiled program.
  """
  if method not in METHODS:
    raise ValueError(f"ODE method {method!r}: expected one of {METHODS}")
  if steps < 1:
    raise ValueError(f"ODE steps must be >= 1, got {steps}")
  b = x0.shape[0]
  dt = (t1 - t0) / steps

  def step(i, x):
    t = jnp.full((b,), t0 + i * dt, jnp.float32)
    v = velocity(x, t)
    if method == "euler":
      return x + dt * v
    if method == "midpoint":
      return x + dt * velocity(x + 0.5 * dt * v, t + 0.5 * dt)
    v2 = velocity(x + dt * v, t + dt)  # heun
    return x + 0.5 * dt * (v + v2)

  return jax.lax.fori_loop(0, steps, step, x0)
