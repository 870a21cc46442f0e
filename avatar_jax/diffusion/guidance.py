"""Classifier-free guidance with one scale per condition stream.

Streams are nested (e.g. own audio, then partner audio): with velocities v_0 (no condition),
v_1 (first stream), ..., v_n (all streams),

    v = v_0 + Σ_i w_i (v_i − v_{i−1}),

so each scale amplifies what one stream adds on top of the ones before it. All scales 1 gives
the fully-conditioned velocity v_n; all scales 0 gives the unconditional one.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp


def nested_drop_masks(num_streams: int) -> list[tuple[bool, ...]]:
  """Drop patterns for v_0 .. v_n: entry i keeps the first i streams. [(drop_1, ..., drop_n)]."""
  return [tuple(j >= i for j in range(num_streams)) for i in range(num_streams + 1)]


def combine(velocities: Sequence[jnp.ndarray], scales: Sequence[float]) -> jnp.ndarray:
  """velocities: v_0..v_n as above; scales: n guidance weights."""
  if len(velocities) != len(scales) + 1:
    raise ValueError(f"guidance: {len(velocities)} velocities need {len(velocities) - 1} scales, "
                     f"got {len(scales)}")
  out = velocities[0]
  for i, w in enumerate(scales, start=1):
    out = out + w * (velocities[i] - velocities[i - 1])
  return out
