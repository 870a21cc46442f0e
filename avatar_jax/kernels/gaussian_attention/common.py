"""Shared pieces of every Gaussian-attention backend: mask spec, visibility, block skipping.

The operation, per head h (shapes: q [B, Nq, H, D], k/v [B, Nk, Hkv, D], H % Hkv == 0):

    s[b,h,i,j] = scale · q[b,i,h]·k[b,j,h//rep] − (t_q[b,i] − t_k[b,j])² · inv[h] + mask
    out[b,i,h] = Σ_j softmax_j(s)[b,h,i,j] · v[b,j,h//rep]

with ``inv = inv_two_sigma_sq(sigma)`` = 1 / (2 σ²) (clamped, see there), ``rep = H // Hkv`` and
``mask`` 0 where :func:`visible` is true and −inf elsewhere. A query with no visible key gets a
zero output and zero gradients.

Backend contract
----------------
Every backend module (``reference`` chunked path, ``pallas_tpu``, ``pallas_gpu``) exposes

    forward(q, k, v, t_q, t_k, sigma, *, scale, spec, q_segment_ids, kv_segment_ids,
            interpret=False, exact_lse=True, **block_sizes) -> (out, lse)
        out: [B, Nq, H, D] in q.dtype.
        lse: [B, H, Nq] float32, lse = log Σ_{visible, kept j} exp(s_ij) (natural log, the
             logits include scale and the Gaussian term); −inf for a row with no visible key.
        exact_lse: False when the caller uses `out` only (no backward follows): a backend
             may then return an lse only as accurate as `out` (pallas_gpu sums the row's
             bf16 probabilities on the tensor cores). The backward needs the float32 lse:
             its dσ sums amplify any error in Σ_j P = 1 by the Gaussian term.

    backward(q, k, v, t_q, t_k, sigma, out, lse, dout, *, scale, spec, q_segment_ids,
             kv_segment_ids, interpret=False, dlse=None, **block_sizes) -> (dq, dk, dv, dsigma)
        dq: [B, Nq, H, D] q.dtype; dk, dv: [B, Nk, Hkv, D] k.dtype / v.dtype;
        dsigma: [H] float32, dL/dσ_h = Σ dS · (t_q − t_k)² / σ_h³ = (2/σ_h) Σ dS · pen
        with dS = ∂L/∂s and pen = (t_q − t_k)² · inv[h] (see :func:`dsigma_from_partial`).
        How to accumulate Σ dS·pen robustly (see :func:`dsigma_row_partial`): with
        P = exp(s − lse), dP = dout·vᵀ and pen' = pen + dsigma_shift(lse), accumulate per
        query row A = Σ_j P·dP·pen', B = Σ_j P·pen', C = Σ_j P·dP over the key blocks and
        add A − C·B to the head's partial. This equals Σ_j dS·pen (dS = P·(dP − C), Σ_j P = 1)
        but (1) uses the in-kernel C instead of delta = Σ dout·out, whose rounding in a bf16
        `out` is amplified by large pen, and (2) shifts pen by lse, which keeps the terms at
        the size of the logit range: for narrow heads pen and lse are both in the hundreds
        and a plain Σ dS·pen loses everything to cancellation.
        dlse: None, or the cotangent of `lse` [B, H, Nq] float32 (when the caller reads lse,
        e.g. to merge attention over key chunks). Since ∂lse_i/∂s_ij = P_ij it adds
        dlse_i·P_ij to dS: delta becomes delta − dlse, and the row's Σ_j dS·pen gains
        dlse_i·pen̄_i with pen̄_i = Σ_j P_ij·pen_ij = B − shift (see :func:`dsigma_row_partial`).

``q_segment_ids`` / ``kv_segment_ids`` are int32 arrays in the convention of
:func:`normalise_segment_ids`, or both None (no segments: every key visible unless the spec
masks it), which lets a backend skip mask work it can rule out statically.

Arguments, identical for all backends:
  * ``t_q`` [B, Nq], ``t_k`` [B, Nk]: times in seconds (any float dtype; used in float32).
  * ``sigma`` [H]: per-head width (any float dtype); ``inf`` disables the bias of that head.
  * ``scale``: Python float (already resolved, never None).
  * ``spec``: a :class:`MaskSpec` (static, hashable).
  * ``q_segment_ids`` [B, Nq] int32 / ``kv_segment_ids`` [B, Nk] int32: already *normalised*
    by :func:`normalise_segment_ids`, never None. Key j is visible to query i only if
    ``q_seg[i] == kv_seg[j]`` and ``kv_seg[j] >= 0``; backends pad keys with id −1.
  * ``interpret``: run the Pallas kernel in interpret mode (CPU tests).
  * ``**block_sizes``: backend-specific keyword block sizes (``block_q``, ``block_k``, ...).

Determinism: no backend may use order-dependent atomics; partial sums (e.g. dσ per
(batch, head, block)) are written to distinct slots and reduced outside the kernel.

Blocks are skipped with :func:`block_code` (0 = skip, 1 = partially visible, 2 = fully visible),
computed from per-block statistics (:func:`block_stats`) of times and segment ids. The same
function runs on arrays outside a kernel and on scalars read from SMEM/registers inside one.

Band skipping (``spec.bias_cutoff = c``): a (q-block, k-block, head) triple is skipped when the
Gaussian term is below −c for every pair of the two blocks, i.e. when
``min |t_q − t_k|² · inv[h] > c`` with the minimum distance taken between the blocks' time
ranges. Error bound (per query row i; derivation in docs/gaussian_attention.md): let S be the
skipped visible keys, m the row's largest kept logit and A = max_{j∈S} scale·q_i·k_j. The
skipped softmax mass is ε = P_S ≤ |S| · exp(A − m − c) (if ε < 1) and the output error is
``‖out_exact − out_skip‖_∞ ≤ 2 ε max_j ‖v_j‖_∞``. The bound is relative to the row's max
logit: it is small only when the un-biased logits of far keys do not exceed the kept max
logit by a margin comparable to c.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# 1/(2σ²) is clamped so that σ → 0 cannot produce 0·inf = NaN at t_q == t_k or an infinite
# Gaussian term; σ below ~7e-10 s then behaves like σ = 7e-10 s (nearest-time key wins).
INV_TWO_SIGMA_SQ_MAX = 1e18
# Time offset (in blocks) added before flooring, so that t = n·b computed in float32 lands in
# block n: a time within 1e-3 of a block's start counts as in that block. 1e-6 was below one
# float32 ulp of t/b from t/b ≈ 8 on (ulp(54) = 3.8e-6), so two roundings of the same frame
# time (54/25 vs 50/25 + 4/25) could fall in different blocks.
BLOCK_EPS = 1e-3
# Sentinel for "no valid key in this block" in segment-id statistics.
_SEG_BIG = np.iinfo(np.int32).max

SKIP, PARTIAL, FULL = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """Static (hashable) description of the mask; segment ids travel separately as arrays.

  causal: key j visible to query i iff t_k[j] <= t_q[i].
  causal_block: block length in seconds; causality becomes block-wise:
    floor(t_k/b) <= floor(t_q/b) + lookahead_blocks (overrides `causal`).
  window: visible iff |t_q − t_k| <= window.
  bias_cutoff: if set, block triples whose Gaussian term is < −bias_cutoff everywhere are
    skipped (an approximation, see the module docstring).
  """
  causal: bool = False
  causal_block: float | None = None
  lookahead_blocks: int = 0
  window: float | None = None
  bias_cutoff: float | None = None

  def __post_init__(self):
    if self.causal_block is not None and not self.causal_block > 0:
      raise ValueError(f"causal_block must be a positive number of seconds, got {self.causal_block!r}")
    if self.window is not None and not self.window >= 0:
      raise ValueError(f"window must be >= 0 seconds, got {self.window!r}")
    if self.bias_cutoff is not None and not self.bias_cutoff > 0:
      raise ValueError(f"bias_cutoff must be > 0, got {self.bias_cutoff!r}")
    if int(self.lookahead_blocks) != self.lookahead_blocks or self.lookahead_blocks < 0:
      raise ValueError(f"lookahead_blocks must be a non-negative int, got {self.lookahead_blocks!r}")


def inv_two_sigma_sq(sigma):
  """[H] any float → [H] float32 1/(2σ²), clamped to INV_TWO_SIGMA_SQ_MAX; σ = inf gives 0."""
  sigma = jnp.asarray(sigma, jnp.float32)
  return jnp.minimum(0.5 / jnp.square(sigma), INV_TWO_SIGMA_SQ_MAX)


def dsigma_from_partial(partial, sigma):
  """Σ dS·pen per head ([H] float32) → dL/dσ [H] float32 = (2/σ)·Σ dS·pen.

  Written through pen = dt²/(2σ²) so that σ³ never under/overflows; for σ = inf it is 0. Where
  the 1/(2σ²) clamp is active the Gaussian term does not depend on σ, so the gradient is 0.
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  clamped = 0.5 / jnp.square(sigma) >= INV_TWO_SIGMA_SQ_MAX
  return jnp.where(clamped | jnp.isinf(sigma), 0.0, 2.0 * partial / sigma)


