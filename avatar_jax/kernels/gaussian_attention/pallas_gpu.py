"""Gaussian time-distance attention: Pallas Mosaic-GPU kernels for Hopper (sm_90a).

Implements the backend contract of :mod:`common` (``forward`` / ``backward``).

Design (docs/notes/attention_gpu.md gives the reasons and the current numbers):

* Forward: persistent, one CTA per multiprocessor walking (batch, head, query tile) items.
  A CTA = 3 warpgroups. Warpgroups 0 and 1 each own ``block_q`` query rows of the item (a
  tile is ``2·block_q`` rows); warpgroup 2 only issues TMA copies of K, V and the per-key
  vectors into a ``num_stages``-deep shared-memory ring that runs across items. Q·Kᵀ and P·V
  run on wgmma with fp32 accumulators, Q and P from registers; the two compute warpgroups take
  turns on the tensor cores through two hardware named barriers (each waits on its own before
  P·V and signals the other's after issuing Q·Kᵀ), so one's exponentials overlap the other's
  matmuls; the wait for the next K tile is issued while the P·V product runs. Ring slots go
  back to the memory warpgroup through hardware barriers as well.
* The Gaussian term is folded into per-position vectors: with g_h = sqrt(log2(e) / (2σ_h²)),
  ``(t_q − t_k)²·log2(e)/(2σ_h²) = (g_h·t_q − g_h·t_k)²``, so the kernel needs one float per
  query row and one per key column and never sees σ. The backward kernels work with logits
  in the log2 domain (``q·k·c − d²``, c = scale·log2(e)). The forward divides the coordinates
  by sqrt(c) instead, so its logits stay in q·k units (``q·k − d'²``: no multiply by the scale)
  and ``exp2(c·s − c·m)`` is one fused multiply-add per logit, as in FlashAttention.
* Skipping: block codes from :func:`common.block_codes` (per CTA query tile × key block) are
  turned into a per-tile list of key blocks, partially visible blocks first, then fully visible
  ones; skipped blocks are absent. The kernel runs a masked loop over the first part and an
  unmasked loop over the rest, so fully visible blocks pay nothing for masks.
* Backward: delta = rowsum(dO·O) in XLA, then two kernels with the same structure: dK/dV/dσ
  (CTA owns 2·block_kv keys, streams query blocks) and dQ (CTA owns 2·block_q queries, streams
  key blocks). Independent products are issued in pairs with one wait (Sᵀ and dPᵀ, then dV
  and dK; S and dP). No atomics: dσ partial sums are written per (batch, head, key row) and
  summed outside. The dQ kernel also returns pen̄ (the P-weighted mean of each query row's
  Gaussian term), which keeps dσ free of the cancellation in Σ_j dS_ij = 0. The backward's
  ring releases use mbarriers. For grouped heads a dK/dV CTA streams the query blocks of
  every query head of its K/V head, so dK/dV are summed over the group in its fp32
  accumulators.

All block sizes are multiples of 64 (wgmma/TMA tiling). Sequence lengths need not be: the
per-position vectors (times, segment ids) are padded up to the tiles outside the kernels
(padded keys get segment id −1, so they are masked; padded query rows get lse = +inf in the
backward, so their P is 0), while q/k/v/dout are used as they are when their length is a
multiple of 8: TMA fills rows past the end with zeros on load and drops them on store, so no
copy of the operands is made (other lengths are padded to the next multiple of 8, which TMA's
8-row tiles need). The interpreter clamps out-of-range slices instead, so under
``interpret=True`` the operands are padded to whole tiles.

Interpret mode (``interpret=True``) runs the same kernels under Mosaic GPU's CPU interpreter
(jax >= 0.10): same grid, warpgroups, TMA copies, barriers and loops, with mbarriers where the
compiled forward uses hardware barriers (the interpreter has none). It also has no
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
import numpy as np

from avatar_jax.kernels.gaussian_attention import common

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
_M_INIT = -1e30  # Finite running-max start: exp2(m_old − m_new) never sees inf − inf.

# Tuning knobs (defaults measured on an H200; docs/notes/attention_gpu_runs.md has every run):
# block_* / num_stages*: tile sizes and the depth of the shared-memory ring; head dims <= 64
# use taller query tiles (fewer CTAs, whose fill and drain are otherwise exposed when Nk is
# short). regs / regs_bwd: registers per thread of each compute warpgroup (the memory
# warpgroup gets 504 − 2·regs). sm_margin: multiprocessors the persistent forward leaves free
# for a concurrent collective (the context ring's transfers).
# Options (0 or 1):
# affine_k: the forward's fully visible steps over key blocks on a regular time grid form the
# Gaussian term from the block's line fit (g_0, δ) with immediate column offsets instead of
# loading a key vector from shared memory every step; other blocks keep the per-key vector.
# 0 runs every block the per-key way (the reference the line fit is tested against).
# l_mma: when the caller needs no float32 lse (forward(exact_lse=False): inference through the
# API), the forward's row sums ride with P·V on the tensor cores (one FP32 add per logit less).
# Under differentiation it stays off: bf16 row sums move lse by up to ~2⁻⁹, which dσ cannot
# afford.
_DEFAULT_BLOCKS = dict(block_q=64, block_kv=128, num_stages=2, regs=240, regs_bwd=240,
                       affine_k=1, l_mma=1,
                       block_q_dq=64, block_kv_dq=128, block_q_dkv=64, block_kv_dkv=64,
                       num_stages_bwd=2, sm_margin=0)
_SWITCHES = ("affine_k", "l_mma")  # 0 or 1
# Head dims the kernel takes. Its tiles at d = 192 and 256 ask for 305 and 404 KB of shared
# memory (forward, default tiles; Mosaic GPU's own count when lowering for CUDA), over the
# 227 KB a Hopper CTA has, so `auto` sends those to XLA (tests/test_gaussian_attention.py lowers
# both passes for CUDA at every dim listed here).
HEAD_DIMS = (64, 128)
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


_TMA_ROWS = 8  # rows of the (8, 64) shared-memory tiles: TMA needs row counts that divide by it
_SCHED_BAR = 8  # hardware barriers 8 and 9; Mosaic GPU itself uses the low ids
_FREE_BAR = 10  # the forward's ring releases: hardware barriers 10 .. 15


def _named_barrier(op, bar_id, n_threads):
  """``bar.sync`` / ``bar.arrive`` on hardware barrier ``bar_id`` (a warpgroup-uniform int32).

  Cheaper than an mbarrier (no shared-memory atomics, no polling loop), and ``arrive`` does
  not block, which is what lets the forward's warpgroups hand turns over one way.
  """
  _, plgpu = _plgpu()
  from jax._src.lib.mlir import ir  # pylint: disable=g-import-not-at-top
  from jax._src.lib.mlir.dialects import llvm  # pylint: disable=g-import-not-at-top

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WG_SPLAT,))
  def emit(_, bar):
    llvm.inline_asm(ir.Type.parse("!llvm.void"), [bar.registers[()]],
                    f"bar.{op} $0, {n_threads};", "r", has_side_effects=True)

  emit(jnp.asarray(bar_id, jnp.int32))


def _turns(wg, sched_bar, named):
  """(give, take, begin, end): two compute warpgroups taking turns on the tensor cores.

  named: take() before a warpgroup's turn waits until the other one has called give(), i.e.
  has issued its own products; give() does not block (hardware barriers _SCHED_BAR + wg).
  Otherwise all four arrive at and wait on the shared mbarrier ``sched_bar`` (lockstep). The
  loops give after their first product and take before their second (G T G T ...), so begin()
  makes warpgroup 1 take once more before its loop (warpgroup 0 goes first) and end() makes
  warpgroup 0 give once more after its loop, which balances the counts whatever the step
  counts.
  """
  pl, plgpu = _plgpu()
  if named:
    give = lambda: _named_barrier("arrive", _SCHED_BAR + 1 - wg, 256)
    take = lambda: _named_barrier("sync", _SCHED_BAR + wg, 256)
  else:
    def give():
      plgpu.barrier_arrive(sched_bar)
      plgpu.barrier_wait(sched_bar)
    take = give
  return give, take, lambda: pl.when(wg == 1)(take), lambda: pl.when(wg == 0)(give)


def _ring_free(free_refs, stages, named):
  """(release(slot), wait(slot)) per ring operand: the two compute warpgroups release a slot
  once they have read it; the memory warpgroup waits for both releases before refilling it.

  free_refs: one mbarrier array [stages] (2 arrivals) per operand. named: hardware barriers
  instead (operand o, slot s → _FREE_BAR + o·stages + s; 2·128 arriving + 128 syncing
  threads). A slot is released once per fill and refilled only after its wait, so arrivals
  of consecutive fills never meet on one barrier.
  """
  _, plgpu = _plgpu()
  if not named:
    return [(lambda slot, f=f: plgpu.barrier_arrive(f.at[slot]),
             lambda slot, f=f: plgpu.barrier_wait(f.at[slot])) for f in free_refs]
  assert _FREE_BAR + len(free_refs) * stages <= 16, stages  # checked in _blocks
  bar = lambda o, slot: _FREE_BAR + o * stages + slot
  return [(lambda slot, o=o: _named_barrier("arrive", bar(o, slot), 384),
           lambda slot, o=o: _named_barrier("sync", bar(o, slot), 384))
          for o in range(len(free_refs))]


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


def position_vectors(t, seg, g, spec: common.MaskSpec, *, keys: bool, t_ref, extra=()):
  """Per-position float32 vectors the kernels read: [B, H, R, N].

  t [B, N] float32 raw times, seg [B, N] int32 normalised ids, g [H] = sqrt(log2e·inv_h),
  t_ref [B, 1] the reference time both sides share. Row 0: g_h·(t − t_ref) (Gaussian
  coordinate; t_ref keeps magnitudes small). Then, in the order of :func:`_mask_rows`: raw
  time, block index (+ look-ahead on the query side), segment id as float (invalid keys → NaN,
  which equals nothing). Then the rows of `extra` ([B, H, N] each). One array built in one go,
  which XLA emits as one fusion.
  """
  b, n = t.shape
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
  return jnp.stack(rows + list(extra), axis=2).astype(jnp.float32)


# affine_k: key blocks whose Gaussian coordinates lie on a line, g_j = g_0 + j·δ (any regular
# time grid: video frames, audio tokens, latent frames), let the forward's unmasked steps form
# g_q − g_j from two numbers per block, with the column offsets j as instruction immediates
# (_pen_affine), instead of loading a key vector from shared memory every step.
_AFFINE_ULPS = 2.0 ** -20  # fit tolerance relative to the block's largest |t − t_ref|: 8 ulps


def affine_keys(t_k, t_ref, block_kv):
  """Line fits of the key times per block (they do not depend on σ).

  t_k [B, Nk] float32 (Nk % block_kv == 0), t_ref [B, 1] the Gaussian coordinates' reference
  time. Returns (dt [B, Nk // block_kv]: the step of the block's line, ok [B, Nk // block_kv]
  bool: every time of the block within _AFFINE_ULPS·max|t − t_ref| of t_0 + j·dt). The kernels'
  own float32 coordinates g·(t − t_ref) carry errors of a few ulps, which this tolerance
  matches; the line of a head's coordinates is then g_0 + j·(g_h·dt) with g_0 its first one.
  """
  b, n = t_k.shape
  blk = (t_k - t_ref).reshape(b, n // block_kv, block_kv)
  dt = (blk[..., -1] - blk[..., 0]) / max(block_kv - 1, 1)
  j = jnp.arange(block_kv, dtype=jnp.float32)
  resid = jnp.max(jnp.abs(blk - (blk[..., :1] + j * dt[..., None])), axis=-1)
  return dt, resid <= _AFFINE_ULPS * jnp.max(jnp.abs(blk), axis=-1)


def affine_items(ok, order, n_part, n_full):
  """[B, Hc, nT] int32: 1 where every fully visible block of the item (b, head codes, query
  tile) is affine (ok [B, nB]; order/n_part/n_full from :func:`block_lists`)."""
  hit = jnp.take_along_axis(jnp.broadcast_to(ok[:, None, None, :], order.shape), order, axis=-1)
  pos = jnp.arange(order.shape[-1])
  full = (pos >= n_part[..., None]) & (pos < (n_part + n_full)[..., None])
  return jnp.all(jnp.where(full, hit, True), axis=-1).astype(jnp.int32)


def _pen_affine(s, r, delta, interpret):
  """s − (r_i − j·δ)² for logits s [rows, N] (WGMMA layout), r [rows] (row layout) and the
  scalar δ, with j the column. Compiled, the column offsets are immediates: register
  (r0, n, ., ., hf) of the WGMMA layout holds columns 8·n + 2·(lane % 4) + {0, 1}, so
  (r − 2·(lane % 4)·δ) − (8·n + {0, 1})·δ is one fused multiply-add per logit, then one more
  for the square."""
  if interpret:
    cols = jnp.arange(s.shape[1], dtype=jnp.float32) * delta
    dg = r[:, None] - cols[None, :]
    return s - dg * dg
  _, plgpu = _plgpu()
  from jax.experimental.mosaic import gpu as mgpu  # pylint: disable=g-import-not-at-top
  from jax._src.lib.mlir import ir  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from jax._src.lib.mlir.dialects import arith, math as mlir_math, vector

  def scalar(x):
    if isinstance(x.type, ir.VectorType):
      return vector.extract(x, dynamic_position=[],
                            static_position=ir.DenseI64ArrayAttr.get([0]))
    return x

  @plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WG_SPLAT),
      return_type=plgpu.ShapeDtypeStruct(s.shape, jnp.float32, layout=plgpu.Layout.WGMMA))
  def pen(_, s, r, delta):
    f32 = ir.F32Type.get()
    i32 = ir.IntegerType.get_signless(32)
    pair = ir.VectorType.get((2,), f32)
    quad = arith.uitofp(f32, arith.remui(mgpu.utils.thread_idx(), mgpu.utils.c(4, i32)))
    d = scalar(delta.registers[()])
    neg_d = vector.broadcast(pair, arith.negf(d))
    shift = arith.mulf(quad, arith.addf(d, d))  # 2·(lane % 4)·δ
    assert s.registers.ndim == 9 and s.registers.shape[4] == 2, s.registers.shape
    bases = {}
    regs = np.empty_like(s.registers)
    for idx in np.ndindex(s.registers.shape):
      row = (idx[0], idx[4])
      if row not in bases:
        rr = scalar(r.registers[(idx[0], 0, idx[4], 0, 0)])
        bases[row] = vector.broadcast(pair, arith.subf(rr, shift))
      cols = arith.constant(pair, ir.DenseElementsAttr.get(
          np.array([8 * idx[1], 8 * idx[1] + 1], np.float32), type=pair))
      dg = mlir_math.fma(cols, neg_d, bases[row])
      regs[idx] = mlir_math.fma(arith.negf(dg), dg, s.registers[idx])
    return mgpu.FragmentedArray(_registers=regs, _layout=s.layout, _is_signed=None)

  return pen(s, r, delta)


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


def full_lists(shape):
  """block_lists of codes [B, Hc, nT, nB] that are all FULL, as NumPy constants: with no mask,
  no segment ids and no padding every block is fully visible, and nothing needs computing."""
  order = np.broadcast_to(np.arange(shape[-1], dtype=np.int32), shape).copy()
  return order, np.zeros(shape[:3], np.int32), np.full(shape[:3], shape[-1], np.int32)


def counts(*rows):
  """Per-item int32 counts ([B, Hc, nT] each: partially visible steps, fully visible steps,
  line-fit flag) as one kernel operand [rows, B, Hc, nT]; NumPy in, NumPy out, so constant
  lists stay one constant (XLA would re-materialise each splat array on every call)."""
  if all(isinstance(r, np.ndarray) for r in rows):
    return np.stack(rows).astype(np.int32)
  return jnp.stack([jnp.asarray(r, jnp.int32) for r in rows])


def _grouped_lists(codes, h, rep):
  """Per-head codes [B, Hc, nT, nB] → per-K/V-head codes [B, H/rep, nT, rep·nB] over
  (query head r, block) pairs, entry r·nB + block (Hc = 1: every head has the same codes)."""
  b, _, n_t, n_b = codes.shape
  codes = jnp.broadcast_to(codes, (b, h, n_t, n_b)).reshape(b, h // rep, rep, n_t, n_b)
  return jnp.swapaxes(codes, 2, 3).reshape(b, h // rep, n_t, rep * n_b)


def _pad_rows(x, n_to, interpret):
  """Zero-pads axis 1 of x to n_to under the interpreter. Compiled kernels read x as it is
  (TMA zero-fills the rows past its end) if its length is a multiple of the shared-memory
  tiles' 8 rows, which TMA needs; otherwise it is padded to the next multiple of 8."""
  if not interpret:
    n_to = common.round_up(x.shape[1], _TMA_ROWS)
  if x.shape[1] == n_to:
    return x
  return jnp.pad(x, [(0, 0), (0, n_to - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


class _Prep:
  """Everything both passes derive from the arguments (shapes are static)."""

  def __init__(self, q, k, t_q, t_k, sigma, scale, spec, q_seg, kv_seg, *, q_mult, k_mult,
               qk_units=False):
    self.b, self.nq, self.h, self.d = q.shape
    self.nk, self.hkv = k.shape[1], k.shape[2]
    if self.h % self.hkv:
      raise ValueError(f"q has {self.h} heads and k/v {self.hkv}: expected H % Hkv == 0")
    if self.d not in HEAD_DIMS:
      raise ValueError(f"pallas_gpu takes head dims {HEAD_DIMS}, got {self.d}: at 192 and 256 its "
                       "tiles exceed a Hopper CTA's 227 KB of shared memory; use "
                       "implementation='xla' or 'auto' (which picks XLA there)")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"pallas_gpu needs bfloat16 or float16 q/k/v, got {q.dtype}")
    if not float(scale) > 0:
      raise ValueError(f"pallas_gpu needs a positive logit scale, got {scale!r}")
    self.spec = spec
    self.nq_p = common.round_up(self.nq, q_mult)
    self.nk_p = common.round_up(self.nk, k_mult)
    # Statically all visible: no mask, no segment ids (None), no padded rows.
    self.all_full = (q_seg is None and kv_seg is None and self.nq_p == self.nq
                     and self.nk_p == self.nk and spec == common.MaskSpec())
    q_seg, kv_seg = common.normalise_segment_ids(q_seg, kv_seg, self.b, self.nq, self.nk)
    tq, tk, qs, ks = common.pad_inputs(t_q, t_k, q_seg, kv_seg, self.nq_p, self.nk_p)
    self.tq, self.tk, self.qs, self.ks = tq, tk, qs, ks
    self.inv = common.inv_two_sigma_sq(sigma)  # [H]
    self.scale_log2 = float(scale) * LOG2E
    # Gaussian coordinate: (g·t_q − g·t_k)² is the Gaussian term in log2 units, or in q·k
    # units (divided by scale·log2 e) for the forward kernel.
    g = jnp.sqrt(self.inv * (LOG2E / self.scale_log2 if qk_units else LOG2E))
    # A common reference time for both sides, the middle of their joint span, keeps |g·t| (and
    # so the float32 rounding of each coordinate) smallest without changing differences.
    t_lo = jnp.minimum(jnp.min(tq, axis=1, keepdims=True), jnp.min(tk, axis=1, keepdims=True))
    t_hi = jnp.maximum(jnp.max(tq, axis=1, keepdims=True), jnp.max(tk, axis=1, keepdims=True))
    t0 = 0.5 * (t_lo + t_hi)
    self.g, self.t_ref = g, t0
    self.qvec = position_vectors(tq, qs, g, spec, keys=False, t_ref=t0)
    self.kvec = position_vectors(tk, ks, g, spec, keys=True, t_ref=t0)

  def kvec_affine(self, block_kv):
    """(kvec with one more row, g_h·dt of each key's block line; ok [B, nk_p/block_kv]): the
    key vectors the affine steps read (see :func:`affine_keys`)."""
    dt, ok = affine_keys(self.tk, self.t_ref, block_kv)
    step = self.g[None, :, None] * jnp.repeat(dt, block_kv, axis=1)[:, None]
    return position_vectors(self.tk, self.ks, self.g, self.spec, keys=True, t_ref=self.t_ref,
                            extra=(step,)), ok  # [B, H, R + 1, Nk]

  def lists(self, q_block, k_block, *, keys_major=False, rep=1):
    """(order, n_part, n_full) of the block pairs (q_block × k_block) for the kernels:
    per query tile over key blocks, or (keys_major) per key tile over query blocks, grouped
    over the rep query heads of a K/V head when rep > 1 (see :func:`_grouped_lists`)."""
    if self.all_full:
      n_q, n_k = self.nq_p // q_block, self.nk_p // k_block
      n_t, n_b = (n_k, n_q) if keys_major else (n_q, n_k)
      return full_lists((self.b, self.h // rep if rep > 1 else 1, n_t, rep * n_b))
    codes = self.codes(q_block, k_block)
    if keys_major:
      codes = jnp.swapaxes(codes, 2, 3)
    return block_lists(_grouped_lists(codes, self.h, rep) if rep > 1 else codes)

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


def _mma(acc, a, b_ref, interpret, after_issue=None):
  """acc + a @ b on the tensor cores (acc fp32 registers, a registers or SMEM, b SMEM);
  `after_issue` runs while the product is in flight."""
  return _mma_group([(acc, a, b_ref, False)], interpret, after_issue)[0]


def _mm(shape, a, b_ref, *, interpret, transpose_b=True, after_issue=None):
  """a @ bᵀ (or a @ b) into a fresh fp32 accumulator; `after_issue` runs while it is in flight.

  Returns the product, or (product, after_issue's result) when that result is not None.
  """
  if interpret:
    out = _dot_interpret(a, b_ref, transpose_b)
    extra = after_issue() if after_issue is not None else None
    return out if extra is None else (out, extra)
  pl, plgpu = _plgpu()
  if transpose_b:
    b_ref = plgpu.transpose_ref(b_ref, (1, 0))

  def run(acc_ref):
    plgpu.wgmma(acc_ref, a, b_ref)
    extra = after_issue() if after_issue is not None else None
    return acc_ref[...], extra
  out, extra = pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))
  return out if extra is None else (out, extra)


def _mma_group(terms, interpret, after_issue=None):
  """Several independent wgmmas issued back to back, then one wait for all of them.

  terms: (acc, a, b_ref, transpose_b) with acc an fp32 register array, or a shape for a fresh
  zero accumulator. Returns the accumulators. One wait instead of one per product lets the
  tensor cores run the second product while the first one drains; `after_issue` runs while
  they are in flight.
  """
  accs = []
  for acc, a, b_ref, transpose_b in terms:
    if isinstance(acc, tuple):
      _, plgpu = _plgpu() if not interpret else (None, None)
      acc = _cast(interpret, jnp.zeros(acc, jnp.float32),
                  None if interpret else plgpu.Layout.WGMMA)
    accs.append(acc)
  if interpret:
    out = tuple(acc + _dot_interpret(a, b_ref, tb)
                for acc, (_, a, b_ref, tb) in zip(accs, terms))
    if after_issue is not None:
      after_issue()
    return out
  pl, plgpu = _plgpu()

  def run(acc_refs):
    for acc_ref, (_, a, b_ref, tb) in zip(acc_refs, terms):
      plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(b_ref, (1, 0)) if tb else b_ref)
    if after_issue is not None:
      after_issue()
  return tuple(pl.run_state(run)(tuple(plgpu.ACC.init(acc) for acc in accs)))


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


def _stream(steps, stages, first, second):
  """The backward kernels' memory warpgroup: a `stages`-deep ring of two streamed operands.

  first / second: (issue(j, slot), wait(slot) for the slot's release, from :func:`_ring_free`).
  The first `stages` steps are issued up front; step j then waits for its slot's release by
  both compute warpgroups.
  """
  pl, _ = _plgpu()
  (issue_a, wait_a), (issue_b, wait_b) = first, second
  for i in range(stages):
    @pl.when(i < steps)
    def _prologue():
      issue_a(i, i)
      issue_b(i, i)

  def refill(j, _):
    slot = lax.rem(j, jnp.array(stages, j.dtype))
    wait_b(slot)
    issue_b(j, slot)
    wait_a(slot)
    issue_a(j, slot)
    return _

  lax.fori_loop(stages, steps, refill, None)
  _drain(steps, stages, wait_a, wait_b)


def _drain(total, stages, wait_a, wait_b):
  """Waits for the releases of the ring's last `stages` uses (of `total`), so every barrier
  phase is observed before the memory warpgroup exits. wait_*: slot -> wait."""

  def drain(j, _):
    slot = lax.rem(j, jnp.array(stages, j.dtype))
    wait_a(slot)
    wait_b(slot)
    return _

  lax.fori_loop(jnp.maximum(total - stages, 0), total, drain, None)


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


def _num_ctas(n_items, interpret, sm_margin=0):
  """CTAs of the persistent forward: one per multiprocessor (2 in the interpreter).

  sm_margin leaves that many multiprocessors free: a collective running concurrently (the
  context ring's transfer) needs a few, and a kernel holding all of them delays it until the
  kernel ends.
  """
  if interpret:
    return max(1, min(2, n_items))
  try:
    sms = int(jax.devices()[0].core_count)
  except Exception:  # pylint: disable=broad-except
    sms = 132
  return max(1, min(sms - sm_margin, n_items))


def _fwd_call(q, k, v, qvec, kvec, order, cnt, *, scale_log2, spec,
              block_q, block_kv, num_stages, head_codes, interpret, regs, l_mma=0,
              sm_margin=0):
  """Persistent forward: one CTA per multiprocessor walks work items (b, h, query tile).

  Item i = tile + n_tiles·(h + H·b): the CTAs running at the same time cover few heads, so
  the K/V tiles they stream are L2 hits (head-major order measured slower).
  A CTA's producer streams K/V for its items back to back (the ring does not drain between
  items) and each compute warpgroup loads the next item's Q into the other half of a double
  buffer while it works on the current one, so per-item fill and drain (Q load, first K/V,
  output store) overlap work instead of leaving the SM idle.

  cnt [2 or 3, B, Hc, nT] int32 (:func:`counts`): partially and fully visible steps per item,
  then (affine_k) 1 where an item runs its fully visible steps with the line fit of its key
  coordinates, g_0 from kvec's first row and the step g_h·dt from its last row
  (:func:`affine_keys`); without that row, never.

  l_mma: the softmax's row sums come from the tensor cores: P·V's group also multiplies P by a
  one-hot [block_kv, 8] tile (column 0 all ones), accumulating l in column 0 of a [block_q, 8]
  fp32 accumulator rescaled with the output's. This takes one FP32 add per logit out of the
  softmax and sums the bf16 P that P·V uses.
  """
  pl, plgpu = _plgpu()
  b, _, h, d = q.shape
  affine = cnt.shape[0] == 3
  r_aff = kvec.shape[2] - 1
  hkv = k.shape[2]
  rep = h // hkv
  nr = qvec.shape[2]
  tile_q = 2 * block_q
  n_tiles = qvec.shape[-1] // tile_q  # the vectors are padded to whole tiles, q need not be
  n_items = h * n_tiles * b
  n_ctas = _num_ctas(n_items, interpret, sm_margin)
  dtype = q.dtype
  stages = num_stages
  row_l = plgpu.Layout.WGMMA.reduce(1)
  col_l = plgpu.Layout.WGMMA.reduce(0)
  names = ("g",) + _mask_rows(spec)

  def body(q_ref, k_ref, v_ref, qv_ref, kv_ref, ord_ref, cnt_ref, *rest):
    if l_mma:
      oh_ref, *rest = rest
      *rest, oh_smem, oh_bar = rest
    (o_ref, lse_ref, qo_smem, qv_smem, lse_smem2, k_smem, v_smem, kv_smem,
     q_bar, qv_bar, k_bar, v_bar, kv_bar, k_free, v_free, sched_bar) = rest
    cta = lax.axis_index("c")
    wg = lax.axis_index("wg")
    # Items of this CTA: cta, cta + n_ctas, ...
    my_items = lax.div(n_items - 1 - cta, jnp.array(n_ctas, cta.dtype)) + 1

    def item_coords(i):
      item = cta + i * n_ctas
      ti = lax.rem(item, jnp.array(n_tiles, item.dtype))
      rest = lax.div(item, jnp.array(n_tiles, item.dtype))
      hi = lax.rem(rest, jnp.array(h, item.dtype))
      bi = lax.div(rest, jnp.array(h, item.dtype))
      hc = hi if head_codes else 0
      n_p = cnt_ref[0, bi, hc, ti]
      return bi, hi, ti, hc, n_p, n_p + cnt_ref[1, bi, hc, ti]

    # The interpreter has no hardware barriers: it runs the mbarrier form.
    give, take, begin, end = _turns(wg, sched_bar, named=not interpret)
    (release_k, wait_k), (release_v, wait_v) = _ring_free(
        (k_free, v_free), stages, named=not interpret)

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(regs, action="increase")

      def load_q(i):
        bi, hi, ti, *_ = item_coords(i)
        buf = lax.rem(i, jnp.array(2, i.dtype))
        q0 = ti * tile_q + wg * block_q
        plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(q0, block_q), hi], qo_smem.at[buf, wg],
                                q_bar.at[buf * 2 + wg])
        plgpu.copy_gmem_to_smem(qv_ref.at[bi, hi, :, pl.ds(q0, block_q)],
                                qv_smem.at[buf, wg], qv_bar.at[buf * 2 + wg])

      shape = (block_q, block_kv)
      bc_q = lambda x: lax.broadcast_in_dim(x, shape, [0])
      bc_k = lambda x: lax.broadcast_in_dim(x, shape, [1])

      def item_body(i, g0):
        bi, hi, ti, hc, n_p, steps = item_coords(i)
        buf = lax.rem(i, jnp.array(2, i.dtype))
        q_smem = qo_smem.at[buf, wg]
        plgpu.barrier_wait(q_bar.at[buf * 2 + wg])
        plgpu.barrier_wait(qv_bar.at[buf * 2 + wg])

        # The other buffer held the previous item's output: once its store has read it,
        # the next item's Q goes there while this item runs.
        @pl.when(i + 1 < my_items)
        def _prefetch_q():
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          load_q(i + 1)

        qrow = {nm: _load(qv_smem.at[buf, wg, r], row_l, interpret)
                for r, nm in enumerate(names)}
        # Q·Kᵀ takes Q from registers (loaded once per item), so only K is read from shared
        # memory by each product.
        q_op = _load(q_smem, plgpu.Layout.WGMMA, interpret)

        def step(j, carry, kind):  # kind: "masked", "full" or "line" (affine keys)
          acc, m, l = carry
          slot = lax.rem(g0 + j, jnp.array(stages, j.dtype))
          def load_krow():  # [g, masks...] of this key tile (g only in unmasked steps)
            plgpu.barrier_wait(kv_bar.at[slot])
            n_load = len(names) if kind == "masked" else 1
            return [_load(kv_smem.at[slot, r], col_l, interpret) for r in range(n_load)]

          def load_line():  # g_0 and δ of this key tile's coordinates (affine steps)
            plgpu.barrier_wait(kv_bar.at[slot])
            return kv_smem[slot, 0, 0], kv_smem[slot, r_aff, 0]

          # This step's K was waited for while the previous P·V ran (or below, at j = 0).
          if kind == "line":
            s, (g0k, delta) = _mm(shape, q_op, k_smem.at[slot], interpret=interpret,
                                  after_issue=lambda: (give(), load_line())[1])
            release_k(slot)
            s = _pen_affine(s, qrow["g"] - g0k, delta, interpret)
          else:
            if kind == "full":  # the key vector's shared-memory load runs under Q·Kᵀ
              s, krow = _mm(shape, q_op, k_smem.at[slot], interpret=interpret,
                            after_issue=lambda: (give(), load_krow())[1])
            else:
              s = _mm(shape, q_op, k_smem.at[slot], interpret=interpret, after_issue=give)
              krow = load_krow()
            release_k(slot)
            dg = bc_q(qrow["g"]) - bc_k(krow[0])
            s = s - dg * dg  # q·k units: the scale is applied inside exp2's argument
          if kind == "masked":
            rq = {nm: functools.partial(bc_q, qrow[nm]) for nm in names[1:]}
            rk = {nm: functools.partial(bc_k, krow[r + 1]) for r, nm in enumerate(names[1:])}
            s = _apply_mask(s, rq, rk, spec)
          m_new = jnp.maximum(m, s.max(axis=1))
          m_c = m_new * scale_log2
          # (m − m_new)·c, not m·c − m_c: a contracted fma of the latter leaves the rounding
          # error of m·c, which is huge while m is still _M_INIT.
          alpha = jnp.exp2((m - m_new) * scale_log2)
          p = jnp.exp2(s * scale_log2 - bc_q(m_c))  # one fused multiply-add per logit
          acc = acc * lax.broadcast_in_dim(alpha, (block_q, d), [0])
          if l_mma:  # the row sums ride with P·V (see the docstring)
            l = l * lax.broadcast_in_dim(alpha, l.shape, [0])
          else:
            l = l * alpha + p.sum(axis=1)
          p16 = p.astype(dtype)
          plgpu.barrier_wait(v_bar.at[slot])
          take()  # before issuing P·V: the other warpgroup has issued its Q·Kᵀ

          def wait_next_k():  # overlaps the wait for the next K tile with this P·V product
            nxt = lax.rem(g0 + j + 1, jnp.array(stages, j.dtype))
            pl.when(j + 1 < steps)(lambda: plgpu.barrier_wait(k_bar.at[nxt]))
          if l_mma:
            acc, l = _mma_group([(acc, p16, v_smem.at[slot], False), (l, p16, oh_smem, True)],
                                interpret, after_issue=wait_next_k)
          else:
            acc = _mma(acc, p16, v_smem.at[slot], interpret, after_issue=wait_next_k)
          release_v(slot)
          return acc, m_new, l

        pl.when(steps > 0)(lambda: plgpu.barrier_wait(
            k_bar.at[lax.rem(g0, jnp.array(stages, g0.dtype))]))
        acc = _cast(interpret, jnp.zeros((block_q, d), jnp.float32), plgpu.Layout.WGMMA)
        m = _cast(interpret, jnp.full((block_q,), _M_INIT, jnp.float32), row_l)
        if l_mma:
          l = _cast(interpret, jnp.zeros((block_q, 8), jnp.float32), plgpu.Layout.WGMMA)
        else:
          l = _cast(interpret, jnp.zeros((block_q,), jnp.float32), row_l)
        carry = lax.fori_loop(0, n_p, functools.partial(step, kind="masked"), (acc, m, l))
        n_line = n_p
        if affine:  # an item's fully visible steps run in one of the two loops below
          n_line = n_p + cnt_ref[2, bi, hc, ti] * (steps - n_p)
          carry = lax.fori_loop(n_p, n_line, functools.partial(step, kind="line"), carry)
        acc, m, l = lax.fori_loop(n_line, steps, functools.partial(step, kind="full"), carry)
        if l_mma:
          l = l.sum(axis=1)  # column 0 holds the sums, the others zeros

        # l >= 1 whenever a key was visible; rows with none keep acc = 0 and l = 0.
        inv_l = 1.0 / jnp.maximum(l, 1e-30)
        q0 = ti * tile_q + wg * block_q
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous lse store
        q_smem[...] = (acc * lax.broadcast_in_dim(inv_l, (block_q, d), [0])).astype(dtype)
        lse_smem2.at[wg][...] = m * scale_log2 + jnp.log(l) * (1.0 / LN2)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[bi, pl.ds(q0, block_q), hi])
        plgpu.copy_smem_to_gmem(lse_smem2.at[wg], lse_ref.at[bi, hi, pl.ds(q0, block_q)])
        return g0 + steps

      load_q(jnp.int32(0))
      if l_mma:
        plgpu.barrier_wait(oh_bar.at[0])
      begin()  # warpgroup 0 goes first
      lax.fori_loop(0, my_items, item_body, jnp.int32(0))
      end()  # releases warpgroup 1's last wait
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(504 - 2 * regs, action="decrease")
      if l_mma:
        plgpu.copy_gmem_to_smem(oh_ref, oh_smem, oh_bar.at[0])

      def item_body(i, g0):
        bi, hi, ti, hc, _, steps = item_coords(i)
        hk = lax.div(hi, jnp.array(rep, hi.dtype))

        def issue(j, _):
          g = g0 + j
          slot = lax.rem(g, jnp.array(stages, g.dtype))
          kb = ord_ref[bi, hc, ti, j]
          rows = pl.ds(kb * block_kv, block_kv)
          # The ring runs across items: slot reuse waits for the step `stages` earlier.
          pl.when(g >= stages)(lambda: wait_k(slot))
          plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, hk], k_smem.at[slot], k_bar.at[slot])
          plgpu.copy_gmem_to_smem(kv_ref.at[bi, hi, :, rows], kv_smem.at[slot],
                                  kv_bar.at[slot])
          pl.when(g >= stages)(lambda: wait_v(slot))
          plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, hk], v_smem.at[slot], v_bar.at[slot])
          return _

        lax.fori_loop(0, steps, issue, None)
        return g0 + steps

      total = lax.fori_loop(0, my_items, item_body, jnp.int32(0))
      _drain(total, stages, wait_k, wait_v)

  tiling = plgpu.TilingTransform((8, 64))
  swizzle = plgpu.SwizzleTransform(128)
  scratch = [
      plgpu.SMEM((2, 2, block_q, d), dtype, transforms=(tiling, swizzle)),  # [buf, wg]: Q, then O
      plgpu.SMEM((2, 2, nr, block_q), jnp.float32),
      plgpu.SMEM((2, block_q), jnp.float32),
      plgpu.SMEM((stages, block_kv, d), dtype, transforms=(tiling, swizzle)),
      plgpu.SMEM((stages, block_kv, d), dtype, transforms=(tiling, swizzle)),
      plgpu.SMEM((stages, kvec.shape[2], block_kv), jnp.float32),
      plgpu.Barrier(num_barriers=4),  # q_bar, [buf · 2 + wg]
      plgpu.Barrier(num_barriers=4),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      plgpu.Barrier(num_arrivals=2),
  ]
  if l_mma:
    scratch += [plgpu.SMEM((8, block_kv), dtype, transforms=(tiling, swizzle)),
                plgpu.Barrier(num_barriers=1)]
  out_type = [jax.ShapeDtypeStruct(q.shape, dtype),
              # whole tiles: 1-D stores past the end of a row gave wrong results
              jax.ShapeDtypeStruct((b, h, n_tiles * tile_q), jnp.float32)]
  kernel = plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch,
      grid=(n_ctas,), grid_names=("c",),
      num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=_interpret_params(interpret))
  extra = ()
  if l_mma:
    onehot = np.zeros((8, block_kv), np.float32)
    onehot[0] = 1
    extra = (jnp.asarray(onehot, dtype),)
  return kernel(q, k, v, qvec, kvec, order, cnt, *extra)


