"""Gaussian attention under a device mesh: a `shard_map` wrapper around `api.gaussian_attention`.

Layout (mesh axes of sharding.py): batch over (`data`, `fsdp`), heads over `tensor`, and the
sequence over `context` (sequence parallel). Attention is independent per (batch, head), so
batch and head sharding need no communication. With a `context` axis of size n > 1 each
device holds a slice of the queries and of the keys, and `context_schedule` picks how the keys
reach the queries:

  * ``"ring"`` (default): n steps; at step s each device attends its queries to the K/V slice
    of device (i − s) mod n while `ppermute` passes that slice on to the next device, so the
    transfer of step s + 1 runs under the kernels of step s (key times and segment ids, which
    are small, are all-gathered once). Each step returns (out, lse)
    (`return_lse=True`) and the steps merge exactly by their lse; the backward runs the steps'
    own backward in reverse order (the lse cotangent goes into dS) while the dK/dV of the
    previous one travel the ring back to their owner. Extra memory: one K/V slice in flight
    for inference; under differentiation each step keeps its slice for the backward (as much
    as the all-gather).
  * ``"all_gather"``: K, V, key times and key segment ids are all-gathered over `context`
    (the backward of the all-gather is a reduce-scatter, so dK/dV come back sharded); one full
    copy of K/V per device, and the kernels wait for the whole gather.

Masks are computed from times, so any assignment of positions to devices is exact; with
`causal`, slices in a device's future are skipped block by block (their steps cost a launch).

σ [H] is sharded like the heads; its gradient is summed over the batch / context devices by
shard_map's transpose.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from avatar_jax.kernels.gaussian_attention import api, common

CONTEXT_SCHEDULES = ("ring", "all_gather")
# Multiprocessors the persistent GPU forward leaves free under the ring, for the transfer's
# communication kernel: with all of them busy the transfer waits for the forward to end.
# 2 × H200, B8 N4096 (docs/benchmarks.md): forward 1.66 ms with 0, 4 or 8 free, 1.34 with 16.
RING_SM_MARGIN = 16


def _present(mesh, axes):
  return tuple(a for a in axes if a in mesh.axis_names)


def _size(mesh, axes):
  return math.prod(mesh.shape[a] for a in axes)


def _spec_entry(axes):
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def sharded_gaussian_attention(q, k, v, t_q, t_k, sigma, *, mesh=None,
                               batch_axes=("data", "fsdp"), head_axis="tensor",
                               context_axis="context", context_schedule="ring",
                               q_segment_ids=None, kv_segment_ids=None, **kwargs):
  """`api.gaussian_attention` with q/k/v sharded over batch, heads and (optionally) sequence.

  Args:
    q: [B, Nq, H, D]; k, v: [B, Nk, Hkv, D]; t_q [B, Nq]; t_k [B, Nk]; sigma [H]: as in
      `api.gaussian_attention`, as global (possibly sharded) arrays.
    mesh: a `jax.sharding.Mesh`; default: the mesh set with `jax.set_mesh`.
    batch_axes / head_axis / context_axis: mesh axis names; axes absent from the mesh are
      ignored. B must divide by the batch axes' size, H and Hkv by the head axis' size, Nq and
      Nk by the context axis' size.
    context_schedule: "ring" or "all_gather": how K/V cross the `context` axis (module
      docstring). Ignored without a `context` axis of size > 1.
    q_segment_ids, kv_segment_ids, **kwargs: forwarded to `api.gaussian_attention`
      (`return_lse` is not supported here).

  Returns:
    [B, Nq, H, D] sharded as P(batch_axes, context_axis, head_axis, None).
  """
  if context_schedule not in CONTEXT_SCHEDULES:
    raise ValueError(f"context_schedule must be one of {CONTEXT_SCHEDULES}, got "
                     f"{context_schedule!r}")
  if "return_lse" in kwargs:
    raise TypeError("sharded_gaussian_attention returns out only; return_lse is not supported")
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
      raise ValueError("sharded_gaussian_attention needs a mesh: pass mesh= or call it under "
                       "jax.set_mesh(mesh)")
  batch = _present(mesh, tuple(batch_axes))
  heads = _present(mesh, (head_axis,) if head_axis else ())
  ctx = _present(mesh, (context_axis,) if context_axis else ())
  b, nq, h, _ = q.shape
  nk, hkv = k.shape[1], k.shape[2]
  checks = (("batch B", b, batch), ("heads H", h, heads), ("kv heads Hkv", hkv, heads),
            ("query length Nq", nq, ctx), ("key length Nk", nk, ctx))
  for what, n, axes in checks:
    if n % _size(mesh, axes):
      raise ValueError(f"sharded_gaussian_attention: {what}={n} is not divisible by the mesh "
                       f"axes {axes} of total size {_size(mesh, axes)} (mesh {dict(mesh.shape)})")
  bs, hs, cs = _spec_entry(batch), _spec_entry(heads), _spec_entry(ctx)
  x_spec = P(bs, cs, hs, None)
  t_spec = P(bs, cs)
  n_ctx = _size(mesh, ctx) if ctx else 1

  args = [q, k, v, t_q, t_k, sigma]
  specs = [x_spec, x_spec, x_spec, t_spec, t_spec, P(hs)]
  has_q_seg, has_kv_seg = q_segment_ids is not None, kv_segment_ids is not None
  if has_q_seg:
    args.append(q_segment_ids)
    specs.append(t_spec)
  if has_kv_seg:
    args.append(kv_segment_ids)
    specs.append(t_spec)

  def local(q, k, v, t_q, t_k, sigma, *segs):
    segs = list(segs)
    q_seg = segs.pop(0) if has_q_seg else None
    kv_seg = segs.pop(0) if has_kv_seg else None
    if n_ctx > 1 and context_schedule == "ring":
      return _ring(q, k, v, t_q, t_k, sigma, q_seg, kv_seg, axis=ctx, n=n_ctx, **kwargs)
    if n_ctx > 1:
      all_gather = _sequence_gather(ctx)
      k, v, t_k = all_gather(k), all_gather(v), all_gather(t_k)
      if kv_seg is not None:
        kv_seg = all_gather(kv_seg)
    return api.gaussian_attention(q, k, v, t_q, t_k, sigma, q_segment_ids=q_seg,
                                  kv_segment_ids=kv_seg, **kwargs)

  if _explicit(mesh):
    # Explicit-sharding meshes (the jax.make_mesh default) require inputs to already carry
    # the in_specs; reshard says so in the program instead of failing.
    args = [jax.sharding.reshard(a, NamedSharding(mesh, s)) if isinstance(mesh, Mesh)
            else jax.sharding.reshard(a, s) for a, s in zip(args, specs)]
  # check_vma=False: the backends (scans with constant carries, pallas_call) are not written
  # against shard_map's varying-axis types; shard_map then psums the cotangents of inputs
  # that are replicated over some axes (σ over batch/context), which is what we need.
  fn = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=x_spec,
                     check_vma=False)
  return fn(*args)


def _sequence_gather(axis):
  """All-gather over `axis` along the sequence axis (1) of [B, N, ...] arrays."""
  return functools.partial(jax.lax.all_gather, axis_name=axis, axis=1, tiled=True)


def _ring(q, k, v, t_q, t_k, sigma, q_seg, kv_seg, *, axis, n, **kwargs):
  """Inside the map: the local queries against all n K/V slices, passed round the ring.

  K and V travel stacked as one buffer, so each step is one collective-permute (XLA's GPU
  scheduler overlaps a bounded number of collectives with compute, by default one). Key times
  and segment ids (tiny, no cotangent) are all-gathered once instead.
  """
  impl = api.resolve_implementation(kwargs.get("implementation", "auto"), q.shape[0],
                                    q.shape[2], q.shape[1], k.shape[1], q.shape[3], q.dtype)
  if impl == "pallas_gpu":
    kwargs.setdefault("sm_margin", RING_SM_MARGIN)
  gather = _sequence_gather(axis)
  t_k_all = gather(t_k)
  seg_all = None if kv_seg is None else gather(kv_seg)
  cfg = (axis, n, tuple(sorted(kwargs.items())))
  return _ring_attention(cfg, q, jnp.stack([k, v]), sigma, t_q, t_k_all, q_seg, seg_all)


def _ring_step(cfg, s, t_q, t_k_all, q_seg, seg_all):
  """(q, kv [2, B, Nk, Hkv, D], σ) → (out, lse) of step s: keys of device (i − s) mod n."""
  axis, n, kwargs = cfg
  nk = t_k_all.shape[1] // n
  start = ((jax.lax.axis_index(axis) - s) % n) * nk  # the slice's place in the gathered axis
  t_k = jax.lax.dynamic_slice_in_dim(t_k_all, start, nk, axis=1)
  seg = None if seg_all is None else jax.lax.dynamic_slice_in_dim(seg_all, start, nk, 1)

  def step(q, kv, sigma):
    return api.gaussian_attention(q, kv[0], kv[1], t_q, t_k, sigma, q_segment_ids=q_seg,
                                  kv_segment_ids=seg, return_lse=True, **dict(kwargs))
  return step


def _ring_forward(cfg, q, kv, sigma, t_q, t_k_all, q_seg, seg_all, keep_vjps):
  """The n steps, merged by lse in float32 (online softmax over slices).

  Returns out [B, Nq, H, D] float32, lse [B, Nq, H, 1] and per step (out_s, lse_s, vjp_s)
  when `keep_vjps` (the backward needs each step's residuals, so the slices stay alive).
  """
  axis, n, _ = cfg
  perm = [(i, (i + 1) % n) for i in range(n)]
  b, nq, h, d = q.shape
  o_acc = jnp.zeros((b, nq, h, d), jnp.float32)
  l_acc = jnp.zeros((b, nq, h, 1), jnp.float32)
  m = jnp.full((b, nq, h, 1), -jnp.inf, jnp.float32)
  steps = []
  for s in range(n):
    # Issued before this step's kernels, so the transfer overlaps them.
    nxt = None if s == n - 1 else jax.lax.ppermute(kv, axis, perm)
    f = _ring_step(cfg, s, t_q, t_k_all, q_seg, seg_all)
    if keep_vjps:
      (out, lse), vjp = jax.vjp(f, q, kv, sigma)
    else:
      (out, lse), vjp = f(q, kv, sigma), None
    lse = jnp.swapaxes(lse, 1, 2)[..., None]  # [B, Nq, H, 1]
    steps.append((out, lse, vjp))
    m_new = jnp.maximum(m, lse)
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing visible yet
    alpha = jnp.exp(m - m_safe)
    w = jnp.exp(lse - m_safe)
    o_acc = alpha * o_acc + w * out.astype(jnp.float32)
    l_acc = alpha * l_acc + w
    m = m_new
    kv = nxt
  nonempty = l_acc > 0
  out = o_acc / jnp.where(nonempty, l_acc, 1.0)
  lse = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l_acc, 1.0)), -jnp.inf)
  return out, lse, steps


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_attention(cfg, q, kv, sigma, t_q, t_k_all, q_seg, seg_all):
  out, _, _ = _ring_forward(cfg, q, kv, sigma, t_q, t_k_all, q_seg, seg_all, keep_vjps=False)
  return out.astype(q.dtype)


def _ring_attention_fwd(cfg, q, kv, sigma, t_q, t_k_all, q_seg, seg_all):
  out, lse, steps = _ring_forward(cfg, q, kv, sigma, t_q, t_k_all, q_seg, seg_all,
                                  keep_vjps=True)
  res = (out, lse, steps, q, kv, sigma, t_q, t_k_all, q_seg, seg_all)
  return out.astype(q.dtype), res


def _ring_attention_bwd(cfg, res, dout):
  """Steps in reverse; each step's dK/dV joins the accumulator travelling back to its owner.

  The merge's VJP gives step s dout_s = a_s·dout and dlse_s = a_s·Σ_d dout·(out_s − out),
  a_s = exp(lse_s − lse). The accumulator passes through an optimization barrier together
  with step s's cotangents, so step s's kernels cannot start before step s + 1's dK/dV exist,
  and the transfer of those runs under step s's kernels instead of after all of them.
  """
  axis, n, _ = cfg
  out, lse, steps, q, kv, sigma, t_q, t_k_all, q_seg, seg_all = res
  back = [(i, (i - 1) % n) for i in range(n)]
  dout = dout.astype(jnp.float32)
  lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  dq = jnp.zeros(q.shape, jnp.float32)
  dsigma = jnp.zeros(sigma.shape, jnp.float32)
  acc = None
  for s in reversed(range(n)):
    out_s, lse_s, vjp = steps[s]
    a = jnp.where(jnp.isfinite(lse_s), jnp.exp(lse_s - lse_safe), 0.0)  # [B, Nq, H, 1]
    do_s = (a * dout).astype(out_s.dtype)
    dlse_s = jnp.swapaxes(jnp.sum(a * dout * (out_s.astype(jnp.float32) - out), -1), 1, 2)
    sent = None
    if acc is not None:
      acc, do_s, dlse_s = jax.lax.optimization_barrier((acc, do_s, dlse_s))
      sent = jax.lax.ppermute(acc, axis, back)
    dq_s, dkv_s, dsig_s = vjp((do_s, dlse_s))
    dq = dq + dq_s.astype(jnp.float32)
    dsigma = dsigma + dsig_s.astype(jnp.float32)
    acc = dkv_s if sent is None else (sent.astype(jnp.float32) + dkv_s).astype(kv.dtype)
  # shard_map sums dσ over the devices after this returns. Tied to the last transfer, that
  # reduction starts after it: XLA's GPU scheduler overlaps one collective at a time, and it
  # would otherwise hold the reduction in flight and run the transfer unoverlapped.
  dsigma, acc = jax.lax.optimization_barrier((dsigma, acc))
  zero = common.zero_cotangent
  return (dq.astype(q.dtype), acc, dsigma.astype(sigma.dtype), zero(t_q), zero(t_k_all),
          zero(q_seg), zero(seg_all))


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


def _explicit(mesh) -> bool:
  types = getattr(mesh, "axis_types", ())
  return any(t == AxisType.Explicit for t in types)