def zero_cotangent(x):
  """The cotangent of a non-differentiated custom_vjp input (times, segment ids): zeros, float0
  for integer arrays, None for None."""
  if x is None:
    return None
  if jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)


def dsigma_shift(lse):
  """Per-row shift for the σ-gradient sum: lse where finite, else 0 (empty / padded rows)."""
  return jnp.where(jnp.isfinite(lse), lse, 0.0)


def dsigma_row_partial(a, b, c, dlse=None, shift=None):
  """Per-row accumulators (A, B, C) of the contract → the row's Σ_j dS·pen (= A − C·B).

  With an lse cotangent `dlse` (and the rows' `shift`, :func:`dsigma_shift` of lse) the row
  gains dlse·pen̄, pen̄ = Σ_j P·pen = B − shift.
  """
  rows = a - c * b
  if dlse is not None:
    rows = rows + dlse * (b - shift)
  return rows


def gaussian_penalty(tq, tk, inv_h):
  """(t_q − t_k)² · inv_h, broadcasting tq [.., bq, 1] against tk [.., 1, bk]; float32."""
  dt = tq.astype(jnp.float32) - tk.astype(jnp.float32)
  return dt * dt * inv_h


def visible(spec: MaskSpec, tq, tk, q_seg, kv_seg):
  """Boolean visibility, broadcasting tq/q_seg [.., bq, 1] against tk/kv_seg [.., 1, bk].

  Works inside Pallas kernels (only elementwise jnp ops). Segment ids must be normalised.
  """
  vis = (q_seg == kv_seg) & (kv_seg >= 0)
  tq = tq.astype(jnp.float32)
  tk = tk.astype(jnp.float32)
  if spec.causal_block is not None:
    inv_b = 1.0 / spec.causal_block
    bq = jnp.floor(tq * inv_b + BLOCK_EPS)
    bk = jnp.floor(tk * inv_b + BLOCK_EPS)
    vis = vis & (bk <= bq + spec.lookahead_blocks)
  elif spec.causal:
    vis = vis & (tk <= tq)
  if spec.window is not None:
    vis = vis & (jnp.abs(tq - tk) <= spec.window)
  return vis