# ----------------------------------------------------------------------------------------------
# Backward kernels.
# ----------------------------------------------------------------------------------------------


def _dq_call(q, k, v, do, qvec, kvec, order, cnt, *, scale, scale_log2, spec,
             block_q, block_kv, num_stages, head_codes, interpret, regs):
  """dQ = scale·Σ_j dS_ij k_j and pen̄_i = Σ_j P_ij·pen_ij / Σ_j P_ij (log2 units) per query row.

  qvec rows: [lse2, delta, g, masks...]. pen̄ lets the dK/dV kernel form dσ without the
  cancellation of Σ_j dS_ij = 0 (see :func:`_dkv_call`); that needs the two kernels' pen to
  be the same floats, which is why this kernel has no line-fit steps.

  pen̄ is divided by this kernel's own Σ_j P_ij. P = exp2(s − lse) takes lse from the forward,
  whose logits are rounded differently (q·k units), so Σ_j P deviates from 1 by the rounding
  of the Gaussian coordinates: ~1e-3 where every visible key is far from the query (a row past
  the end of its padded keys, under a narrow head: pen ≈ 2000). The dK/dV kernel's
  Σ_i P·dP·(pen − pen̄) cancels delta only if pen̄ is the P-weighted mean; the unnormalised sum
  left an error of pen̄·(1 − Σ_j P) per row, which made dσ wrong by up to 10³× there.
  """
  pl, plgpu = _plgpu()
  b, _, h, d = q.shape
  hkv = k.shape[2]
  rep = h // hkv
  nr = kvec.shape[2]
  tile_q = 2 * block_q
  n_tiles = qvec.shape[-1] // tile_q  # the vectors are padded to whole tiles, q need not be
  dtype = q.dtype
  stages = num_stages
  row_l = plgpu.Layout.WGMMA.reduce(1)
  col_l = plgpu.Layout.WGMMA.reduce(0)
  names = ("g",) + _mask_rows(spec)

  def body(q_ref, k_ref, v_ref, do_ref, qv_ref, kv_ref, ord_ref, cnt_ref, dq_ref,
           pbar_ref, q_smem2, do_smem2, qv_smem2, pbar_smem2, k_smem, v_smem, kv_smem,
           q_bar, do_bar, qv_bar, k_bar, v_bar, kv_bar, k_free, v_free):
    bi = lax.axis_index("b")
    hi = lax.axis_index("h")
    ti = lax.axis_index("t")
    wg = lax.axis_index("wg")
    hc = hi if head_codes else 0
    n_p = cnt_ref[0, bi, hc, ti]
    steps = n_p + cnt_ref[1, bi, hc, ti]
    # The backward kernels release ring slots through mbarriers: hardware barriers measured
    # no faster there.
    (release_k, wait_k), (release_v, wait_v) = _ring_free((k_free, v_free), stages, named=False)

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(regs, action="increase")
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
        dq_acc, pbar, l = carry
        slot = lax.rem(j, jnp.array(stages, j.dtype))
        plgpu.barrier_wait(k_bar.at[slot])
        plgpu.barrier_wait(v_bar.at[slot])
        # S and dP are independent: issue both, wait once.
        s, dp = _mma_group([(shape, q_smem, k_smem.at[slot], True),
                            (shape, do_smem, v_smem.at[slot], True)], interpret)
        release_v(slot)
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
        l = l + p.sum(axis=1)
        ds = p * (dp - bc_q(delta))
        dq_acc = _mma(dq_acc, ds.astype(dtype), k_smem.at[slot], interpret)
        release_k(slot)
        return dq_acc, pbar, l

      zero_row = lambda: _cast(interpret, jnp.zeros((block_q,), jnp.float32), row_l)
      carry = (_cast(interpret, jnp.zeros((block_q, d), jnp.float32), plgpu.Layout.WGMMA),
               zero_row(), zero_row())
      carry = lax.fori_loop(0, n_p, functools.partial(step, masked=True), carry)
      dq_acc, pbar, l = lax.fori_loop(n_p, steps, functools.partial(step, masked=False), carry)
      q_smem[...] = (dq_acc * scale).astype(dtype)
      # Rows with no visible key (or padded rows) have l = 0 and pbar = 0: keep 0.
      pbar_smem2.at[wg][...] = pbar / jnp.maximum(l, jnp.float32(1e-30))
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[bi, pl.ds(q0, block_q), hi])
      plgpu.copy_smem_to_gmem(pbar_smem2.at[wg], pbar_ref.at[bi, hi, pl.ds(q0, block_q)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(504 - 2 * regs, action="decrease")
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

      _stream(steps, stages, (issue_k, wait_k), (issue_v, wait_v))

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
                      jax.ShapeDtypeStruct((b, h, n_tiles * tile_q), jnp.float32)],
      scratch_types=scratch,
      grid=(h, n_tiles, b), grid_names=("h", "t", "b"),
      num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=_interpret_params(interpret))
  return kernel(q, k, v, do, qvec, kvec, order, cnt)


