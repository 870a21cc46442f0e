"""Soft face and lip masks of SynthDyad faces from the renderer's geometry.

Used where a loss or a model needs to know where the face and the mouth are without reading
them from pixels: ECHO's spatially decoupled cross-attention (models/video/echo.py, per latent
token) and the VAE's lip-weighted reconstruction loss (models/vae.py, per pixel). Geometry is
that of the neutral pose (data/synthdyad/render.py), from the identity's face aspect and mouth
width, dilated by `margin` (image units; the image spans [-1, 1]) so that head motion stays
inside, and softened over `soft`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from avatar_jax.data.synthdyad import identity as identity_lib
from avatar_jax.data.synthdyad import render as render_lib


def identity_geometry(seed: int) -> np.ndarray:
  """[N, 2] float32 (face_aspect, mouth_width) of every SynthDyad identity (all splits' pools)
  of the generator seed `seed`, indexed by the batches' identity_self / identity_partner."""
  count = max(s + n for s, n in identity_lib.IDENTITY_POOLS.values())
  ids = [identity_lib.make_identity(i, seed) for i in range(count)]
  return np.array([[i.face_aspect, i.mouth_width] for i in ids], np.float32)


def lookup(table, ident, b: int):
  """[B, 2] geometry of identity indices `ident` [B] (None, or out of range: the mean face)."""
  table = jnp.asarray(table)
  if ident is None:
    return jnp.broadcast_to(table.mean(0), (b, 2))
  ident = jnp.asarray(ident, jnp.int32)
  known = (ident >= 0) & (ident < table.shape[0])
  return jnp.where(known[:, None], table[jnp.clip(ident, 0, table.shape[0] - 1)], table.mean(0))


def lip_box() -> tuple[float, float, float]:
  """The lip region in head units (render.py): (centre v, half-height, half-width per unit of
  mouth_width · face_aspect), covering every jaw opening, lip rounding and smile."""
  r = render_lib
  lips = 0.012 + 0.03 + r.LIP_THICK                        # closed, rounded mouth, half-height
  top = r.MOUTH_Y - 0.5 * r.JAW_OPEN_H - lips - r.SMILE_BEND  # the top rises as the jaw opens
  bottom = r.MOUTH_Y + 0.5 * r.JAW_OPEN_H + lips + r.JAW_OPEN_H
  return 0.5 * (top + bottom), 0.5 * (bottom - top), 1.12 + r.SMILE_WIDEN


def _soft_ellipse(x, y, cx, cy, rx, ry, soft):
  """Coverage in [0, 1] of points (x, y) by an ellipse, over a ramp `soft` wide (image units);
  the distance is render.py's first-order ellipse distance."""
  qx, qy = (x - cx) / rx, (y - cy) / ry
  f = jnp.sqrt(qx * qx + qy * qy)
  g = jnp.sqrt((qx / rx) ** 2 + (qy / ry) ** 2)
  d = (f - 1.0) * f / jnp.maximum(g, 1e-6)
  return jnp.clip(0.5 - d / soft, 0.0, 1.0)


@functools.partial(jax.jit, static_argnames=("grid_hw", "margin", "soft", "supersample"))
def synthdyad_masks(face_aspect, mouth_width, grid_hw, *, margin: float = 0.08,
                    soft: float = 0.04, supersample: int = 4):
  """Soft face and lip masks of neutral-pose SynthDyad faces per cell of a grid.

  face_aspect, mouth_width: [B] (the identities'); grid_hw: (h, w) cells over the image.
  Returns (face, lip) [B, h, w] float32: the mean coverage of `supersample`² points per cell.
  """
  h, w = grid_hw
  r = render_lib
  a = jnp.asarray(face_aspect, jnp.float32)[:, None, None]
  mw = jnp.asarray(mouth_width, jnp.float32)[:, None, None]
  off = (jnp.arange(supersample, dtype=jnp.float32) + 0.5) / supersample
  ys = ((jnp.arange(h, dtype=jnp.float32)[:, None] + off) / h * 2 - 1).reshape(-1)
  xs = ((jnp.arange(w, dtype=jnp.float32)[:, None] + off) / w * 2 - 1).reshape(-1)
  y, x = ys[None, :, None], xs[None, None, :]
  k = r.HEAD_HALF_HEIGHT                                    # head units -> image units
  face = _soft_ellipse(x, y, 0.0, r.HEAD_CENTRE_Y, a * k + margin, k + margin, soft)
  v, half_h, half_w = lip_box()
  lip = _soft_ellipse(x, y, 0.0, r.HEAD_CENTRE_Y + v * k, (half_w * mw * a + 0.02) * k + margin,
                      half_h * k + margin, soft)
  pool = lambda m: m.reshape(-1, h, supersample, w, supersample).mean(axis=(2, 4))
  return pool(face), pool(lip)
