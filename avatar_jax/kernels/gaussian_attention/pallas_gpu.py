"""Gaussian time-distance attention: Pallas Mosaic-GPU kernels for Hopper (sm_90a).

Implements the backend contract of :mod:`common` (``forward`` / ``backward``).

Design (see docs/notes/attention_gpu.md for measurements):

* Forward: one CTA = 3 warpgroups. Warpgroups 0 and 1 each own ``block_q`` query rows (so a CTA
  covers ``2·block_q`` rows); warpgroup 2 only issues TMA copies of K, V and the per-key vectors
  into a ``num_stages``-deep shared-memory ring. Q·Kᵀ and P·V run on wgmma with fp32
  accumulators; the two compute warpgroups alternate tensor-core and softmax phases through a
  shared "schedule" barrier so one's exponentials overlap the other's matmuls.
* The Gaussian term is folded into per-position vectors: with g_h = sqrt(log2(e) / (2σ_h²)),
  ``(t_q − t_k)²·log2(e)/(2σ_h²) = (g_h·t_q − g_h·t_k)²``, so the kernel needs one float per
  query row and one per key column and never sees σ; logits live in the log2 domain
  (``q·k·scale·log2(e) − d²``).
* Skipping: block codes from :func:`common.block_codes` (per CTA query tile × key block) are
  turned into a per-tile list of key blocks, partially visible blocks first, then fully visible
  ones; skipped blocks are absent. The kernel runs a masked loop over the first part and an
  unmasked loop over the rest, so fully visible blocks pay nothing for masks.
* Backward: delta = rowsum(dO·O) in XLA, then two kernels with the same structure: dK/dV/dσ
  (CTA owns 2·block_kv keys, streams query blocks) and dQ (CTA owns 2·block_q queries, streams
  key blocks). No atomics: dσ partial sums are written per (batch, head, key row) and summed
  outside. For grouped heads dK/dV are written per query head and summed outside.

All block sizes are multiples of 64 (wgmma/TMA tiling); sequence lengths are padded up outside
the kernels (padded keys get segment id −1, so they are masked; padded query rows are dropped).

Interpret mode (``interpret=True``) runs the same kernels under Mosaic GPU's CPU interpreter
(jax >= 0.10): same grid, warpgroups, TMA copies, barriers and loops. The interpreter has no
``run_state``, ``plgpu.load``, ``layout_cast`` or transposed wgmma operand, so there the
matmuls are plain dots of the loaded tiles and vectors are read without layouts
(:func:`_mm`, :func:`_mma`, :func:`_load`, :func:`_cast`); wgmma itself runs only on a GPU.
"""
from __future__ import annotations

import functools
import math

import jax
from jax import lax
import jax.numpy as jnp

from avatar_jax.kernels.gaussian_attention import common

# forward(..., return_aux=True) returns pen̄, which backward(..., aux=) uses (api.py).
HAS_AUX_RESIDUALS = True

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
_M_INIT = -1e30  # Finite running-max start: exp2(m_old − m_new) never sees inf − inf.

# fence: 1 puts an optimization barrier between the forward softmax and the P·V hand-off.
# Defaults measured on an H200 (docs/notes/attention_gpu.md, run 3); head dims <= 64 use taller
# query tiles (fewer CTAs, whose fill/drain is otherwise exposed when Nk is short).
_DEFAULT_BLOCKS = dict(block_q=64, block_kv=128, num_stages=2, fence=0,
                       block_q_dq=64, block_kv_dq=128, block_q_dkv=64, block_kv_dkv=64,
                       num_stages_bwd=2, fused_bwd=1)
_DEFAULT_BLOCKS_SMALL_D = dict(block_q=128, block_kv=64)
# The CPU interpreter's cost grows with padded work, not with launch count: smallest tiles.
_DEFAULT_BLOCKS_INTERPRET = dict(block_q=64, block_kv=64, block_kv_dq=64)


def _plgpu():
  # Imported lazily so that importing this module never needs the Mosaic GPU bindings.
  import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
  import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  return pl, plgpu


def _interpret_params(interpret):
  if not interpret:
    return None
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # pylint: disable=g-import-not-at-top
  return InterpretGPUParams()


# ----------------------------------------------------------------------------------------------
# Host-side (XLA) preparation: padding, per-position vectors, block lists.
# ----------------------------------------------------------------------------------------------


def _mask_rows(spec: common.MaskSpec):
  """Names of the mask vectors the masked loop needs (after row 0, the Gaussian coordinate)."""
  rows = []
  if spec.causal_block is not None:
    rows.append("block")
  elif spec.causal:
    rows.append("time")
  if spec.window is not None and "time" not in rows:
    rows.append("time")
  rows.append("seg")
  return tuple(rows)


def position_vectors(t, seg, g, spec: common.MaskSpec, *, keys: bool):
  """Per-position float32 vectors the kernels read: [B, H, R, N].

  t [B, N] float32 raw times, seg [B, N] int32 normalised ids, g [H] = sqrt(log2e·inv_h).
  Row 0: g_h·(t − t_ref) (Gaussian coordinate; t_ref keeps magnitudes small). Then, in the
  order of :func:`_mask_rows`: raw time, block index (+ look-ahead on the query side), segment
  id as float (invalid keys → NaN, which equals nothing).
  """
  b, n = t.shape
  t_ref = t[:, :1]
  rows = [g[None, :, None] * (t - t_ref)[:, None, :]]
  h = g.shape[0]
  for name in _mask_rows(spec):
    if name == "time":
      r = t
    elif name == "block":
      r = jnp.floor(t * (1.0 / spec.causal_block) + common.BLOCK_EPS)
      if not keys:
        r = r + spec.lookahead_blocks
    else:
      r = seg.astype(jnp.float32)
      if keys:
        r = jnp.where(seg >= 0, r, jnp.nan)
    rows.append(jnp.broadcast_to(r[:, None, :], (b, h, n)))
  return jnp.stack(rows, axis=2).astype(jnp.float32)


def block_lists(codes):
  """codes [B, Hc, nT, nB] → (order [B, Hc, nT, nB] int32, n_partial, n_full [B, Hc, nT]).

  order lists, per tile, the partially visible blocks first, then the fully visible ones,
  then the skipped ones (never read). Stable, so blocks keep their natural order.
  """
  rank = jnp.where(codes == common.PARTIAL, 0, jnp.where(codes == common.FULL, 1, 2))
  order = jnp.argsort(rank, axis=-1, stable=True).astype(jnp.int32)
  n_partial = jnp.sum(codes == common.PARTIAL, axis=-1).astype(jnp.int32)
  n_full = jnp.sum(codes == common.FULL, axis=-1).astype(jnp.int32)
  return order, n_partial, n_full


# dq_schedule packs, per (tile, step): the contributor's rank within its class (low bits), the
# class and whether it is the class's last contributor.
_CLS_SHIFT = 20
_LAST_SHIFT = 21
_RANK_MASK = (1 << _CLS_SHIFT) - 1