def _dkv_call(q, k, v, do, qvec, kvec, order, cnt, *, scale, scale_log2, spec,
              block_q, block_kv, num_stages, head_codes, interpret, regs):
  """dK (times the scale), dV and dσ partials per key (log2 units).

  The partial is Σ_i P_ij·dP_ij·(pen_ij − pen̄_i), which equals Σ_i dS_ij·pen_ij exactly
  (Σ_j P_ij (pen_ij − pen̄_i) = 0 removes delta) but does not inherit the error of delta
  computed from the rounded output, which Σ dS·pen, a sum with heavy cancellation, amplifies.

  qvec rows: [lse2, delta, pen̄, g, masks...]; kvec rows: [g, masks...]. Returns
  dk, dv [B, Nk, Hkv, D] and part [B, H, Nk] float32.

  Grouped heads (H = rep·Hkv, rep > 1): a CTA owns keys of one K/V head and streams the query
  blocks of all rep query heads of its group, so dK/dV are summed over the group in the fp32
  accumulators. The block list then runs over (head, query block) pairs, entry r·n_qb + qb
  (see :func:`_grouped_lists`); the per-key vectors of the rep heads sit in shared memory and
  the rep dσ partials are accumulated in shared memory (in registers they made ptxas spill).
  """
  pl, plgpu = _plgpu()
  b, _, h, d = q.shape
  nk, hkv = k.shape[1], k.shape[2]
  rep = h // hkv
  nqr = qvec.shape[2]
  nkr = kvec.shape[2]
  tile_k = 2 * block_kv
  n_tiles = kvec.shape[-1] // tile_k  # the vectors are padded to whole tiles, k/q need not be
  n_qb = qvec.shape[-1] // block_q
  dtype = q.dtype
  stages = num_stages
  row_l = plgpu.Layout.WGMMA.reduce(1)
  col_l = plgpu.Layout.WGMMA.reduce(0)
  names = ("g",) + _mask_rows(spec)
  grouped = rep > 1

  def body(q_ref, k_ref, v_ref, do_ref, qv_ref, kv_ref, ord_ref, cnt_ref,
           dk_ref, dv_ref, part_ref,
           k_smem2, v_smem2, kv_smem2, part_smem2, q_smem, do_smem, qv_smem,
           k_bar, v_bar, kv_bar, q_bar, do_bar, qv_bar, q_free, do_free):
    bi = lax.axis_index("b")
    hk = lax.axis_index("h")  # the K/V head (the query head too, unless grouped)
    ti = lax.axis_index("t")
    wg = lax.axis_index("wg")
    # Block lists: per K/V head when grouped, else per query head (or one for all: Hc = 1).
    hc = hk if grouped or head_codes else 0
    n_p = cnt_ref[0, bi, hc, ti]
    steps = n_p + cnt_ref[1, bi, hc, ti]
    (release_q, wait_q), (release_do, wait_do) = _ring_free((q_free, do_free), stages,
                                                            named=False)

    def entry(j):
      """Step j's (query head, query block, head within the group r or None)."""
      if not grouped:
        return hk, ord_ref[bi, hc, ti, j], None
      e = ord_ref[bi, hc, ti, j]
      r = lax.div(e, jnp.array(n_qb, e.dtype))
      return hk * rep + r, lax.rem(e, jnp.array(n_qb, e.dtype)), r

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(regs, action="increase")
      k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
      k0 = ti * tile_k + wg * block_kv
      rows = pl.ds(k0, block_kv)
      plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, hk], k_smem, k_bar.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, hk], v_smem, v_bar.at[wg])
      heads = pl.ds(hk * rep, rep) if grouped else hk
      plgpu.copy_gmem_to_smem(kv_ref.at[bi, heads, :, rows], kv_smem2.at[wg], kv_bar.at[wg])
      plgpu.barrier_wait(k_bar.at[wg])
      plgpu.barrier_wait(v_bar.at[wg])
      plgpu.barrier_wait(kv_bar.at[wg])
      load_krow = lambda idx, n=len(names): {nm: _load(kv_smem2.at[idx + (i,)], row_l, interpret)
                                             for i, nm in enumerate(names[:n])}
      if not grouped:
        krow = load_krow((wg,))
      shape = (block_kv, block_q)
      bc_k = lambda x: lax.broadcast_in_dim(x, shape, [0])
      bc_q = lambda x: lax.broadcast_in_dim(x, shape, [1])

      def step(j, carry, masked):
        dk_acc, dv_acc, part = carry
        slot = lax.rem(j, jnp.array(stages, j.dtype))
        if grouped:  # this step's query head: its key vectors, its dσ partial
          r = entry(j)[2]
          kr = load_krow((wg, r), len(names) if masked else 1)
        else:
          kr = krow
        plgpu.barrier_wait(q_bar.at[slot])
        plgpu.barrier_wait(do_bar.at[slot])
        # Sᵀ and dPᵀ are independent: issue both, wait once.
        st, dpt = _mma_group([(shape, k_smem, q_smem.at[slot], True),
                              (shape, v_smem, do_smem.at[slot], True)], interpret)
        plgpu.barrier_wait(qv_bar.at[slot])
        lse = _load(qv_smem.at[slot, 0], col_l, interpret)
        delta = _load(qv_smem.at[slot, 1], col_l, interpret)
        pbar = _load(qv_smem.at[slot, 2], col_l, interpret)
        n_load = len(names) if masked else 1
        qrow = [_load(qv_smem.at[slot, i + 3], col_l, interpret) for i in range(n_load)]
        dg = bc_q(qrow[0]) - bc_k(kr["g"])
        pen = dg * dg
        st = st * scale_log2 - pen
        if masked:
          rq = {nm: functools.partial(bc_q, qrow[i + 1]) for i, nm in enumerate(names[1:])}
          rk = {nm: functools.partial(bc_k, kr[nm]) for nm in names[1:]}
          st = _apply_mask(st, rq, rk, spec)
        pt = jnp.exp2(st - bc_q(lse))
        u = pt * dpt
        term = (u * (pen - bc_q(pbar))).sum(axis=1)
        if grouped:  # rep partials in registers made ptxas spill 552 bytes: keep them in SMEM
          part_r = part_smem2.at[wg, r]
          part_r[...] = _load(part_r, row_l, interpret) + term
        else:
          part = part + term
        dst = u - pt * bc_q(delta)  # u = P·dP is shared with the dσ term
        dv_acc, dk_acc = _mma_group([(dv_acc, pt.astype(dtype), do_smem.at[slot], False),
                                     (dk_acc, dst.astype(dtype), q_smem.at[slot], False)],
                                    interpret)
        release_do(slot)
        release_q(slot)
        return dk_acc, dv_acc, part

      zeros = lambda: _cast(interpret, jnp.zeros((block_kv, d), jnp.float32),
                                        plgpu.Layout.WGMMA)
      zero_part = lambda: _cast(interpret, jnp.zeros((block_kv,), jnp.float32), row_l)
      if grouped:
        for i in range(rep):
          part_smem2.at[wg, i][...] = zero_part()
      part = None if grouped else zero_part()
      carry = (zeros(), zeros(), part)
      carry = lax.fori_loop(0, n_p, functools.partial(step, masked=True), carry)
      dk_acc, dv_acc, part = lax.fori_loop(n_p, steps, functools.partial(step, masked=False),
                                           carry)
      k_smem[...] = (dk_acc * scale).astype(dtype)
      v_smem[...] = dv_acc.astype(dtype)
      if not grouped:
        part_smem2.at[wg][...] = part
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[bi, rows, hk])
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[bi, rows, hk])
      plgpu.copy_smem_to_gmem(part_smem2.at[wg], part_ref.at[bi, heads, rows])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(504 - 2 * regs, action="decrease")

      def issue_q(j, slot):
        hq, qb, _ = entry(j)
        rows = pl.ds(qb * block_q, block_q)
        plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hq], q_smem.at[slot], q_bar.at[slot])
        plgpu.copy_gmem_to_smem(qv_ref.at[bi, hq, :, rows], qv_smem.at[slot], qv_bar.at[slot])

      def issue_do(j, slot):
        hq, qb, _ = entry(j)
        rows = pl.ds(qb * block_q, block_q)
        plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, hq], do_smem.at[slot], do_bar.at[slot])

      _stream(steps, stages, (issue_q, wait_q), (issue_do, wait_do))

  tiling = plgpu.TilingTransform((8, 64))
  swizzle = plgpu.SwizzleTransform(128)
  scratch = [
      plgpu.SMEM((2, block_kv, d), dtype, transforms=(tiling, swizzle)),
      plgpu.SMEM((2, block_kv, d), dtype, transforms=(tiling, swizzle)),
      plgpu.SMEM((2,) + ((rep,) if grouped else ()) + (nkr, block_kv), jnp.float32),
      plgpu.SMEM((2,) + ((rep,) if grouped else ()) + (block_kv,), jnp.float32),
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
  out_type = [jax.ShapeDtypeStruct((b, nk, hkv, d), dtype),
              jax.ShapeDtypeStruct((b, nk, hkv, d), dtype),
              # whole tiles: 1-D stores past the end of a row gave wrong results
              jax.ShapeDtypeStruct((b, h, n_tiles * tile_k), jnp.float32)]
  kernel = plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch,
      grid=(hkv, n_tiles, b), grid_names=("h", "t", "b"),
      num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=_interpret_params(interpret))
  return kernel(q, k, v, do, qvec, kvec, order, cnt)


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
    if name in _SWITCHES and val not in (0, 1):
      raise ValueError(f"pallas_gpu {name}={val} must be 0 or 1")
    if name.startswith("regs") and (val % 8 or not 200 <= val <= 240):
      raise ValueError(f"pallas_gpu {name}={val} must be a multiple of 8 in [200, 240]")
    if name.startswith("num_stages") and val < 1:
      raise ValueError(f"pallas_gpu {name}={val} must be >= 1")
    if name == "sm_margin" and not 0 <= val < 128:
      raise ValueError(f"pallas_gpu sm_margin={val} must be in [0, 128)")
  # Two ring operands per kernel, one hardware barrier per operand and slot.
  max_stages = (16 - _FREE_BAR) // 2
  if cfg["num_stages"] > max_stages:
    raise ValueError(f"pallas_gpu num_stages={cfg['num_stages']} needs more than the "
                     f"{16 - _FREE_BAR} hardware barriers the forward's ring releases may use: "
                     f"num_stages <= {max_stages}")
  return cfg


