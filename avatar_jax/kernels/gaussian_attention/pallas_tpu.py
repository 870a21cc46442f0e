"""Pallas TPU kernels for Gaussian time-distance attention (backend contract in common.py).

Three kernels, flash-attention style, all with float32 accumulation:
  * forward, grid (B, H, q-blocks, k-blocks): online softmax over k-blocks, writes out and lse.
  * dq, grid (B, H, q-blocks, k-blocks): dq and the per-(batch, head, q-block) partial sums
    Σ dS·pen of the σ-gradient, each written to its own slot and reduced outside the kernel
    in a fixed order (deterministic, no atomics).
  * dk/dv, grid (B, Hkv, k-blocks, rep, q-blocks): the rep query heads of a KV group and all
    q-blocks accumulate into one dk/dv block in VMEM scratch (GQA without repeating K/V).

Masks are never materialised in HBM: visibility is recomputed per block from the times and
segment ids of the block (``common.visible``), as in splash attention. Whole blocks are skipped
with ``pl.when`` on ``common.block_code``, evaluated in-kernel from per-block time / segment-id
statistics held in SMEM (scalar prefetch) and the head's 1/(2σ²). To also save the DMA of
skipped K/V (or Q) blocks, the block index maps clamp the streamed index into the range
[first, last] of needed blocks (precomputed per (batch, head, block) and prefetched), so that
outside that range the pipeline re-uses the block already in VMEM.

Layout: inputs are transposed to [B, H, N, D]; times and segment ids travel as a column
[B, Nq, 1] (queries) or a row [B, 1, Nk] (keys) so that a block broadcasts to [bq, bk].
float16 inputs are computed as float32 (Mosaic matmuls take bf16/f32). Sequences are padded to
block multiples (padded keys get segment id −1). On real TPUs block_k must be a multiple of 128
and block_q of 8; interpret mode accepts any multiple of 8.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from avatar_jax.kernels.gaussian_attention import common

_DEFAULT_BLOCK = 128
_DIMS_NT = (((1,), (1,)), ((), ()))  # a [m, d] · b [n, d]ᵀ
_DIMS_NN = (((1,), (0,)), ((), ()))  # a [m, n] · b [n, d]
_DIMS_TN = (((0,), (0,)), ((), ()))  # a [m, n]ᵀ · b [m, d]


def _interpret_arg(interpret):
  if interpret is True:
    return pltpu.InterpretParams() if hasattr(pltpu, "InterpretParams") else True
  return interpret or False


def _block_sizes(nq, nk, block_q, block_k, interpret):
  bq = block_q or min(_DEFAULT_BLOCK, common.round_up(nq, 8))
  bk = block_k or min(_DEFAULT_BLOCK, common.round_up(nk, 128 if not interpret else 8))
  if bq % 8 or bk % 8:
    raise ValueError(f"pallas_tpu block sizes must be multiples of 8, got block_q={bq}, "
                     f"block_k={bk}")
  if not interpret and bk % 128:
    raise ValueError(f"pallas_tpu on TPU needs block_k % 128 == 0 (lane width), got {bk}")
  return bq, bk


class _Prep:
  """Padded, transposed operands and the SMEM tables shared by the three kernels."""

  def __init__(self, q, k, v, t_q, t_k, sigma, q_seg, kv_seg, spec, block_q, block_k,
               interpret):
    b, nq, h, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    q_seg, kv_seg = common.normalise_segment_ids(q_seg, kv_seg, b, nq, nk)
    self.b, self.nq, self.nk, self.h, self.hkv, self.d = b, nq, nk, h, hkv, d
    self.rep = h // hkv
    self.bq, self.bk = _block_sizes(nq, nk, block_q, block_k, interpret)
    self.nq_p = common.round_up(nq, self.bq)
    self.nk_p = common.round_up(nk, self.bk)
    self.nqb, self.nkb = self.nq_p // self.bq, self.nk_p // self.bk
    self.cdt = jnp.float32 if q.dtype in (jnp.float16, jnp.float32, jnp.float64) else q.dtype
    # float32 matmuls at full precision on the MXU; bf16 is native.
    self.precision = (jax.lax.Precision.HIGHEST if self.cdt == jnp.float32
                      else jax.lax.Precision.DEFAULT)
    t_q, t_k, q_seg, kv_seg = common.pad_inputs(t_q, t_k, q_seg, kv_seg, self.nq_p, self.nk_p)
    self.tq = t_q[:, :, None]
    self.tk = t_k[:, None, :]
    self.qs = q_seg[:, :, None]
    self.ks = kv_seg[:, None, :]
    self.q = self.heads_first(q, self.nq_p)
    self.k = self.heads_first(k, self.nk_p)
    self.v = self.heads_first(v, self.nk_p)
    inv = common.inv_two_sigma_sq(sigma)
    qst = common.block_stats(t_q, q_seg, self.bq, keys=False)
    kst = common.block_stats(t_k, kv_seg, self.bk, keys=True)
    codes = common.block_codes(spec, qst, kst, inv)  # [B, H, nqb, nkb]
    kv_lo, kv_hi = common.kv_block_range(codes)
    q_lo, q_hi = common.kv_block_range(jnp.swapaxes(codes, -1, -2))
    flat = lambda x: x.reshape(-1)
    # SMEM tables (scalar prefetch); the order is the kernels' argument order.
    self.tables = (flat(qst.t_min), flat(qst.t_max), flat(qst.seg_min), flat(qst.seg_max),
                   flat(kst.t_min), flat(kst.t_max), flat(kst.seg_min), flat(kst.seg_max),
                   flat(kst.all_valid), inv, flat(kv_lo), flat(kv_hi), flat(q_lo), flat(q_hi))

  def heads_first(self, x, n_to):
    """[B, N, H, D] → [B, H, N_padded, D] in the compute dtype."""
    x = common.pad_axis(x.astype(self.cdt), n_to, 1, mode="constant")
    return jnp.transpose(x, (0, 2, 1, 3))

  def heads_last(self, x, n, dtype):
    return jnp.transpose(x[:, :, :n], (0, 2, 1, 3)).astype(dtype)


_N_TABLES = 14


def _unpack(tables):
  names = ("q_tmin", "q_tmax", "q_smin", "q_smax", "k_tmin", "k_tmax", "k_smin", "k_smax",
           "k_allv", "inv", "kv_lo", "kv_hi", "q_lo", "q_hi")
  return dict(zip(names, tables))


def _needed(spec, t, b, h, i, j, nqb, nkb, h_total):
  """In-kernel block predicate for (batch b, head h, q-block i, k-block j) → (compute, code)."""
  qi, kj = b * nqb + i, b * nkb + j
  code = common.block_code(spec, t["q_tmin"][qi], t["q_tmax"][qi], t["q_smin"][qi],
                           t["q_smax"][qi], t["k_tmin"][kj], t["k_tmax"][kj], t["k_smin"][kj],
                           t["k_smax"][kj], t["k_allv"][kj], t["inv"][h])
  # Also require the block to lie in the prefetched [first, last] range, so that a rounding
  # difference between in-kernel and host predicates can never use a clamped (wrong) block.
  row = (b * h_total + h) * nqb + i
  col = (b * h_total + h) * nkb + j
  in_range = ((j >= t["kv_lo"][row]) & (j <= t["kv_hi"][row]) & (i >= t["q_lo"][col])
              & (i <= t["q_hi"][col]))
  return (code != common.SKIP) & in_range


def _logits(spec, scale, precision, q, k, tq, tk, qs, ks, inv_h):
  """s [bq, bk] float32 (unmasked), pen [bq, bk], vis [bq, bk] for one block pair."""
  s = jax.lax.dot_general(q, k, _DIMS_NT, preferred_element_type=jnp.float32,
                          precision=precision) * scale
  pen = common.gaussian_penalty(tq, tk, inv_h)
  vis = common.visible(spec, tq, tk, qs, ks)
  return s - pen, pen, vis


# ----------------------------------------------------------------------------------------
# Forward.
# ----------------------------------------------------------------------------------------


def _fwd_kernel(*refs, spec, scale, precision, nqb, nkb, h_total):
  tables = _unpack(refs[:_N_TABLES])
  (q_ref, k_ref, v_ref, tq_ref, tk_ref, qs_ref, ks_ref, o_ref, lse_ref, m_scr, l_scr,
   acc_scr) = refs[_N_TABLES:]
  b, h, i, j = (pl.program_id(a) for a in range(4))

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when(_needed(spec, tables, b, h, i, j, nqb, nkb, h_total))
  def _compute():
    s, _, vis = _logits(spec, scale, precision, q_ref[...], k_ref[...], tq_ref[...],
                        tk_ref[...], qs_ref[...], ks_ref[...], tables["inv"][h])
    s = jnp.where(vis, s, -jnp.inf)
    m_prev = m_scr[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    # A row with nothing visible so far keeps m = −inf; shift by 0 there to avoid inf − inf.
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe)
    alpha = jnp.exp(m_prev - m_safe)
    l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
    v = v_ref[...]
    acc_scr[...] = alpha * acc_scr[...] + jax.lax.dot_general(
        p.astype(v.dtype), v, _DIMS_NN, preferred_element_type=jnp.float32,
        precision=precision)
    m_scr[...] = m_new

  @pl.when(j == nkb - 1)
  def _finish():
    l = l_scr[...]
    nonempty = l > 0
    l_safe = jnp.where(nonempty, l, 1.0)
    o_ref[...] = (acc_scr[...] / l_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(nonempty, m_scr[...] + jnp.log(l_safe), -jnp.inf)


def _clamp(j, lo_ref, hi_ref, idx):
  return jnp.minimum(jnp.maximum(j, lo_ref[idx]), hi_ref[idx])


def forward(q, k, v, t_q, t_k, sigma, *, scale, spec, q_segment_ids, kv_segment_ids,
            interpret=False, exact_lse=True, block_q=None, block_k=None):
  """out [B, Nq, H, D] q.dtype, lse [B, H, Nq] float32 (contract in common.py)."""
  del exact_lse  # always exact here
  p = _Prep(q, k, v, t_q, t_k, sigma, q_segment_ids, kv_segment_ids, spec, block_q, block_k,
            interpret)
  out, lse = _forward_padded(p, scale, spec, interpret)
  return p.heads_last(out, p.nq, q.dtype), lse[:, :, :p.nq, 0]


def _query_major_specs(p):
  """Block specs of the grids (B, H, q-block, k-block) (forward and dq kernels).

  Returns (q_spec, row_spec, kv_spec, tq_spec, tk_spec): Q-side [bq, D] and [bq, 1] blocks of
  the grid's query block; K/V and key times with the k-block index clamped to the range the
  query block needs, so skipped blocks re-use the block already in VMEM (no DMA).
  """
  bq, bk, d, rep, nqb, h = p.bq, p.bk, p.d, p.rep, p.nqb, p.h

  def kv_index(b, hh, i, j, *t):
    t = _unpack(t)
    return (b, hh // rep, _clamp(j, t["kv_lo"], t["kv_hi"], (b * h + hh) * nqb + i), 0)

  def tk_index(b, hh, i, j, *t):
    t = _unpack(t)
    return (b, 0, _clamp(j, t["kv_lo"], t["kv_hi"], (b * h + hh) * nqb + i))

  q_spec = pl.BlockSpec((None, None, bq, d), lambda b, hh, i, j, *t: (b, hh, i, 0))
  row_spec = pl.BlockSpec((None, None, bq, 1), lambda b, hh, i, j, *t: (b, hh, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, d), kv_index)
  tq_spec = pl.BlockSpec((None, bq, 1), lambda b, hh, i, j, *t: (b, i, 0))
  tk_spec = pl.BlockSpec((None, 1, bk), tk_index)
  return q_spec, row_spec, kv_spec, tq_spec, tk_spec


def _forward_padded(p, scale, spec, interpret):
  bq, d, nqb, nkb, h = p.bq, p.d, p.nqb, p.nkb, p.h
  q_spec, lse_spec, kv_spec, tq_spec, tk_spec = _query_major_specs(p)
  kernel = functools.partial(_fwd_kernel, spec=spec, scale=scale, precision=p.precision,
                             nqb=nqb, nkb=nkb, h_total=h)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=_N_TABLES,
          grid=(p.b, h, nqb, nkb),
          in_specs=[q_spec, kv_spec, kv_spec, tq_spec, tk_spec, tq_spec, tk_spec],
          out_specs=[q_spec, lse_spec],
          scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                          pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((p.b, h, p.nq_p, d), p.cdt),
                 jax.ShapeDtypeStruct((p.b, h, p.nq_p, 1), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=_interpret_arg(interpret),
      name="gaussian_attention_fwd",
  )(*p.tables, p.q, p.k, p.v, p.tq, p.tk, p.qs, p.ks)


# ----------------------------------------------------------------------------------------
# Backward.
# ----------------------------------------------------------------------------------------


def _dq_kernel(*refs, spec, scale, precision, nqb, nkb, h_total):
  tables = _unpack(refs[:_N_TABLES])
  (q_ref, k_ref, v_ref, tq_ref, tk_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, dlse_ref,
   dq_ref, dsig_ref, dq_scr, a_scr, b_scr, c_scr) = refs[_N_TABLES:]
  b, h, i, j = (pl.program_id(a) for a in range(4))

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)
    for scr in (a_scr, b_scr, c_scr):
      scr[...] = jnp.zeros(scr.shape, jnp.float32)

  @pl.when(_needed(spec, tables, b, h, i, j, nqb, nkb, h_total))
  def _compute():
    k = k_ref[...]
    v = v_ref[...]
    s, pen, vis = _logits(spec, scale, precision, q_ref[...], k, tq_ref[...], tk_ref[...],
                          qs_ref[...], ks_ref[...], tables["inv"][h])
    lse = lse_ref[...]
    p = jnp.where(vis, jnp.exp(s - lse), 0.0)
    do = do_ref[...]
    dp = jax.lax.dot_general(do, v, _DIMS_NT, preferred_element_type=jnp.float32,
                             precision=precision)
    ds = p * (dp - delta_ref[...])
    dq_scr[...] += scale * jax.lax.dot_general(ds.astype(k.dtype), k, _DIMS_NN,
                                               preferred_element_type=jnp.float32,
                                               precision=precision)
    # σ-gradient accumulators A, B, C of the backend contract (common.py).
    shifted = pen + common.dsigma_shift(lse)
    pdp = p * dp
    a_scr[...] += jnp.sum(pdp * shifted, axis=1, keepdims=True)
    b_scr[...] += jnp.sum(p * shifted, axis=1, keepdims=True)
    c_scr[...] += jnp.sum(pdp, axis=1, keepdims=True)

  @pl.when(j == nkb - 1)
  def _finish():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)
    rows = common.dsigma_row_partial(a_scr[...], b_scr[...], c_scr[...], dlse_ref[...],
                                     common.dsigma_shift(lse_ref[...]))  # [bq, 1]
    dsig_ref[...] = jnp.broadcast_to(jnp.sum(rows, axis=0, keepdims=True), dsig_ref.shape)


def _dkv_kernel(*refs, spec, scale, precision, nqb, nkb, rep, h_total):
  tables = _unpack(refs[:_N_TABLES])
  (q_ref, k_ref, v_ref, tq_ref, tk_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, dk_ref,
   dv_ref, dk_scr, dv_scr) = refs[_N_TABLES:]
  b, g, j, r, i = (pl.program_id(a) for a in range(5))
  h = g * rep + r

  @pl.when((r == 0) & (i == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  @pl.when(_needed(spec, tables, b, h, i, j, nqb, nkb, h_total))
  def _compute():
    q = q_ref[...]
    v = v_ref[...]
    s, _, vis = _logits(spec, scale, precision, q, k_ref[...], tq_ref[...], tk_ref[...],
                        qs_ref[...], ks_ref[...], tables["inv"][h])
    p = jnp.where(vis, jnp.exp(s - lse_ref[...]), 0.0)
    do = do_ref[...]
    dv_scr[...] += jax.lax.dot_general(p.astype(do.dtype), do, _DIMS_TN,
                                       preferred_element_type=jnp.float32, precision=precision)
    dp = jax.lax.dot_general(do, v, _DIMS_NT, preferred_element_type=jnp.float32,
                             precision=precision)
    ds = p * (dp - delta_ref[...])
    dk_scr[...] += scale * jax.lax.dot_general(ds.astype(q.dtype), q, _DIMS_TN,
                                               preferred_element_type=jnp.float32,
                                               precision=precision)

  @pl.when((r == rep - 1) & (i == nqb - 1))
  def _finish():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward(q, k, v, t_q, t_k, sigma, out, lse, dout, *, scale, spec, q_segment_ids,
             kv_segment_ids, interpret=False, dlse=None, block_q=None, block_k=None):
  """(dq, dk, dv, dsigma [H] float32) (contract in common.py)."""
  p = _Prep(q, k, v, t_q, t_k, sigma, q_segment_ids, kv_segment_ids, spec, block_q, block_k,
            interpret)
  bq, bk, d, rep, nqb, nkb, h, hkv = p.bq, p.bk, p.d, p.rep, p.nqb, p.nkb, p.h, p.hkv
  do = p.heads_first(dout, p.nq_p)
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, Nq, H]
  delta = common.pad_axis(jnp.transpose(delta, (0, 2, 1)), p.nq_p, 2, mode="constant")
  # Padded query rows get lse = +inf, so their p = exp(s − lse) is exactly 0.
  lse_p = common.pad_axis(lse.astype(jnp.float32), p.nq_p, 2, mode="constant",
                          value=jnp.inf)[..., None]
  # lse cotangent (zeros when the caller reads out only): dS = P·(dP − delta + dlse).
  dlse = (jnp.zeros_like(delta) if dlse is None else
          common.pad_axis(dlse.astype(jnp.float32), p.nq_p, 2, mode="constant"))
  delta = (delta - dlse)[..., None]
  dlse = dlse[..., None]
  interp = _interpret_arg(interpret)

  # dq (+ dσ partials): grid (B, H, nqb, nkb), K/V index clamped to the needed range.
  q_spec, row_spec, kv_spec, tq_spec, tk_spec = _query_major_specs(p)
  dsig_spec = pl.BlockSpec((None, None, None, 8, 128), lambda b, hh, i, j, *t: (b, hh, i, 0, 0))
  dq, dsig_part = pl.pallas_call(
      functools.partial(_dq_kernel, spec=spec, scale=scale, precision=p.precision, nqb=nqb,
                        nkb=nkb, h_total=h),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=_N_TABLES,
          grid=(p.b, h, nqb, nkb),
          in_specs=[q_spec, kv_spec, kv_spec, tq_spec, tk_spec, tq_spec, tk_spec, q_spec,
                    row_spec, row_spec, row_spec],
          out_specs=[q_spec, dsig_spec],
          scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]
          + [pltpu.VMEM((bq, 1), jnp.float32)] * 3),
      out_shape=[jax.ShapeDtypeStruct((p.b, h, p.nq_p, d), jnp.float32),
                 jax.ShapeDtypeStruct((p.b, h, nqb, 8, 128), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interp,
      name="gaussian_attention_dq",
  )(*p.tables, p.q, p.k, p.v, p.tq, p.tk, p.qs, p.ks, do, lse_p, delta, dlse)

  # dk/dv: grid (B, Hkv, nkb, rep, nqb), Q-side index clamped to the needed q-block range.
  def qside(b, g, j, r, i, t):
    hh = g * rep + r
    return hh, _clamp(i, t["q_lo"], t["q_hi"], (b * h + hh) * nkb + j)

  def q_index(b, g, j, r, i, *t):
    hh, ii = qside(b, g, j, r, i, _unpack(t))
    return (b, hh, ii, 0)

  def tq_index(b, g, j, r, i, *t):
    _, ii = qside(b, g, j, r, i, _unpack(t))
    return (b, ii, 0)

  q2 = pl.BlockSpec((None, None, bq, d), q_index)
  row2 = pl.BlockSpec((None, None, bq, 1), q_index)
  tq2 = pl.BlockSpec((None, bq, 1), tq_index)
  kv2 = pl.BlockSpec((None, None, bk, d), lambda b, g, j, r, i, *t: (b, g, j, 0))
  tk2 = pl.BlockSpec((None, 1, bk), lambda b, g, j, r, i, *t: (b, 0, j))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, spec=spec, scale=scale, precision=p.precision, nqb=nqb,
                        nkb=nkb, rep=rep, h_total=h),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=_N_TABLES,
          grid=(p.b, hkv, nkb, rep, nqb),
          in_specs=[q2, kv2, kv2, tq2, tk2, tq2, tk2, q2, row2, row2],
          out_specs=[kv2, kv2],
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((p.b, hkv, p.nk_p, d), jnp.float32),
                 jax.ShapeDtypeStruct((p.b, hkv, p.nk_p, d), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      interpret=interp,
      name="gaussian_attention_dkv",
  )(*p.tables, p.q, p.k, p.v, p.tq, p.tk, p.qs, p.ks, do, lse_p, delta)

  # Fixed-order reduction of the dσ partials: [B, H, nqb] → [H].
  partial = jnp.sum(dsig_part[:, :, :, 0, 0], axis=(0, 2))
  dsigma = common.dsigma_from_partial(partial, sigma)
  return (p.heads_last(dq, p.nq, q.dtype), p.heads_last(dk, p.nk, k.dtype),
          p.heads_last(dv, p.nk, v.dtype), dsigma)