def dq_schedule(codes):
  """Key-tile order and dQ accumulation plan of the fused backward.

  codes [B, Hc, nQ, nT] (query block × key tile). Returns (order [B, Hc, nT, nQ] int32,
  n_partial, n_full [B, Hc, nT], info [B, Hc, nT, nQ] int32, has [2, B, Hc, nQ] bool).

  Each key tile visits its query blocks partially visible first, then fully visible ones
  rotated to start at block (−t mod nQ): in the dense case tile t handles block (s − t) mod nQ
  at step s, so at every step the CTAs of one head touch distinct query blocks, and block i's
  contributors arrive one step apart in increasing t. The contributions to block i are split
  into two classes, "wrapped" (i + t ≥ nQ) and not, each summed in increasing t into its own
  accumulator. A contributor therefore only ever waits for lower key tiles — CTAs that were
  launched earlier — so the order is fixed (deterministic) and no wait can deadlock, whereas
  a single cyclic order would make tile 0 wait for the last tile.
  """
  n_q, n_t = codes.shape[2], codes.shape[3]
  codes_t = jnp.swapaxes(codes, 2, 3)  # [B, Hc, nT, nQ]
  i = jnp.arange(n_q)[None, :]
  t = jnp.arange(n_t)[:, None]
  rot = (i + t) % n_q  # position of block i in tile t's rotated sweep
  key = jnp.where(codes_t == common.PARTIAL, i,
                  jnp.where(codes_t == common.FULL, n_q + rot, 3 * n_q + i))
  order = jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)
  n_partial = jnp.sum(codes_t == common.PARTIAL, axis=-1).astype(jnp.int32)
  n_full = jnp.sum(codes_t == common.FULL, axis=-1).astype(jnp.int32)
  contrib = (codes != common.SKIP).astype(jnp.int32)  # [B, Hc, nQ, nT]
  cls = ((jnp.arange(n_q)[:, None] + jnp.arange(n_t)[None, :]) >= n_q).astype(jnp.int32)
  rank = jnp.zeros_like(contrib)
  count = []
  for c in range(2):
    in_c = contrib * (cls == c)
    rank = rank + (jnp.cumsum(in_c, axis=-1) - in_c) * (cls == c)
    count.append(in_c.sum(axis=-1))
  count = jnp.stack(count)  # [2, B, Hc, nQ]
  n_cls = jnp.where(cls[None, None] == 1, count[1][..., None], count[0][..., None])
  last = (rank == n_cls - 1).astype(jnp.int32)
  info = rank | (cls[None, None] << _CLS_SHIFT) | (last << _LAST_SHIFT)
  info = jnp.take_along_axis(jnp.swapaxes(info, 2, 3), order, axis=-1).astype(jnp.int32)
  return order, n_partial, n_full, info, count > 0