def _multiples(cfg):
  q_mult = math.lcm(2 * cfg["block_q"], 2 * cfg["block_q_dq"], cfg["block_q_dkv"])
  k_mult = math.lcm(cfg["block_kv"], cfg["block_kv_dq"], 2 * cfg["block_kv_dkv"])
  return q_mult, k_mult


def forward(q, k, v, t_q, t_k, sigma, *, scale, spec, q_segment_ids, kv_segment_ids,
            interpret=False, exact_lse=True, **block_sizes):
  """Backend contract forward: (out [B, Nq, H, D] q.dtype, lse [B, H, Nq] float32, natural log).

  exact_lse=False (the caller uses `out` only) lets `l_mma` take the row sums from the tensor
  cores; lse is then as accurate as the bf16 probabilities it sums (~2⁻⁹ relative in Σ_j P).
  """
  cfg = _blocks(block_sizes, q.shape[-1], interpret)
  q_mult, k_mult = _multiples(cfg)
  prep = _Prep(q, k, t_q, t_k, sigma, scale, spec, q_segment_ids, kv_segment_ids,
               q_mult=q_mult, k_mult=k_mult, qk_units=True)
  order, n_part, n_full = prep.lists(2 * cfg["block_q"], cfg["block_kv"])
  qp = _pad_rows(q, prep.nq_p, interpret)
  kp = _pad_rows(k, prep.nk_p, interpret)
  vp = _pad_rows(v, prep.nk_p, interpret)
  kvec, cnt = prep.kvec, counts(n_part, n_full)
  if cfg["affine_k"]:
    kvec, ok = prep.kvec_affine(cfg["block_kv"])
    if prep.all_full:  # every block of every item is fully visible
      n_aff = jnp.broadcast_to(jnp.all(ok, axis=-1)[:, None, None], n_part.shape).astype(jnp.int32)
    else:
      n_aff = affine_items(ok, order, n_part, n_full)
    cnt = counts(n_part, n_full, n_aff)
  out, lse2 = _fwd_call(qp, kp, vp, prep.qvec, kvec, order, cnt,
                        scale_log2=prep.scale_log2, spec=spec, block_q=cfg["block_q"],
                        block_kv=cfg["block_kv"], num_stages=cfg["num_stages"],
                        head_codes=order.shape[1] > 1, interpret=interpret,
                        regs=cfg["regs"], l_mma=cfg["l_mma"] and not exact_lse,
                        sm_margin=cfg["sm_margin"])
  out = out[:, :prep.nq]
  lse = lse2[:, :, :prep.nq] * LN2
  return out, lse


