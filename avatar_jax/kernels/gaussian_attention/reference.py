"""Plain-JAX reference for Gaussian time-distance attention (materialises [B,H,Nq,Nk])."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def visibility(t_q, t_k, *, causal=False, causal_block=None, lookahead_blocks=0,
               window=None, q_segment_ids=None, kv_segment_ids=None):
  """Boolean [B, Nq, Nk] mask of visible (query, key) pairs, or None if all visible."""
  dt = t_q[:, :, None] - t_k[:, None, :]
  vis = None

  def _and(a, b):
    return b if a is None else a & b

  if causal_block is not None:
    bq = jnp.floor(t_q / causal_block + 1e-6)
    bk = jnp.floor(t_k / causal_block + 1e-6)
    vis = _and(vis, bk[:, None, :] <= bq[:, :, None] + lookahead_blocks)
  elif causal:
    vis = _and(vis, dt >= 0)
  if window is not None:
    vis = _and(vis, jnp.abs(dt) <= window)
  if kv_segment_ids is not None:
    kv_ok = kv_segment_ids >= 0
    if q_segment_ids is not None:
      same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    else:
      same = jnp.ones(dt.shape, bool)
    vis = _and(vis, same & kv_ok[:, None, :])
  return vis


def gaussian_attention(q, k, v, t_q, t_k, sigma, *, scale=None, causal=False,
                       causal_block=None, lookahead_blocks=0, window=None,
                       q_segment_ids=None, kv_segment_ids=None):
  b, nq, h, d = q.shape
  hkv = k.shape[2]
  if h % hkv:
    raise ValueError(f"q has {h} heads, k/v have {hkv}: expected H % Hkv == 0")
  scale = d ** -0.5 if scale is None else scale
  rep = h // hkv
  k = jnp.repeat(k, rep, axis=2)
  v = jnp.repeat(v, rep, axis=2)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
  dt = (t_q[:, :, None] - t_k[:, None, :]).astype(jnp.float32)
  inv = 1.0 / (2.0 * jnp.square(sigma.astype(jnp.float32)))  # inf sigma -> 0
  logits = logits - dt[:, None] ** 2 * inv[None, :, None, None]
  vis = visibility(t_q, t_k, causal=causal, causal_block=causal_block,
                   lookahead_blocks=lookahead_blocks, window=window,
                   q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
  if vis is not None:
    logits = jnp.where(vis[:, None], logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(logits - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(l == 0, 1.0, l)
  out = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32))
  return out.astype(q.dtype)