def _pad_rows(x, n_to):
  """Zero-pads axis 1 of x to n_to."""
  if x.shape[1] == n_to:
    return x
  return jnp.pad(x, [(0, 0), (0, n_to - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


class _Prep:
  """Everything both passes derive from the arguments (shapes are static)."""

  def __init__(self, q, k, t_q, t_k, sigma, scale, spec, q_seg, kv_seg, *, q_mult, k_mult):
    self.b, self.nq, self.h, self.d = q.shape
    self.nk, self.hkv = k.shape[1], k.shape[2]
    if self.h % self.hkv:
      raise ValueError(f"q has {self.h} heads and k/v {self.hkv}: expected H % Hkv == 0")
    if self.d % 64 or self.d > 256:
      raise ValueError(f"pallas_gpu needs a head dim that is a multiple of 64 (<= 256), got {self.d}")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"pallas_gpu needs bfloat16 or float16 q/k/v, got {q.dtype}")
    if not float(scale) > 0:
      raise ValueError(f"pallas_gpu needs a positive logit scale, got {scale!r}")
    self.spec = spec
    self.nq_p = common.round_up(self.nq, q_mult)
    self.nk_p = common.round_up(self.nk, k_mult)
    tq, tk, qs, ks = common.pad_inputs(t_q, t_k, q_seg, kv_seg, self.nq_p, self.nk_p)
    self.tq, self.tk, self.qs, self.ks = tq, tk, qs, ks
    self.inv = common.inv_two_sigma_sq(sigma)  # [H]
    # Gaussian coordinate: (g·t_q − g·t_k)² is the Gaussian term in log2 units.
    g = jnp.sqrt(self.inv * LOG2E)
    # A common reference time for both sides keeps g·t small without changing differences.
    t0 = jnp.minimum(tq[:, :1], tk[:, :1])
    self.qvec = position_vectors(tq, qs, g, spec, keys=False)
    self.kvec = position_vectors(tk, ks, g, spec, keys=True)
    shift = (g[None, :] * (tq[:, :1] - t0))[:, :, None]
    self.qvec = self.qvec.at[:, :, 0].add(shift)
    shift_k = (g[None, :] * (tk[:, :1] - t0))[:, :, None]
    self.kvec = self.kvec.at[:, :, 0].add(shift_k)
    self.scale_log2 = float(scale) * LOG2E

  def codes(self, q_block, k_block):
    """[B, Hc, nq_p/q_block, nk_p/k_block]; Hc = H with band skipping, else 1."""
    inv = self.inv if self.spec.bias_cutoff is not None else jnp.zeros((1,), jnp.float32)
    return common.block_codes(
        self.spec, common.block_stats(self.tq, self.qs, q_block, keys=False),
        common.block_stats(self.tk, self.ks, k_block, keys=True), inv)


# ----------------------------------------------------------------------------------------------
# Kernel helpers.
# ----------------------------------------------------------------------------------------------


def _value(x):
  """Reads a ref (plain or transformed) into a value; passes values through."""
  from jax._src.state import types as state_types  # pylint: disable=g-import-not-at-top
  if isinstance(x, state_types.TransformedRef):
    return x[...]
  if isinstance(jax.typeof(x), state_types.AbstractRef):
    return x[...]
  return x


def _dot_interpret(a, b_ref, transpose_b):
  """The CPU interpreter has no transposed wgmma operands: multiply the loaded tiles instead."""
  a = _value(a)
  b = b_ref[...]
  if transpose_b:
    b = b.T
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _mma(acc, a, b_ref, interpret):
  """acc + a @ b on the tensor cores (acc fp32 registers, a registers or SMEM, b SMEM)."""
  if interpret:
    return acc + _dot_interpret(a, b_ref, False)
  pl, plgpu = _plgpu()

  def run_state(acc_ref):
    plgpu.wgmma(acc_ref, a, b_ref)
  return pl.run_state(run_state)(plgpu.ACC.init(acc))


def _mm(shape, a, b_ref, *, interpret, transpose_b=True, after_issue=None):
  """a @ bᵀ (or a @ b) into a fresh fp32 accumulator; `after_issue` runs while it is in flight."""
  if interpret:
    out = _dot_interpret(a, b_ref, transpose_b)
    if after_issue is not None:
      after_issue()
    return out
  pl, plgpu = _plgpu()
  if transpose_b:
    b_ref = plgpu.transpose_ref(b_ref, (1, 0))

  def run(acc_ref):
    plgpu.wgmma(acc_ref, a, b_ref)
    if after_issue is not None:
      after_issue()
    return acc_ref[...]
  return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _transposed(ref, interpret):
  """A 2-D SMEM ref as a transposed wgmma operand (its loaded transpose in the interpreter)."""
  if interpret:
    return ref[...].T
  _, plgpu = _plgpu()
  return plgpu.transpose_ref(ref, (1, 0))


def _load(ref, layout, interpret):
  """Loads a small SMEM vector into registers in the given wgmma-compatible layout."""
  if interpret:  # The CPU interpreter has no plgpu.load; layouts do not exist there.
    return ref[...]
  _, plgpu = _plgpu()
  return plgpu.load(ref, (), layout=layout)


def _cast(interpret, x, layout):
  """Gives a fresh register array its wgmma layout (no-op in the CPU interpreter)."""
  if interpret:
    return x
  _, plgpu = _plgpu()
  return plgpu.layout_cast(x, layout)


def _apply_mask(s, rows_q, rows_k, spec):
  """Sets invisible logits to −inf. rows_*: dict name → broadcast [bq, bk] f32 arrays (lazy)."""
  neg = jnp.float32(-jnp.inf)
  names = _mask_rows(spec)
  for name in names:
    rq, rk = rows_q[name](), rows_k[name]()
    if name == "seg":
      s = jnp.where(rq == rk, s, neg)
    elif name == "block":
      s = jnp.where(rk <= rq, s, neg)
    else:  # raw time: causal and/or window
      if spec.causal and spec.causal_block is None:
        s = jnp.where(rk <= rq, s, neg)
      if spec.window is not None:
        dt = rq - rk
        s = jnp.where(dt <= spec.window, s, neg)
        s = jnp.where(dt >= -spec.window, s, neg)
  return s


# ----------------------------------------------------------------------------------------------
# Forward kernel.
# ----------------------------------------------------------------------------------------------


def _fwd_call(q, k, v, qvec, kvec, order, n_part, n_full, *, scale_log2, spec, block_q,
              block_kv, num_stages, head_codes, interpret, fence=0, with_pbar=False):
  """out [B, Nq, H, D], lse2 [B, H, Nq] (log2 units) and, with `with_pbar`, pen̄ [B, H, Nq].

  pen̄_i = Σ_j P_ij·pen_ij (log2 units) is what the fused backward needs for dσ (see
  :func:`_dkv_call`); it costs one multiply-add per logit, so only the VJP forward asks for it.
  """
  pl, plgpu = _plgpu()
  b, nq, h, d = q.shape
  nk, hkv = k.shape[1], k.shape[2]
  rep = h // hkv
  nr = qvec.shape[2]
  tile_q = 2 * block_q
  n_tiles = nq // tile_q
  dtype = q.dtype
  stages = num_stages
  row_l = plgpu.Layout.WGMMA.reduce(1)
  col_l = plgpu.Layout.WGMMA.reduce(0)
  names = ("g",) + _mask_rows(spec)

  def body(q_ref, k_ref, v_ref, qv_ref, kv_ref, ord_ref, np_ref, nf_ref, o_ref, lse_ref, *rest):
    if with_pbar:
      pbar_ref, *rest = rest
    (qo_smem2, qv_smem2, lse_smem2, k_smem, v_smem, kv_smem,
     q_bar, qv_bar, k_bar, v_bar, kv_bar, k_free, v_free, sched) = rest
    bi = lax.axis_index("b")
    hi = lax.axis_index("h")
    ti = lax.axis_index("t")
    wg = lax.axis_index("wg")
    hc = hi if head_codes else 0
    n_p = np_ref[bi, hc, ti]
    n_f = nf_ref[bi, hc, ti]
    steps = n_p + n_f

    def sched_barrier():
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(sched)

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      q_smem = qo_smem2.at[wg]
      q0 = ti * tile_q + wg * block_q
      plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(q0, block_q), hi], q_smem, q_bar.at[wg])
      plgpu.copy_gmem_to_smem(qv_ref.at[bi, hi, :, pl.ds(q0, block_q)], qv_smem2.at[wg],
                              qv_bar.at[wg])
      plgpu.barrier_wait(q_bar.at[wg])
      plgpu.barrier_wait(qv_bar.at[wg])
      qrow = {nm: _load(qv_smem2.at[wg, i], row_l, interpret) for i, nm in enumerate(names)}
      shape = (block_q, block_kv)
      bc_q = lambda x: lax.broadcast_in_dim(x, shape, [0])
      bc_k = lambda x: lax.broadcast_in_dim(x, shape, [1])

      def step(j, carry, masked):
        acc, m, l, pb = carry
        slot = lax.rem(j, jnp.array(stages, j.dtype))
        plgpu.barrier_wait(k_bar.at[slot])
        s = _mm(shape, q_smem, k_smem.at[slot], interpret=interpret, after_issue=sched_barrier)
        plgpu.barrier_wait(kv_bar.at[slot])
        if masked:
          krow = [_load(kv_smem.at[slot, i], col_l, interpret) for i in range(nr)]
        else:
          krow = [_load(kv_smem.at[slot, 0], col_l, interpret)]
        plgpu.barrier_arrive(k_free.at[slot])
        dg = bc_q(qrow["g"]) - bc_k(krow[0])
        pen = dg * dg
        s = s * scale_log2 - pen
        if masked:
          rq = {nm: functools.partial(bc_q, qrow[nm]) for nm in names[1:]}
          rk = {nm: functools.partial(bc_k, krow[i + 1]) for i, nm in enumerate(names[1:])}
          s = _apply_mask(s, rq, rk, spec)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - bc_q(m_new))
        acc = acc * lax.broadcast_in_dim(alpha, (block_q, d), [0])
        l = l * alpha + p.sum(axis=1)
        if with_pbar:
          pb = pb * alpha + (p * pen).sum(axis=1)
        p16 = p.astype(dtype)
        if fence and not interpret:
          # Keeps the compiler from sinking the softmax tail past the hand-off below.
          acc, m_new, l, p16 = lax.optimization_barrier((acc, m_new, l, p16))
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(v_bar.at[slot])
        plgpu.barrier_wait(sched)
        acc = _mma(acc, p16, v_smem.at[slot], interpret)
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l, pb

      acc = _cast(interpret, jnp.zeros((block_q, d), jnp.float32), plgpu.Layout.WGMMA)
      m = _cast(interpret, jnp.full((block_q,), _M_INIT, jnp.float32), row_l)
      l = _cast(interpret, jnp.zeros((block_q,), jnp.float32), row_l)
      pb = _cast(interpret, jnp.zeros((block_q,), jnp.float32), row_l) if with_pbar else None
      pl.when(wg == 1)(sched_barrier)
      carry = lax.fori_loop(0, n_p, functools.partial(step, masked=True), (acc, m, l, pb))
      acc, m, l, pb = lax.fori_loop(n_p, steps, functools.partial(step, masked=False), carry)
      pl.when(wg == 0)(sched_barrier)

      # l >= 1 whenever a key was visible; rows with none keep acc = 0 and l = 0.
      inv_l = 1.0 / jnp.maximum(l, 1e-30)
      q_smem[...] = (acc * lax.broadcast_in_dim(inv_l, (block_q, d), [0])).astype(dtype)
      lse_smem2.at[wg, 0][...] = m + jnp.log(l) * (1.0 / LN2)
      if with_pbar:
        lse_smem2.at[wg, 1][...] = pb * inv_l
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, o_ref.at[bi, pl.ds(q0, block_q), hi])
      plgpu.copy_smem_to_gmem(lse_smem2.at[wg, 0], lse_ref.at[bi, hi, pl.ds(q0, block_q)])
      if with_pbar:
        plgpu.copy_smem_to_gmem(lse_smem2.at[wg, 1], pbar_ref.at[bi, hi, pl.ds(q0, block_q)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")
      hk = lax.div(hi, jnp.array(rep, hi.dtype))

      def issue_k(j, slot):
        kb = ord_ref[bi, hc, ti, j]
        rows = pl.ds(kb * block_kv, block_kv)
        plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, hk], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(kv_ref.at[bi, hi, :, rows], kv_smem.at[slot], kv_bar.at[slot])

      def issue_v(j, slot):
        kb = ord_ref[bi, hc, ti, j]
        rows = pl.ds(kb * block_kv, block_kv)
        plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, hk], v_smem.at[slot], v_bar.at[slot])

      for i in range(stages):
        @pl.when(i < steps)
        def _prologue():
          issue_k(i, i)
          issue_v(i, i)

      def refill(j, _):
        slot = lax.rem(j, jnp.array(stages, j.dtype))
        plgpu.barrier_wait(k_free.at[slot])
        issue_k(j, slot)
        plgpu.barrier_wait(v_free.at[slot])
        issue_v(j, slot)
        return _

      lax.fori_loop(stages, steps, refill, None)

      # Observe the last releases too, so every barrier phase is waited on before exit.
      def drain(j, _):
        slot = lax.rem(j, jnp.array(stages, j.dtype))
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])
        return _

      lax.fori_loop(jnp.maximum(steps - stages, 0), steps, drain, None)

  tiling = plgpu.TilingTransform((8, 64))
  swizzle = plgpu.SwizzleTransform(128)
  scratch = [
      plgpu.SMEM((2, block_q, d), dtype, transforms=(tiling, swizzle)),
      plgpu.SMEM((2, nr, block_q), jnp.float32),
      plgpu.SMEM((2, 2 if with_pbar else 1, block_q), jnp.float32),
      plgpu.SMEM((stages, block_kv, d), dtype, transforms=(tiling, swizzle)),
      plgpu.SMEM((stages, block_kv, d), dtype, transforms=(tiling, swizzle)),
      plgpu.SMEM((stages, nr, block_kv), jnp.float32),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      plgpu.Barrier(num_arrivals=2),
  ]
  out_type = [jax.ShapeDtypeStruct(q.shape, dtype),
              jax.ShapeDtypeStruct((b, h, nq), jnp.float32)]
  if with_pbar:
    out_type.append(jax.ShapeDtypeStruct((b, h, nq), jnp.float32))
  kernel = plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch,
      grid=(h, n_tiles, b), grid_names=("h", "t", "b"),
      num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=_interpret_params(interpret))
  return kernel(q, k, v, qvec, kvec, order, n_part, n_full)