def backward(q, k, v, t_q, t_k, sigma, out, lse, dout, *, scale, spec, q_segment_ids,
             kv_segment_ids, interpret=False, dlse=None, **block_sizes):
  """Backend contract backward: (dq, dk, dv, dsigma [H] float32)."""
  cfg = _blocks(block_sizes, q.shape[-1], interpret)
  q_mult, k_mult = _multiples(cfg)
  prep = _Prep(q, k, t_q, t_k, sigma, scale, spec, q_segment_ids, kv_segment_ids,
               q_mult=q_mult, k_mult=k_mult)
  b, h, nq, nk = prep.b, prep.h, prep.nq, prep.nk
  # Rows with no visible key have lse = −inf; +inf makes their p = exp2(s − lse) exactly 0.
  lse2 = jnp.where(jnp.isfinite(lse), lse * LOG2E, jnp.inf).astype(jnp.float32)
  delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), dout.astype(jnp.float32))
  if dlse is not None:  # ∂lse/∂s = P: dS = P·(dP − delta + dlse)
    dlse = dlse.astype(jnp.float32)
    delta = delta - dlse
  pad_q = prep.nq_p - nq
  lse2 = jnp.pad(lse2, [(0, 0), (0, 0), (0, pad_q)], constant_values=jnp.inf)
  delta = jnp.pad(delta, [(0, 0), (0, 0), (0, pad_q)])
  qvec_b = jnp.concatenate([lse2[:, :, None], delta[:, :, None], prep.qvec], axis=2)
  qp = _pad_rows(q, prep.nq_p, interpret)
  dop = _pad_rows(dout.astype(q.dtype), prep.nq_p, interpret)
  kp, vp = _pad_rows(k, prep.nk_p, interpret), _pad_rows(v, prep.nk_p, interpret)
  kw = dict(scale=float(scale), scale_log2=prep.scale_log2, spec=spec, interpret=interpret,
            regs=cfg["regs_bwd"])

  order, n_part, n_full = prep.lists(2 * cfg["block_q_dq"], cfg["block_kv_dq"])
  dq, pbar = _dq_call(qp, kp, vp, dop, qvec_b, prep.kvec, order, counts(n_part, n_full),
                block_q=cfg["block_q_dq"], block_kv=cfg["block_kv_dq"],
                num_stages=cfg["num_stages_bwd"], head_codes=order.shape[1] > 1, **kw)

  rep = h // prep.hkv
  order, n_part, n_full = prep.lists(cfg["block_q_dkv"], 2 * cfg["block_kv_dkv"],
                                     keys_major=True, rep=rep)
  qvec_k = jnp.concatenate([qvec_b[:, :, :2], pbar[:, :, None], prep.qvec], axis=2)
  dk, dv, part = _dkv_call(qp, kp, vp, dop, qvec_k, prep.kvec, order, counts(n_part, n_full),
                           block_q=cfg["block_q_dkv"], block_kv=cfg["block_kv_dkv"],
                           num_stages=cfg["num_stages_bwd"],
                           head_codes=order.shape[1] > 1, **kw)
  # dK/dV come out per K/V head: grouped heads were summed in the kernel's fp32 accumulators.
  # The kernels applied the scale to dQ and dK in fp32: no extra pass (nor rounding) here.
  dq, dk, dv = dq[:, :nq], dk[:, :nk], dv[:, :nk]
  # The kernel's pen is in log2 units: pen_log2 = pen·log2(e).
  dsig_partial = jnp.sum(part[:, :, :nk], axis=(0, 2))
  if dlse is not None:  # + Σ_i dlse_i·pen̄_i (common.py); pen̄ is in log2 units like part
    dsig_partial = dsig_partial + jnp.einsum("bhq,bhq->h", dlse, pbar[:, :, :nq])
  dsig_partial = dsig_partial * (1.0 / LOG2E)
  dsigma = common.dsigma_from_partial(dsig_partial, sigma)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), dsigma.astype(jnp.float32)