def normalise_segment_ids(q_segment_ids, kv_segment_ids, b, nq, nk):
  """Public segment-id arguments → int32 ([B, Nq], [B, Nk]) in the backend convention.

  * neither given: all zeros (everything visible);
  * only kv ids: padding only — keys with id < 0 become −1, all others 0, queries 0;
  * both: as given (visible iff equal and key id >= 0).
  """
  if q_segment_ids is not None and kv_segment_ids is None:
    raise ValueError("q_segment_ids was given without kv_segment_ids; pass both (or only "
                     "kv_segment_ids to mark key padding with negative ids)")
  if kv_segment_ids is None:
    return jnp.zeros((b, nq), jnp.int32), jnp.zeros((b, nk), jnp.int32)
  kv = jnp.asarray(kv_segment_ids).astype(jnp.int32)
  if q_segment_ids is None:
    return jnp.zeros((b, nq), jnp.int32), jnp.where(kv >= 0, 0, -1).astype(jnp.int32)
  return jnp.asarray(q_segment_ids).astype(jnp.int32), kv


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def pad_axis(x, n_to, axis, *, mode="edge", value=0):
  """Pads `axis` of x to length n_to; edge mode keeps block time ranges tight."""
  n = x.shape[axis]
  if n_to == n:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, n_to - n)
  if mode == "edge":
    return jnp.pad(x, widths, mode="edge")
  return jnp.pad(x, widths, constant_values=value)