# ----------------------------------------------------------------------------------------------
# Backward kernels.
# ----------------------------------------------------------------------------------------------


def _dq_call(q, k, v, do, qvec, kvec, order, n_part, n_full, *, scale_log2, spec, block_q,
             block_kv, num_stages, head_codes, interpret):
  """dQ (unscaled: Σ_j dS_ij k_j) and pen̄_i = Σ_j P_ij·pen_ij (log2 units) per query row.

  qvec rows: [lse2, delta, g, masks...]. pen̄ lets the dK/dV kernel form dσ without the
  cancellation of Σ_j dS_ij = 0 (see :func:`_dkv_call`).
  """
  pl, plgpu = _plgpu()
  b, nq, h, d = q.shape
  hkv = k.shape[2]
  rep = h // hkv
  nr = kvec.shape[2]
  tile_q = 2 * block_q
  n_tiles = nq // tile_q
  dtype = q.dtype
  stages = num_stages
  row_l = plgpu.Layout.WGMMA.reduce(1)
  col_l = plgpu.Layout.WGMMA.reduce(0)
  names = ("g",) + _mask_rows(spec)

  def body(q_ref, k_ref, v_ref, do_ref, qv_ref, kv_ref, ord_ref, np_ref, nf_ref, dq_ref,
           pbar_ref, q_smem2, do_smem2, qv_smem2, pbar_smem2, k_smem, v_smem, kv_smem,
           q_bar, do_bar, qv_bar, k_bar, v_bar, kv_bar, k_free, v_free):
    bi = lax.axis_index("b")
    hi = lax.axis_index("h")
    ti = lax.axis_index("t")
    wg = lax.axis_index("wg")
    hc = hi if head_codes else 0
    n_p = np_ref[bi, hc, ti]
    steps = n_p + nf_ref[bi, hc, ti]

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
      q0 = ti * tile_q + wg * block_q
      plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(q0, block_q), hi], q_smem, q_bar.at[wg])
      plgpu.copy_gmem_to_smem(do_ref.at[bi, pl.ds(q0, block_q), hi], do_smem, do_bar.at[wg])
      plgpu.copy_gmem_to_smem(qv_ref.at[bi, hi, :, pl.ds(q0, block_q)], qv_smem2.at[wg],
                              qv_bar.at[wg])
      plgpu.barrier_wait(q_bar.at[wg])
      plgpu.barrier_wait(do_bar.at[wg])
      plgpu.barrier_wait(qv_bar.at[wg])
      lse = _load(qv_smem2.at[wg, 0], row_l, interpret)
      delta = _load(qv_smem2.at[wg, 1], row_l, interpret)
      qrow = {nm: _load(qv_smem2.at[wg, i + 2], row_l, interpret)
              for i, nm in enumerate(names)}
      shape = (block_q, block_kv)
      bc_q = lambda x: lax.broadcast_in_dim(x, shape, [0])
      bc_k = lambda x: lax.broadcast_in_dim(x, shape, [1])

      def step(j, carry, masked):
        dq_acc, pbar = carry
        slot = lax.rem(j, jnp.array(stages, j.dtype))
        plgpu.barrier_wait(k_bar.at[slot])
        s = _mm(shape, q_smem, k_smem.at[slot], interpret=interpret)
        plgpu.barrier_wait(kv_bar.at[slot])
        n_load = nr if masked else 1
        krow = [_load(kv_smem.at[slot, i], col_l, interpret) for i in range(n_load)]
        dg = bc_q(qrow["g"]) - bc_k(krow[0])
        pen = dg * dg  # Gaussian term, log2 units
        s = s * scale_log2 - pen
        if masked:
          rq = {nm: functools.partial(bc_q, qrow[nm]) for nm in names[1:]}
          rk = {nm: functools.partial(bc_k, krow[i + 1]) for i, nm in enumerate(names[1:])}
          s = _apply_mask(s, rq, rk, spec)
        p = jnp.exp2(s - bc_q(lse))
        pbar = pbar + (p * pen).sum(axis=1)
        plgpu.barrier_wait(v_bar.at[slot])
        dp = _mm(shape, do_smem, v_smem.at[slot], interpret=interpret)
        plgpu.barrier_arrive(v_free.at[slot])
        ds = p * (dp - bc_q(delta))
        dq_acc = _mma(dq_acc, ds.astype(dtype), k_smem.at[slot], interpret)
        plgpu.barrier_arrive(k_free.at[slot])
        return dq_acc, pbar

      carry = (_cast(interpret, jnp.zeros((block_q, d), jnp.float32), plgpu.Layout.WGMMA),
               _cast(interpret, jnp.zeros((block_q,), jnp.float32), row_l))
      carry = lax.fori_loop(0, n_p, functools.partial(step, masked=True), carry)
      dq_acc, pbar = lax.fori_loop(n_p, steps, functools.partial(step, masked=False), carry)
      q_smem[...] = dq_acc.astype(dtype)
      pbar_smem2.at[wg][...] = pbar
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[bi, pl.ds(q0, block_q), hi])
      plgpu.copy_smem_to_gmem(pbar_smem2.at[wg], pbar_ref.at[bi, hi, pl.ds(q0, block_q)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")
      hk = lax.div(hi, jnp.array(rep, hi.dtype))

      def issue_k(j, slot):
        kb = ord_ref[bi, hc, ti, j]
        rows = pl.ds(kb * block_kv, block_kv)
        plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, hk], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(kv_ref.at[bi, hi, :, rows], kv_smem.at[slot], kv_bar.at[slot])

      def issue_v(j, slot):
        kb = ord_ref[bi, hc, ti, j]
        rows = pl.ds(kb * block_kv, block_kv)
        plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, hk], v_smem.at[slot], v_bar.at[slot])

      for i in range(stages):
        @pl.when(i < steps)
        def _prologue():
          issue_k(i, i)
          issue_v(i, i)

      def refill(j, _):
        slot = lax.rem(j, jnp.array(stages, j.dtype))
        plgpu.barrier_wait(v_free.at[slot])
        issue_v(j, slot)
        plgpu.barrier_wait(k_free.at[slot])
        issue_k(j, slot)
        return _

      lax.fori_loop(stages, steps, refill, None)

      # Observe the last releases too, so every barrier phase is waited on before exit.
      def drain(j, _):
        slot = lax.rem(j, jnp.array(stages, j.dtype))
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])
        return _

      lax.fori_loop(jnp.maximum(steps - stages, 0), steps, drain, None)

  tiling = plgpu.TilingTransform((8, 64))
  swizzle = plgpu.SwizzleTransform(128)
  nqr = qvec.shape[2]
  scratch = [
      plgpu.SMEM((2, block_q, d), dtype, transforms=(tiling, swizzle)),
      plgpu.SMEM((2, block_q, d), dtype, transforms=(tiling, swizzle)),
      plgpu.SMEM((2, nqr, block_q), jnp.float32),
      plgpu.SMEM((2, block_q), jnp.float32),
      plgpu.SMEM((stages, block_kv, d), dtype, transforms=(tiling, swizzle)),
      plgpu.SMEM((stages, block_kv, d), dtype, transforms=(tiling, swizzle)),
      plgpu.SMEM((stages, nr, block_kv), jnp.float32),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),
  ]
  kernel = plgpu.kernel(
      body, out_type=[jax.ShapeDtypeStruct(q.shape, dtype),
                      jax.ShapeDtypeStruct((b, h, nq), jnp.float32)],
      scratch_types=scratch,
      grid=(h, n_tiles, b), grid_names=("h", "t", "b"),
      num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=_interpret_params(interpret))
  return kernel(q, k, v, do, qvec, kvec, order, n_part, n_full)


