"""Plain-JAX references for Gaussian time-distance attention.

* :func:`gaussian_attention` / :func:`gaussian_attention_segments`: exact, materialise the
  [B, H, Nq, Nk] logits; differentiated by autodiff. The small-shape reference.
* :func:`forward` / :func:`backward`: the chunked reference, following the backend contract of
  ``common.py`` (online softmax over KV chunks with ``lax.scan``, flash-style backward), with
  O(B·H·chunk_q·chunk_k) working memory, so long sequences fit on CPU.

Math is float32 (float64 when the inputs are float64, for finite-difference checks).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from avatar_jax.kernels.gaussian_attention import common


def _compute_dtype(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def _inv(sigma, dtype):
  """1/(2σ²) with the common clamp, in `dtype` (float64 kept for gradient checks)."""
  sigma = jnp.asarray(sigma).astype(dtype)
  # The where keeps autodiff finite at σ = inf (d(1/σ²)/dσ · 0 would otherwise be 0·inf).
  finite = jnp.isfinite(sigma)
  inv = 0.5 / jnp.square(jnp.where(finite, sigma, 1.0))
  return jnp.where(finite, jnp.minimum(inv, common.INV_TWO_SIGMA_SQ_MAX), 0.0)


def visibility(t_q, t_k, *, causal=False, causal_block=None, lookahead_blocks=0,
               window=None, q_segment_ids=None, kv_segment_ids=None):
  """Boolean [B, Nq, Nk] mask of visible (query, key) pairs (public segment-id convention)."""
  b, nq = t_q.shape
  nk = t_k.shape[1]
  spec = common.MaskSpec(causal=causal, causal_block=causal_block,
                         lookahead_blocks=lookahead_blocks, window=window)
  q_seg, kv_seg = common.normalise_segment_ids(q_segment_ids, kv_segment_ids, b, nq, nk)
  return common.visible(spec, t_q[:, :, None], t_k[:, None, :], q_seg[:, :, None],
                        kv_seg[:, None, :])


def gaussian_attention_segments(q, k, v, t_q, t_k, sigma, *, scale, spec, q_segment_ids,
                                kv_segment_ids, return_lse=False):
  """Materialising reference with a MaskSpec and normalised segment ids. Returns q.dtype.

  `spec.bias_cutoff` is ignored (the reference is exact). With `return_lse` also returns
  lse [B, H, Nq] float32 (natural log, −inf for a row with no visible key).
  """
  b, nq, h, d = q.shape
  hkv = k.shape[2]
  rep = h // hkv
  cd = _compute_dtype(q.dtype)
  k = jnp.repeat(k, rep, axis=2)
  v = jnp.repeat(v, rep, axis=2)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(cd), k.astype(cd)) * scale
  dt = t_q[:, :, None].astype(cd) - t_k[:, None, :].astype(cd)
  logits = logits - (dt * dt)[:, None] * _inv(sigma, cd)[None, :, None, None]
  vis = common.visible(spec, t_q[:, :, None], t_k[:, None, :], q_segment_ids[:, :, None],
                       kv_segment_ids[:, None, :])
  logits = jnp.where(vis[:, None], logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  p = jnp.exp(logits - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  l_safe = jnp.where(l == 0, 1.0, l)
  p = p / l_safe
  out = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(cd)).astype(q.dtype)
  if not return_lse:
    return out
  lse = jnp.where(l[..., 0] > 0, (m + jnp.log(l_safe))[..., 0], -jnp.inf)
  return out, lse.astype(jnp.float32)


def gaussian_attention(q, k, v, t_q, t_k, sigma, *, scale=None, causal=False,
                       causal_block=None, lookahead_blocks=0, window=None,
                       q_segment_ids=None, kv_segment_ids=None):
  """Exact materialising reference with the public signature (no validation, no cutoff)."""
  b, nq, _, d = q.shape
  nk = k.shape[1]
  scale = d ** -0.5 if scale is None else scale
  spec = common.MaskSpec(causal=causal, causal_block=causal_block,
                         lookahead_blocks=lookahead_blocks, window=window)
  q_seg, kv_seg = common.normalise_segment_ids(q_segment_ids, kv_segment_ids, b, nq, nk)
  return gaussian_attention_segments(q, k, v, t_q, t_k, sigma, scale=scale, spec=spec,
                                     q_segment_ids=q_seg, kv_segment_ids=kv_seg)


# ----------------------------------------------------------------------------------------
# Chunked reference (backend contract).
# ----------------------------------------------------------------------------------------


def _prepare(q, k, v, t_q, t_k, q_seg, kv_seg, chunk_q, chunk_k):
  """Pads and regroups: q → [nqc, B, Hkv, rep, cq, D], k/v → [nkc, B, Hkv, ck, D], ...."""
  b, nq, h, d = q.shape
  nk, hkv = k.shape[1], k.shape[2]
  rep = h // hkv
  cq = min(chunk_q, nq)
  ck = min(chunk_k, nk)
  nq_p, nk_p = common.round_up(nq, cq), common.round_up(nk, ck)
  cd = _compute_dtype(q.dtype)
  t_q = common.pad_axis(t_q.astype(cd), nq_p, 1)
  t_k = common.pad_axis(t_k.astype(cd), nk_p, 1)
  q_seg = common.pad_axis(q_seg, nq_p, 1)
  kv_seg = common.pad_axis(kv_seg, nk_p, 1, mode="constant", value=-1)
  qg = common.pad_axis(q, nq_p, 1, mode="constant").reshape(b, nq_p // cq, cq, hkv, rep, d)
  qg = qg.transpose(1, 0, 3, 4, 2, 5)  # [nqc, B, Hkv, rep, cq, D]
  kg = common.pad_axis(k, nk_p, 1, mode="constant").reshape(b, nk_p // ck, ck, hkv, d)
  vg = common.pad_axis(v, nk_p, 1, mode="constant").reshape(b, nk_p // ck, ck, hkv, d)
  kg = kg.transpose(1, 0, 3, 2, 4)  # [nkc, B, Hkv, ck, D]
  vg = vg.transpose(1, 0, 3, 2, 4)
  tq = t_q.reshape(b, nq_p // cq, cq).transpose(1, 0, 2)  # [nqc, B, cq]
  tk = t_k.reshape(b, nk_p // ck, ck).transpose(1, 0, 2)
  qs = q_seg.reshape(b, nq_p // cq, cq).transpose(1, 0, 2)
  ks = kv_seg.reshape(b, nk_p // ck, ck).transpose(1, 0, 2)
  return qg, kg, vg, tq, tk, qs, ks, cd


def _chunk_logits(spec, scale, inv, qc, kc, tq, tk, qs, ks, cd):
  """Logits [B, Hkv, rep, cq, ck] (−inf where invisible), the Gaussian term pen, and vis."""
  s = jnp.einsum("bgrqd,bgkd->bgrqk", qc.astype(cd), kc.astype(cd)) * scale
  dt = tq[:, :, None] - tk[:, None, :]  # [B, cq, ck]
  pen = (dt * dt)[:, None, None] * inv[None, :, :, None, None]
  vis = common.visible(spec, tq[:, :, None], tk[:, None, :], qs[:, :, None], ks[:, None, :])
  vis = vis[:, None, None]
  return jnp.where(vis, s - pen, -jnp.inf), pen, vis


def forward(q, k, v, t_q, t_k, sigma, *, scale, spec, q_segment_ids, kv_segment_ids,
            interpret=False, exact_lse=True, chunk_q=512, chunk_k=512):
  """Online-softmax forward over KV chunks. Returns out [B,Nq,H,D] q.dtype, lse [B,H,Nq] f32.

  Exact (ignores `spec.bias_cutoff`). `interpret` and `exact_lse` are accepted for the common
  contract.
  """
  del interpret, exact_lse
  q_segment_ids, kv_segment_ids = common.normalise_segment_ids(
      q_segment_ids, kv_segment_ids, q.shape[0], q.shape[1], k.shape[1])
  b, nq, h, d = q.shape
  hkv = k.shape[2]
  rep = h // hkv
  qg, kg, vg, tq, tk, qs, ks, cd = _prepare(q, k, v, t_q, t_k, q_segment_ids, kv_segment_ids,
                                            chunk_q, chunk_k)
  inv = _inv(sigma, cd).reshape(hkv, rep)
  cq = qg.shape[-2]

  def q_chunk(args):
    qc, tqc, qsc = args

    def kv_step(carry, kv):
      m, l, acc = carry
      kc, vc, tkc, ksc = kv
      s, _, _ = _chunk_logits(spec, scale, inv, qc, kc, tqc, tkc, qsc, ksc, cd)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p = jnp.exp(s - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      l = alpha * l + jnp.sum(p, axis=-1)
      acc = alpha[..., None] * acc + jnp.einsum("bgrqk,bgkd->bgrqd", p, vc.astype(cd))
      return (m_new, l, acc), None

    init = (jnp.full((b, hkv, rep, cq), -jnp.inf, cd), jnp.zeros((b, hkv, rep, cq), cd),
            jnp.zeros((b, hkv, rep, cq, d), cd))
    (m, l, acc), _ = jax.lax.scan(kv_step, init, (kg, vg, tk, ks))
    nonempty = l > 0
    out = acc / jnp.where(nonempty, l, 1.0)[..., None]
    lse = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), -jnp.inf)
    return out, lse

  out, lse = jax.lax.map(q_chunk, (qg, tq, qs))  # [nqc, B, Hkv, rep, cq, (D)]
  out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, -1, h, d)[:, :nq]
  lse = lse.transpose(1, 2, 3, 0, 4).reshape(b, h, -1)[:, :, :nq]
  return out.astype(q.dtype), lse.astype(jnp.float32)


def backward(q, k, v, t_q, t_k, sigma, out, lse, dout, *, scale, spec, q_segment_ids,
             kv_segment_ids, interpret=False, dlse=None, chunk_q=512, chunk_k=512):
  """Chunked flash-style backward → (dq, dk, dv, dsigma [H] float32).

  Outer scan over KV chunks (dk/dv of that chunk accumulated over an inner scan over query
  chunks); dq and Σ dS·pen are carried. The order of every sum is fixed (deterministic).
  """
  del interpret
  q_segment_ids, kv_segment_ids = common.normalise_segment_ids(
      q_segment_ids, kv_segment_ids, q.shape[0], q.shape[1], k.shape[1])
  b, nq, h, d = q.shape
  nk, hkv = k.shape[1], k.shape[2]
  rep = h // hkv
  qg, kg, vg, tq, tk, qs, ks, cd = _prepare(q, k, v, t_q, t_k, q_segment_ids, kv_segment_ids,
                                            chunk_q, chunk_k)
  nqc, cq = qg.shape[0], qg.shape[-2]
  nq_p = nqc * cq
  inv = _inv(sigma, cd).reshape(hkv, rep)

  def group_q(x):  # [B, Nq, H, D] → [nqc, B, Hkv, rep, cq, D]
    x = common.pad_axis(x.astype(cd), nq_p, 1, mode="constant")
    return x.reshape(b, nqc, cq, hkv, rep, d).transpose(1, 0, 3, 4, 2, 5)

  dog = group_q(dout)
  delta = jnp.sum(dout.astype(cd) * out.astype(cd), axis=-1)  # [B, Nq, H]
  delta = common.pad_axis(delta, nq_p, 1, mode="constant")
  delta = delta.reshape(b, nqc, cq, hkv, rep).transpose(1, 0, 3, 4, 2)

  def group_rows(x, pad):  # [B, H, Nq] → [nqc, B, Hkv, rep, cq]
    x = common.pad_axis(x.astype(cd), nq_p, 2, mode="constant", value=pad)
    return x.reshape(b, hkv, rep, nqc, cq).transpose(3, 0, 1, 2, 4)

  # Padded query rows get lse = +inf so that their p = exp(s − lse) is 0, not exp(+inf).
  lse_g = group_rows(lse, jnp.inf)
  dlse_g = None
  if dlse is not None:  # ∂lse/∂s = P: dS = P·(dP − delta + dlse)
    dlse_g = group_rows(dlse, 0.0)
    delta = delta - dlse_g

  def kv_step(carry, kv):
    dq, abc = carry
    kc, vc, tkc, ksc = kv

    def q_step(acc, qa):
      dk, dv = acc
      qc, doc, dlt, lsec, tqc, qsc = qa
      s, pen, vis = _chunk_logits(spec, scale, inv, qc, kc, tqc, tkc, qsc, ksc, cd)
      p = jnp.where(vis, jnp.exp(s - lsec[..., None]), 0.0)
      dp = jnp.einsum("bgrqd,bgkd->bgrqk", doc, vc.astype(cd))
      ds = p * (dp - dlt[..., None])
      dv = dv + jnp.einsum("bgrqk,bgrqd->bgkd", p, doc)
      dk = dk + scale * jnp.einsum("bgrqk,bgrqd->bgkd", ds, qc.astype(cd))
      dq_c = scale * jnp.einsum("bgrqk,bgkd->bgrqd", ds, kc.astype(cd))
      # σ-gradient accumulators A, B, C of the backend contract (common.py).
      shifted = pen + common.dsigma_shift(lsec)[..., None]
      pdp = p * dp
      abc = (jnp.sum(pdp * shifted, -1), jnp.sum(p * shifted, -1), jnp.sum(pdp, -1))
      return (dk, dv), (dq_c, abc)

    ck = kc.shape[2]
    init = (jnp.zeros((b, hkv, ck, d), cd), jnp.zeros((b, hkv, ck, d), cd))
    (dk, dv), (dq_parts, abc_parts) = jax.lax.scan(q_step, init,
                                                   (qg, dog, delta, lse_g, tq, qs))
    abc = tuple(x + y for x, y in zip(abc, abc_parts))
    return (dq + dq_parts, abc), (dk, dv)

  rows = jnp.zeros(qg.shape[:-1], cd)  # [nqc, B, Hkv, rep, cq]
  init = (jnp.zeros(qg.shape, cd), (rows, rows, rows))
  (dq, abc), (dk, dv) = jax.lax.scan(kv_step, init, (kg, vg, tk, ks))
  shift = common.dsigma_shift(lse_g) if dlse is not None else None
  dsig = jnp.sum(common.dsigma_row_partial(*abc, dlse_g, shift), axis=(0, 1, 4))  # [Hkv, rep]
  dq = dq.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq_p, h, d)[:, :nq]
  dk = dk.transpose(1, 0, 3, 2, 4).reshape(b, -1, hkv, d)[:, :nk]
  dv = dv.transpose(1, 0, 3, 2, 4).reshape(b, -1, hkv, d)[:, :nk]
  dsigma = common.dsigma_from_partial(dsig.reshape(h).astype(jnp.float32), sigma)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dsigma


def gaussian_attention_dense_bias(q, k, v, t_q, t_k, sigma, *, scale, spec, q_segment_ids,
                                  kv_segment_ids, dpa_implementation="cudnn"):
  """The Gaussian term (and the mask, as a large negative) materialised as a [B, H, Nq, Nk] bias
  in q.dtype and handed to `jax.nn.dot_product_attention` (cuDNN's fused attention with a bias
  input on GPU: what a user without our kernel would run). Autodiff reaches σ through the bias.
  A query with no visible key gets the uniform average instead of zeros (the bias is finite)."""
  b, nq, h, _ = q.shape
  dt = t_q[:, :, None].astype(jnp.float32) - t_k[:, None, :].astype(jnp.float32)
  bias = -(dt * dt)[:, None] * _inv(sigma, jnp.float32)[None, :, None, None]
  vis = common.visible(spec, t_q[:, :, None], t_k[:, None, :], q_segment_ids[:, :, None],
                       kv_segment_ids[:, None, :])
  neg = jnp.asarray(jnp.finfo(q.dtype).min / 2, jnp.float32)
  bias = jnp.maximum(jnp.where(vis[:, None], bias, neg), neg).astype(q.dtype)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale,
                                      implementation=dpa_implementation)