def pad_inputs(t_q, t_k, q_seg, kv_seg, nq_to, nk_to):
  """Pads times/segment ids of both sides; padded keys get id −1 (never visible)."""
  t_q = pad_axis(t_q.astype(jnp.float32), nq_to, 1)
  t_k = pad_axis(t_k.astype(jnp.float32), nk_to, 1)
  q_seg = pad_axis(q_seg, nq_to, 1)
  kv_seg = pad_axis(kv_seg, nk_to, 1, mode="constant", value=-1)
  return t_q, t_k, q_seg, kv_seg


class BlockStats(NamedTuple):
  """Per-block statistics, each [B, n_blocks] (float32 times, int32 ids).

  seg_min/seg_max: over all entries (queries) or over valid keys (id >= 0; for a block with no
  valid key seg_min = INT32_MAX and seg_max = −1). all_valid: 1 if every key id >= 0.
  """
  t_min: jax.Array
  t_max: jax.Array
  seg_min: jax.Array
  seg_max: jax.Array
  all_valid: jax.Array


def block_stats(t, seg, block: int, *, keys: bool) -> BlockStats:
  """t [B, N] float32, seg [B, N] int32, N % block == 0 → BlockStats of [B, N // block]."""
  b, n = t.shape
  if n % block:
    raise ValueError(f"block_stats expects N ({n}) to be a multiple of block ({block}); pad first")
  tb = t.astype(jnp.float32).reshape(b, n // block, block)
  sb = seg.astype(jnp.int32).reshape(b, n // block, block)
  if keys:
    valid = sb >= 0
    seg_min = jnp.min(jnp.where(valid, sb, _SEG_BIG), axis=-1)
    seg_max = jnp.max(jnp.where(valid, sb, -1), axis=-1)
    all_valid = jnp.all(valid, axis=-1).astype(jnp.int32)
  else:
    seg_min = jnp.min(sb, axis=-1)
    seg_max = jnp.max(sb, axis=-1)
    all_valid = jnp.ones(seg_min.shape, jnp.int32)
  return BlockStats(jnp.min(tb, -1), jnp.max(tb, -1), seg_min, seg_max, all_valid)


def block_code(spec: MaskSpec, q_tmin, q_tmax, q_smin, q_smax, k_tmin, k_tmax, k_smin, k_smax,
               k_all_valid, inv_h):
  """0 (skip), 1 (partially visible) or 2 (fully visible, no mask needed) for a block pair.

  All arguments broadcast (scalars inside a kernel, arrays outside). `inv_h` is the head's
  1/(2σ²) and matters only for band skipping. Conservative: 0 only if no pair of the two
  blocks can contribute (or, with bias_cutoff, every pair's Gaussian term is < −cutoff);
  2 only if every pair is visible.
  """
  f32 = jnp.float32
  q_tmin, q_tmax, k_tmin, k_tmax = (jnp.asarray(x, f32) for x in (q_tmin, q_tmax, k_tmin, k_tmax))
  # Segment ranges: a pair can match only if the id ranges overlap and some key is valid.
  skip = (k_smax < 0) | (k_smax < q_smin) | (k_smin > q_smax)
  full = (q_smin == q_smax) & (k_smin == k_smax) & (q_smin == k_smin) & (k_all_valid > 0)
  if spec.causal_block is not None:
    inv_b = 1.0 / spec.causal_block
    qb_lo = jnp.floor(q_tmin * inv_b + BLOCK_EPS)
    qb_hi = jnp.floor(q_tmax * inv_b + BLOCK_EPS)
    kb_lo = jnp.floor(k_tmin * inv_b + BLOCK_EPS)
    kb_hi = jnp.floor(k_tmax * inv_b + BLOCK_EPS)
    skip = skip | (kb_lo > qb_hi + spec.lookahead_blocks)
    full = full & (kb_hi <= qb_lo + spec.lookahead_blocks)
  elif spec.causal:
    skip = skip | (k_tmin > q_tmax)
    full = full & (k_tmax <= q_tmin)
  # Smallest / largest |t_q − t_k| between the two time intervals.
  gap = jnp.maximum(jnp.maximum(k_tmin - q_tmax, q_tmin - k_tmax), 0.0)
  if spec.window is not None:
    far = jnp.maximum(q_tmax - k_tmin, k_tmax - q_tmin)
    skip = skip | (gap > spec.window)
    full = full & (far <= spec.window)
  if spec.bias_cutoff is not None:
    skip = skip | (gap * gap * inv_h > spec.bias_cutoff)
  return jnp.where(skip, SKIP, jnp.where(full, FULL, PARTIAL)).astype(jnp.int32)


def block_codes(spec: MaskSpec, q_stats: BlockStats, k_stats: BlockStats, inv):
  """All block codes: [B, H, n_q_blocks, n_k_blocks] int32 (inv: [H] float32)."""
  q = [x[:, None, :, None] for x in q_stats[:4]]
  k = [x[:, None, None, :] for x in k_stats]
  codes = block_code(spec, q[0], q[1], q[2], q[3], k[0], k[1], k[2], k[3], k[4],
                     inv[None, :, None, None])
  shape = (q_stats.t_min.shape[0], inv.shape[0], q_stats.t_min.shape[1], k_stats.t_min.shape[1])
  return jnp.broadcast_to(codes, shape)


def kv_block_range(codes):
  """codes [B, H, nq, nk] → (first, last) needed k block per q block, int32 [B, H, nq].

  Rows with no needed block get first = last = 0 (the kernel then only re-reads block 0).
  Used to clamp the K/V index map so skipped blocks outside [first, last] cause no DMA.
  """
  nk = codes.shape[-1]
  need = codes > 0
  idx = jnp.arange(nk, dtype=jnp.int32)
  first = jnp.min(jnp.where(need, idx, nk), axis=-1)
  last = jnp.max(jnp.where(need, idx, -1), axis=-1)
  empty = last < 0
  return jnp.where(empty, 0, first).astype(jnp.int32), jnp.where(empty, 0, last).astype(jnp.int32)


def count_skipped_blocks(t_q, t_k, sigma, *, spec: MaskSpec, block_q: int, block_k: int,
                         q_segment_ids=None, kv_segment_ids=None):
  """Number of (batch, head, q-block, k-block) triples a blocked backend skips, and the total.

  Mirrors what the Pallas backends do (same padding, statistics and predicate), so tests and
  benchmarks can check that band skipping and masks really remove work.
  """
  b, nq = t_q.shape
  nk = t_k.shape[1]
  q_seg, kv_seg = normalise_segment_ids(q_segment_ids, kv_segment_ids, b, nq, nk)
  nq_p, nk_p = round_up(nq, block_q), round_up(nk, block_k)
  t_q, t_k, q_seg, kv_seg = pad_inputs(t_q, t_k, q_seg, kv_seg, nq_p, nk_p)
  codes = block_codes(spec, block_stats(t_q, q_seg, block_q, keys=False),
                      block_stats(t_k, kv_seg, block_k, keys=True), inv_two_sigma_sq(sigma))
  return int(jnp.sum(codes == SKIP)), int(codes.size)