def _dkv_call(q, k, v, do, qvec, kvec, order, n_part, n_full, *, scale_log2, spec, block_q,
              block_kv, num_stages, head_codes, interpret, dq_info=None):
  """dK, dV per query head (dK unscaled), dσ partials per key (log2 units) and, fused, dQ.

  The dσ partial is Σ_i P_ij·dP_ij·(pen_ij − pen̄_i), which equals Σ_i dS_ij·pen_ij exactly
  (Σ_j P_ij (pen_ij − pen̄_i) = 0 removes delta) but does not inherit the error of delta
  computed from the rounded output, which Σ dS·pen, a sum with heavy cancellation, amplifies.

  Fused (``dq_info`` given, [B, Hc, n_tiles, nq/block_q] int32 from :func:`dq_schedule`): each
  step also writes dSᵀ to shared memory, and the two compute warpgroups each multiply it with
  one half of the head dim of both key tiles, giving the tile's dQ contribution [block_q, D]
  (fp32). The memory warpgroup adds it into one of two fp32 accumulators in global memory
  with TMA, in a fixed order per query block: it waits on a global semaphore until every
  lower key tile of the same class has added (see :func:`dq_schedule` for why the order is
  deterministic and cannot deadlock). The first contributor stores instead of adding, so
  the accumulators need no zeroing. Rows of a class nobody contributed to are left unwritten
  (:func:`dq_schedule` returns which).

  qvec rows: [lse2, delta, pen̄, g, masks...]; kvec rows: [g, masks...]. Returns
  dk, dv [B, Nk, H, D], part [B, H, Nk] float32 (and dq_acc [2, B, Nq, H, D] float32 fused).
  """
  pl, plgpu = _plgpu()
  b, nq, h, d = q.shape
  nk, hkv = k.shape[1], k.shape[2]
  rep = h // hkv
  nqr = qvec.shape[2]
  nkr = kvec.shape[2]
  tile_k = 2 * block_kv
  n_tiles = nk // tile_k
  dtype = q.dtype
  stages = num_stages
  row_l = plgpu.Layout.WGMMA.reduce(1)
  col_l = plgpu.Layout.WGMMA.reduce(0)
  names = ("g",) + _mask_rows(spec)
  fused = dq_info is not None
  dh = d // 2  # each compute warpgroup produces half of dQ's columns
  if fused and dh % 64:
    raise ValueError(f"the fused pallas_gpu backward needs a head dim that is a multiple of "
                     f"128, got {d}")

  def body(q_ref, k_ref, v_ref, do_ref, qv_ref, kv_ref, ord_ref, np_ref, nf_ref, *rest):
    if fused:
      info_ref, dk_ref, dv_ref, part_ref, dq_ref, *rest = rest
    else:
      dk_ref, dv_ref, part_ref, *rest = rest
    (k_smem2, v_smem2, kv_smem2, part_smem2, q_smem, do_smem, qv_smem,
     k_bar, v_bar, kv_bar, q_bar, do_bar, qv_bar, q_free, do_free, *rest) = rest
    if fused:
      ds_smem, dq_smem, ds_ready, ds_free, dq_ready, dq_free, *rest = rest
    bi = lax.axis_index("b")
    hi = lax.axis_index("h")
    ti = lax.axis_index("t")
    wg = lax.axis_index("wg")
    hc = hi if head_codes else 0
    n_p = np_ref[bi, hc, ti]
    steps = n_p + nf_ref[bi, hc, ti]
    hk = lax.div(hi, jnp.array(rep, hi.dtype))

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
      k0 = ti * tile_k + wg * block_kv
      rows = pl.ds(k0, block_kv)
      plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, hk], k_smem, k_bar.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, hk], v_smem, v_bar.at[wg])
      plgpu.copy_gmem_to_smem(kv_ref.at[bi, hi, :, rows], kv_smem2.at[wg], kv_bar.at[wg])
      plgpu.barrier_wait(k_bar.at[wg])
      plgpu.barrier_wait(v_bar.at[wg])
      plgpu.barrier_wait(kv_bar.at[wg])
      if fused:  # dQ reads both key tiles
        plgpu.barrier_wait(k_bar.at[1 - wg])
      krow = {nm: _load(kv_smem2.at[wg, i], row_l, interpret) for i, nm in enumerate(names)}
      shape = (block_kv, block_q)
      bc_k = lambda x: lax.broadcast_in_dim(x, shape, [0])
      bc_q = lambda x: lax.broadcast_in_dim(x, shape, [1])

      def dq_part(j, half):
        """This tile's dQ[:, half] = Σ_w dSᵀ_w · K_w[:, half], into shared memory."""
        cols = pl.ds(half * dh, dh)
        acc = _cast(interpret, jnp.zeros((block_q, dh), jnp.float32), plgpu.Layout.WGMMA)
        for w in range(2):
          acc = _mma(acc, _transposed(ds_smem.at[w], interpret), k_smem2.at[w, :, cols],
                     interpret)
        plgpu.barrier_arrive(ds_free)  # both dS tiles read
        slot2 = lax.rem(j, jnp.array(2, j.dtype))
        # The memory warpgroup frees a slot once it has added the dQ tile it held.
        pl.when(j >= 2)(lambda: plgpu.barrier_wait(dq_free.at[slot2]))
        dq_smem.at[slot2, half][...] = acc

      def step(j, carry, masked):
        dk_acc, dv_acc, part = carry
        slot = lax.rem(j, jnp.array(stages, j.dtype))
        plgpu.barrier_wait(q_bar.at[slot])
        st = _mm(shape, k_smem, q_smem.at[slot], interpret=interpret)
        plgpu.barrier_wait(qv_bar.at[slot])
        lse = _load(qv_smem.at[slot, 0], col_l, interpret)
        delta = _load(qv_smem.at[slot, 1], col_l, interpret)
        pbar = _load(qv_smem.at[slot, 2], col_l, interpret)
        n_load = len(names) if masked else 1
        qrow = [_load(qv_smem.at[slot, i + 3], col_l, interpret) for i in range(n_load)]
        dg = bc_q(qrow[0]) - bc_k(krow["g"])
        pen = dg * dg
        st = st * scale_log2 - pen
        if masked:
          rq = {nm: functools.partial(bc_q, qrow[i + 1]) for i, nm in enumerate(names[1:])}
          rk = {nm: functools.partial(bc_k, krow[nm]) for nm in names[1:]}
          st = _apply_mask(st, rq, rk, spec)
        pt = jnp.exp2(st - bc_q(lse))
        plgpu.barrier_wait(do_bar.at[slot])
        dv_acc = _mma(dv_acc, pt.astype(dtype), do_smem.at[slot], interpret)
        dpt = _mm(shape, v_smem, do_smem.at[slot], interpret=interpret)
        plgpu.barrier_arrive(do_free.at[slot])
        dst = pt * (dpt - bc_q(delta))
        part = part + (pt * dpt * (pen - bc_q(pbar))).sum(axis=1)
        ds16 = dst.astype(dtype)
        if fused:
          # One dS buffer: both warpgroups must have finished the previous step's dQ product.
          pl.when(j >= 1)(lambda: plgpu.barrier_wait(ds_free))
          ds_smem.at[wg][...] = ds16
          plgpu.commit_smem()
          plgpu.barrier_arrive(ds_ready)
        dk_acc = _mma(dk_acc, ds16, q_smem.at[slot], interpret)
        plgpu.barrier_arrive(q_free.at[slot])
        if fused:
          plgpu.barrier_wait(ds_ready)
          for half in range(2):
            pl.when(wg == half)(functools.partial(dq_part, j, half))
          plgpu.commit_smem()
          plgpu.barrier_arrive(dq_ready.at[lax.rem(j, jnp.array(2, j.dtype))])
        return dk_acc, dv_acc, part

      zeros = lambda: _cast(interpret, jnp.zeros((block_kv, d), jnp.float32),
                                        plgpu.Layout.WGMMA)
      part = _cast(interpret, jnp.zeros((block_kv,), jnp.float32), row_l)
      carry = (zeros(), zeros(), part)
      carry = lax.fori_loop(0, n_p, functools.partial(step, masked=True), carry)
      dk_acc, dv_acc, part = lax.fori_loop(n_p, steps, functools.partial(step, masked=False),
                                           carry)
      if fused:  # Observe the last frees: the accumulators are complete after them.
        pl.when(steps > 0)(lambda: plgpu.barrier_wait(ds_free))

        def last_free(j, _):
          plgpu.barrier_wait(dq_free.at[lax.rem(j, jnp.array(2, j.dtype))])
          return _
        lax.fori_loop(jnp.maximum(steps - 2, 0), steps, last_free, None)
      k_smem[...] = dk_acc.astype(dtype)
      v_smem[...] = dv_acc.astype(dtype)
      part_smem2.at[wg][...] = part
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[bi, rows, hi])
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[bi, rows, hi])
      plgpu.copy_smem_to_gmem(part_smem2.at[wg], part_ref.at[bi, hi, rows])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      def issue_q(j, slot):
        qb = ord_ref[bi, hc, ti, j]
        rows = pl.ds(qb * block_q, block_q)
        plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi], q_smem.at[slot], q_bar.at[slot])
        plgpu.copy_gmem_to_smem(qv_ref.at[bi, hi, :, rows], qv_smem.at[slot], qv_bar.at[slot])

      def issue_do(j, slot):
        qb = ord_ref[bi, hc, ti, j]
        rows = pl.ds(qb * block_q, block_q)
        plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, hi], do_smem.at[slot], do_bar.at[slot])

      def add_dq(j):
        """Adds step j's dQ tile into its accumulator, in the order dq_schedule fixed."""
        if not fused:
          return
        slot2 = lax.rem(j, jnp.array(2, j.dtype))
        qb = ord_ref[bi, hc, ti, j]
        info = info_ref[bi, hc, ti, j]
        rank = info & _RANK_MASK
        cls = (info >> _CLS_SHIFT) & 1
        last = ((info >> _LAST_SHIFT) & 1) == 1
        plgpu.barrier_wait(dq_ready.at[slot2])
        rows = pl.ds(qb * block_q, block_q)
        if interpret:
          # No semaphores or TMA reductions in the interpreter, which runs one CTA at a time
          # in grid order: the same per-class order, so a read-add-write is exact here.
          for half in range(2):
            dst = dq_ref.at[cls, bi, rows, hi, pl.ds(half * dh, dh)]
            prev = jnp.where(rank > 0, dst[...], 0.0)
            dst[...] = prev + dq_smem.at[slot2, half][...]
        else:
          sem = sems.at[((cls * b + bi) * h + hi) * (nq // block_q) + qb]
          pl.when((rank > 0) & last)(
              lambda: pl.semaphore_wait(sem, rank, decrement=True))
          pl.when((rank > 0) & ~last)(
              lambda: pl.semaphore_wait(sem, rank, decrement=False))
          for half in range(2):
            dst = dq_ref.at[cls, bi, rows, hi, pl.ds(half * dh, dh)]
            src = dq_smem.at[slot2, half]
            pl.when(rank == 0)(lambda: plgpu.copy_smem_to_gmem(src, dst))
            pl.when(rank > 0)(lambda: plgpu.copy_smem_to_gmem(src, dst, reduction_op="add"))
          # Complete (not only read) before the next contributor may add on top.
          plgpu.wait_smem_to_gmem(0)
          pl.when(~last)(lambda: pl.semaphore_signal(sem, 1))
        plgpu.barrier_arrive(dq_free.at[slot2])

      if fused and not interpret:
        sems = pl.get_global(plgpu.SemaphoreType.REGULAR((2 * b * h * (nq // block_q),)))

      for i in range(stages):
        @pl.when(i < steps)
        def _prologue():
          issue_q(i, i)
          issue_do(i, i)

      def refill(j, _):
        slot = lax.rem(j, jnp.array(stages, j.dtype))
        plgpu.barrier_wait(do_free.at[slot])
        issue_do(j, slot)
        plgpu.barrier_wait(q_free.at[slot])
        issue_q(j, slot)
        add_dq(j - stages)
        return _

      lax.fori_loop(stages, steps, refill, None)

      # Observe the last releases too, so every barrier phase is waited on before exit.
      def drain(j, _):
        slot = lax.rem(j, jnp.array(stages, j.dtype))
        plgpu.barrier_wait(q_free.at[slot])
        plgpu.barrier_wait(do_free.at[slot])
        add_dq(j)
        return _

      lax.fori_loop(jnp.maximum(steps - stages, 0), steps, drain, None)

  tiling = plgpu.TilingTransform((8, 64))
  swizzle = plgpu.SwizzleTransform(128)
  scratch = [
      plgpu.SMEM((2, block_kv, d), dtype, transforms=(tiling, swizzle)),
      plgpu.SMEM((2, block_kv, d), dtype, transforms=(tiling, swizzle)),
      plgpu.SMEM((2, nkr, block_kv), jnp.float32),
      plgpu.SMEM((2, block_kv), jnp.float32),
      plgpu.SMEM((stages, block_q, d), dtype, transforms=(tiling, swizzle)),
      plgpu.SMEM((stages, block_q, d), dtype, transforms=(tiling, swizzle)),
      plgpu.SMEM((stages, nqr, block_q), jnp.float32),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),
  ]
  out_type = [jax.ShapeDtypeStruct((b, nk, h, d), dtype),
              jax.ShapeDtypeStruct((b, nk, h, d), dtype),
              jax.ShapeDtypeStruct((b, h, nk), jnp.float32)]
  args = [q, k, v, do, qvec, kvec, order, n_part, n_full]
  if fused:
    f32_tiling = plgpu.TilingTransform((8, 32))  # 32 fp32 = the 128-byte swizzle span
    scratch += [
        plgpu.SMEM((2, block_kv, block_q), dtype, transforms=(tiling, swizzle)),
        plgpu.SMEM((2, 2, block_q, dh), jnp.float32, transforms=(f32_tiling, swizzle)),
        plgpu.Barrier(num_arrivals=2),
        plgpu.Barrier(num_arrivals=2),
        plgpu.Barrier(num_arrivals=2, num_barriers=2),
        plgpu.Barrier(num_barriers=2),
    ]
    out_type.append(jax.ShapeDtypeStruct((2, b, nq, h, d), jnp.float32))
    args.append(dq_info)
  kernel = plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch,
      grid=(h, n_tiles, b), grid_names=("h", "t", "b"),
      num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=_interpret_params(interpret))
  return kernel(*args)


# ----------------------------------------------------------------------------------------------
# Backend contract.
# ----------------------------------------------------------------------------------------------


def _blocks(block_sizes, head_dim, interpret=False):
  unknown = set(block_sizes) - set(_DEFAULT_BLOCKS)
  if unknown:
    raise TypeError(f"pallas_gpu got unknown block sizes {sorted(unknown)}; "
                    f"expected some of {sorted(_DEFAULT_BLOCKS)}")
  cfg = dict(_DEFAULT_BLOCKS)
  if head_dim <= 64:
    cfg.update(_DEFAULT_BLOCKS_SMALL_D)
  if interpret:
    cfg.update(_DEFAULT_BLOCKS_INTERPRET)
  cfg.update({k: int(v) for k, v in block_sizes.items() if v is not None})
  for name, val in cfg.items():
    if name.startswith("block") and (val % 64 or val <= 0):
      raise ValueError(f"pallas_gpu block size {name}={val} must be a positive multiple of 64")
    if name == "fused_bwd" and val not in (0, 1):
      raise ValueError(f"pallas_gpu fused_bwd={val} must be 0 or 1")
    if name.startswith("num_stages") and val < 1:
      raise ValueError(f"pallas_gpu {name}={val} must be >= 1")
  return cfg


def _multiples(cfg):
  q_mult = math.lcm(2 * cfg["block_q"], 2 * cfg["block_q_dq"], cfg["block_q_dkv"])
  k_mult = math.lcm(cfg["block_kv"], cfg["block_kv_dq"], 2 * cfg["block_kv_dkv"])
  return q_mult, k_mult


def forward(q, k, v, t_q, t_k, sigma, *, scale, spec, q_segment_ids, kv_segment_ids,
            interpret=False, return_aux=False, **block_sizes):
  """Backend contract forward: (out [B, Nq, H, D] q.dtype, lse [B, H, Nq] float32, natural log).

  With ``return_aux`` also pen̄ [B, H, Nq] (the residual the fused backward needs).
  """
  cfg = _blocks(block_sizes, q.shape[-1], interpret)
  q_mult, k_mult = _multiples(cfg)
  prep = _Prep(q, k, t_q, t_k, sigma, scale, spec, q_segment_ids, kv_segment_ids,
               q_mult=q_mult, k_mult=k_mult)
  codes = prep.codes(2 * cfg["block_q"], cfg["block_kv"])
  order, n_part, n_full = block_lists(codes)
  qp = _pad_rows(q, prep.nq_p)
  kp = _pad_rows(k, prep.nk_p)
  vp = _pad_rows(v, prep.nk_p)
  with_pbar = return_aux and _fused(cfg, prep.d)
  res = _fwd_call(qp, kp, vp, prep.qvec, prep.kvec, order, n_part, n_full,
                  scale_log2=prep.scale_log2, spec=spec, block_q=cfg["block_q"],
                  block_kv=cfg["block_kv"], num_stages=cfg["num_stages"],
                  head_codes=codes.shape[1] > 1, interpret=interpret, fence=cfg["fence"],
                  with_pbar=with_pbar)
  out = res[0][:, :prep.nq]
  lse = res[1][:, :, :prep.nq] * LN2
  if not return_aux:
    return out, lse
  return out, lse, (res[2][:, :, :prep.nq] if with_pbar else None)


def _fused(cfg, d):
  """Whether the backward runs as one kernel (dQ accumulated in order) or as two."""
  return bool(cfg["fused_bwd"]) and d % 128 == 0


def backward(q, k, v, t_q, t_k, sigma, out, lse, dout, *, scale, spec, q_segment_ids,
             kv_segment_ids, interpret=False, aux=None, **block_sizes):
  """Backend contract backward: (dq, dk, dv, dsigma [H] float32).

  ``aux`` is the forward's pen̄ (``forward(..., return_aux=True)``). With it (and a head dim
  that is a multiple of 128) the backward is one kernel; without it a dQ kernel first
  computes dQ and pen̄, then the dK/dV kernel runs (S and dP are computed twice).
  """
  cfg = _blocks(block_sizes, q.shape[-1], interpret)
  q_mult, k_mult = _multiples(cfg)
  prep = _Prep(q, k, t_q, t_k, sigma, scale, spec, q_segment_ids, kv_segment_ids,
               q_mult=q_mult, k_mult=k_mult)
  b, h, nq, nk = prep.b, prep.h, prep.nq, prep.nk
  # Rows with no visible key have lse = −inf; +inf makes their p = exp2(s − lse) exactly 0.
  lse2 = jnp.where(jnp.isfinite(lse), lse * LOG2E, jnp.inf).astype(jnp.float32)
  delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), dout.astype(jnp.float32))
  pad_q = prep.nq_p - nq
  lse2 = jnp.pad(lse2, [(0, 0), (0, 0), (0, pad_q)], constant_values=jnp.inf)
  delta = jnp.pad(delta, [(0, 0), (0, 0), (0, pad_q)])
  qp, dop = _pad_rows(q, prep.nq_p), _pad_rows(dout.astype(q.dtype), prep.nq_p)
  kp, vp = _pad_rows(k, prep.nk_p), _pad_rows(v, prep.nk_p)
  kw = dict(scale_log2=prep.scale_log2, spec=spec, interpret=interpret)
  fused = aux is not None and _fused(cfg, prep.d)

  if fused:
    pbar = jnp.pad(aux.astype(jnp.float32), [(0, 0), (0, 0), (0, pad_q)])
  else:
    qvec_b = jnp.concatenate([lse2[:, :, None], delta[:, :, None], prep.qvec], axis=2)
    codes_q = prep.codes(2 * cfg["block_q_dq"], cfg["block_kv_dq"])
    order, n_part, n_full = block_lists(codes_q)
    dq, pbar = _dq_call(qp, kp, vp, dop, qvec_b, prep.kvec, order, n_part, n_full,
                        block_q=cfg["block_q_dq"], block_kv=cfg["block_kv_dq"],
                        num_stages=cfg["num_stages_bwd"], head_codes=codes_q.shape[1] > 1,
                        **kw)

  codes_k = prep.codes(cfg["block_q_dkv"], 2 * cfg["block_kv_dkv"])
  qvec_k = jnp.concatenate([lse2[:, :, None], delta[:, :, None], pbar[:, :, None], prep.qvec],
                           axis=2)
  common_kw = dict(block_q=cfg["block_q_dkv"], block_kv=cfg["block_kv_dkv"],
                   num_stages=cfg["num_stages_bwd"], head_codes=codes_k.shape[1] > 1, **kw)
  if fused:
    order, n_part, n_full, info, has = dq_schedule(codes_k)
    dk, dv, part, dq_acc = _dkv_call(qp, kp, vp, dop, qvec_k, prep.kvec, order, n_part,
                                     n_full, dq_info=info, **common_kw)
    # Blocks a class got no contribution from were never written: select, do not add.
    has = jnp.repeat(has, cfg["block_q_dkv"], axis=-1)[..., :nq]  # [2, B, Hc, Nq]
    has = jnp.swapaxes(has, 2, 3)[..., None]  # [2, B, Nq, Hc, 1]; Hc is 1 or H
    dq_acc = dq_acc[:, :, :nq]
    dq = jnp.where(has[0], dq_acc[0], 0.0) + jnp.where(has[1], dq_acc[1], 0.0)
    dq = (dq * scale).astype(q.dtype)
  else:
    order, n_part, n_full = block_lists(jnp.swapaxes(codes_k, 2, 3))
    dk, dv, part = _dkv_call(qp, kp, vp, dop, qvec_k, prep.kvec, order, n_part, n_full,
                             **common_kw)
    dq = (dq[:, :nq].astype(jnp.float32) * scale).astype(q.dtype)
  dk = dk[:, :nk].astype(jnp.float32) * scale
  dv = dv[:, :nk].astype(jnp.float32)
  rep = h // prep.hkv
  if rep > 1:
    dk = dk.reshape(b, nk, prep.hkv, rep, prep.d).sum(axis=3)
    dv = dv.reshape(b, nk, prep.hkv, rep, prep.d).sum(axis=3)
  # The kernel's pen is in log2 units: pen_log2 = pen·log2(e).
  dsig_partial = jnp.sum(part[:, :, :nk], axis=(0, 2)) * (1.0 / LOG2E)
  dsigma = common.dsigma_from_partial(dsig_partial, sigma)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), dsigma.astype(jnp.float32)
