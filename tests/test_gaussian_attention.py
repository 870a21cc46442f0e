"""Gaussian time-distance attention: every implementation against a float64 NumPy reference.

Pallas TPU kernels run in TPU interpret mode with uninitialised memory filled with NaN: an
output block that is never written back stays NaN, and one written back without being computed
carries another block's values; both fail the checks below (see
test_interpret_mode_poisons_unwritten_blocks).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from avatar_jax.kernels.gaussian_attention import api, common, reference, sharded

import trainer_harness as harness

INV_MAX = 1e18  # the documented clamp of 1/(2σ²)
# NaN-filled uninitialised buffers: unwritten output blocks cannot pass the checks below.
TPU_INTERPRET = pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise")

_GPU_SPEC = importlib.util.find_spec("avatar_jax.kernels.gaussian_attention.pallas_gpu")




def _gpu_module():
  """The colleague-owned GPU backend if its file exists; an import error fails loudly."""
  if _GPU_SPEC is None:
    return None
  return importlib.import_module("avatar_jax.kernels.gaussian_attention.pallas_gpu")


# ----------------------------------------------------------------------------------------
# Independent float64 NumPy reference (forward and analytic backward).
# ----------------------------------------------------------------------------------------


def np_visible(tq, tk, *, causal=False, causal_block=None, lookahead_blocks=0, window=None,
               q_seg=None, kv_seg=None):
  tq = tq.astype(np.float64)
  tk = tk.astype(np.float64)
  b, nq = tq.shape
  nk = tk.shape[1]
  vis = np.ones((b, nq, nk), bool)
  dt = tq[:, :, None] - tk[:, None, :]
  if causal_block is not None:
    bq = np.floor(tq / causal_block + 1e-3)   # common.BLOCK_EPS: on a block's start within 1e-3
    bk = np.floor(tk / causal_block + 1e-3)
    vis &= bk[:, None, :] <= bq[:, :, None] + lookahead_blocks
  elif causal:
    vis &= dt >= 0
  if window is not None:
    vis &= np.abs(dt) <= window
  if kv_seg is not None:
    vis &= (kv_seg >= 0)[:, None, :]
    if q_seg is not None:
      vis &= q_seg[:, :, None] == kv_seg[:, None, :]
  return vis


def np_inv(sigma):
  sigma = np.asarray(sigma, np.float64)
  with np.errstate(divide="ignore"):
    return np.minimum(0.5 / sigma**2, INV_MAX)


def np_attention(q, k, v, tq, tk, sigma, scale, vis, dout=None, dlse=None):
  """float64 out [B,Nq,H,D] and, with dout, (dq, dk, dv, dsigma) by the analytic formulas.

  With dlse [B, H, Nq] (the cotangent of lse = log Σ_j exp s_ij) as well: (out, lse, grads),
  the gradients of Σ out·dout + Σ lse·dlse (∂lse_i/∂s_ij = P_ij adds dlse_i·P_ij to dS).
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, nq, h, d = q.shape
  rep = h // k.shape[2]
  kr, vr = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  dt = tq.astype(np.float64)[:, :, None] - tk.astype(np.float64)[:, None, :]
  pen = dt[:, None] ** 2 * np_inv(sigma)[None, :, None, None]  # [B,H,Nq,Nk]
  s = np.einsum("bqhd,bkhd->bhqk", q, kr) * scale - pen
  vis = vis[:, None] if vis.ndim == 3 else vis  # [B, Nq, Nk] or per head [B, H, Nq, Nk]
  s = np.where(vis, s, -np.inf)
  m = s.max(-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  p = np.exp(s - m)
  l = p.sum(-1, keepdims=True)
  p = p / np.where(l == 0, 1, l)
  out = np.einsum("bhqk,bkhd->bqhd", p, vr)
  if dout is None:
    return out
  do = np.asarray(dout, np.float64)
  dp = np.einsum("bqhd,bkhd->bhqk", do, vr)
  delta = np.einsum("bqhd,bqhd->bhq", do, out)[..., None]
  ds = p * (dp - delta + (0.0 if dlse is None else np.asarray(dlse, np.float64)[..., None]))
  dq = np.einsum("bhqk,bkhd->bqhd", ds, kr) * scale
  dkr = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
  dvr = np.einsum("bhqk,bqhd->bkhd", p, do)
  fold = lambda x: x.reshape(b, x.shape[1], h // rep, rep, d).sum(3)
  sig = np.asarray(sigma, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    # dL/dσ = Σ dS·dt²/σ³ = Σ dS·2·pen/σ; 0 where σ = inf or the clamp is active.
    dsig = np.einsum("bhqk,bhqk->h", ds, pen) * 2 / sig
  dsig = np.where(np.isinf(sig) | (0.5 / sig**2 >= INV_MAX), 0.0, dsig)
  grads = (dq, fold(dkr), fold(dvr), dsig)
  if dlse is None:
    return out, grads
  with np.errstate(divide="ignore"):
    lse = np.where(l[..., 0] > 0, m[..., 0] + np.log(np.where(l[..., 0] > 0, l[..., 0], 1)),
                   -np.inf)
  return out, lse, grads


def rel_err(x, ref):
  x = np.asarray(x, np.float64)
  scale = np.max(np.abs(ref))
  return float(np.max(np.abs(x - ref)) / (scale if scale > 0 else 1.0))


# ----------------------------------------------------------------------------------------
# Cases.
# ----------------------------------------------------------------------------------------


def make_inputs(seed, *, b, nq, nk, h, hkv, d, dtype, sorted_times=True, self_times=False,
                t_max=2.0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, nq, h, d)).astype(np.float32)
  k = rng.normal(size=(b, nk, hkv, d)).astype(np.float32)
  v = rng.normal(size=(b, nk, hkv, d)).astype(np.float32)
  dout = rng.normal(size=(b, nq, h, d)).astype(np.float32)
  tq = rng.uniform(0, t_max, (b, nq)).astype(np.float32)
  if sorted_times:
    tq = np.sort(tq, axis=1)
  tk = tq.copy() if self_times else rng.uniform(0, t_max, (b, nk)).astype(np.float32)
  cast = lambda x: np.asarray(jnp.asarray(x, dtype))
  return dict(q=cast(q), k=cast(k), v=cast(v), dout=cast(dout), tq=tq, tk=tk)


CASES = {
    # fp32, GQA, ragged lengths, Nq ≠ Nk, causal + window + segment ids with padding and a
    # query segment no key has (fully masked rows), σ tiny / moderate / wide / inf.
    "fp32_gqa_causal_window_segments": dict(
        shape=dict(b=2, nq=37, nk=53, h=4, hkv=2, d=64, dtype=jnp.float32),
        mask=dict(causal=True, window=0.9), segments=True,
        sigma=[1e-3, 0.1, 1.0, np.inf], blocks=dict(block_q=32, block_k=32)),
    # bf16, batch 1, D=128, self-attention times (equal times), block-causal with look-ahead,
    # key padding only, a huge σ.
    "bf16_d128_block_causal_lookahead_padding": dict(
        shape=dict(b=1, nq=45, nk=45, h=2, hkv=1, d=128, dtype=jnp.bfloat16, self_times=True),
        mask=dict(causal_block=0.25, lookahead_blocks=1), kv_padding=5,
        sigma=[0.05, 1e4], blocks=dict(block_q=24, block_k=24)),
    # fp16 inputs, no mask, unsorted times.
    "fp16_unsorted_nomask": dict(
        shape=dict(b=1, nq=20, nk=27, h=2, hkv=2, d=64, dtype=jnp.float16, sorted_times=False),
        mask=dict(), sigma=[0.3, 2.0], blocks=dict(block_q=16, block_k=16)),
}


def case_arrays(name):
  c = CASES[name]
  x = make_inputs(zlib.crc32(name.encode()), **c["shape"])
  b, nq = x["tq"].shape
  nk = x["tk"].shape[1]
  rng = np.random.default_rng(7)
  q_seg = kv_seg = None
  if c.get("segments"):
    q_seg = rng.integers(0, 2, (b, nq)).astype(np.int32)
    q_seg[:, 3] = 9  # no key has segment 9: fully masked rows
    kv_seg = rng.integers(0, 2, (b, nk)).astype(np.int32)
    kv_seg[:, -4:] = -1
  if c.get("kv_padding"):
    kv_seg = np.zeros((b, nk), np.int32)
    kv_seg[:, -c["kv_padding"]:] = -1
  sigma = np.asarray(c["sigma"], np.float32)
  return x, q_seg, kv_seg, sigma


def _impl_kwargs(impl, blocks):
  if impl == "pallas_tpu":
    return dict(interpret=TPU_INTERPRET, **blocks)
  if impl == "xla_chunked":
    return dict(chunk_q=16, chunk_k=8)
  if impl == "pallas_gpu":
    return dict(interpret=True)
  return {}


def run_impl(impl, x, q_seg, kv_seg, sigma, mask, extra):
  def f(q, k, v, s):
    return api.gaussian_attention(q, k, v, x["tq"], x["tk"], s, q_segment_ids=q_seg,
                                  kv_segment_ids=kv_seg, implementation=impl, **mask, **extra)

  @jax.jit  # one compilation instead of op-by-op dispatch: much faster on CPU
  def fwd_bwd(q, k, v, s, dout):
    out, vjp = jax.vjp(f, q, k, v, s)
    return out, vjp(dout)

  out, grads = fwd_bwd(x["q"], x["k"], x["v"], jnp.asarray(sigma), x["dout"])
  return np.asarray(out.astype(jnp.float32)), [np.asarray(g.astype(jnp.float32)) for g in grads]


IMPLS = ["xla", "xla_chunked", "pallas_tpu"]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_float64_reference(impl, name):
  c = CASES[name]
  x, q_seg, kv_seg, sigma = case_arrays(name)
  vis = np_visible(x["tq"], x["tk"], q_seg=q_seg, kv_seg=kv_seg, **c["mask"])
  scale = x["q"].shape[-1] ** -0.5
  ref_out, ref_grads = np_attention(x["q"], x["k"], x["v"], x["tq"], x["tk"], sigma, scale,
                                    vis, x["dout"])
  out, grads = run_impl(impl, x, q_seg, kv_seg, sigma, c["mask"], _impl_kwargs(impl, c["blocks"]))
  assert np.isfinite(out).all(), "non-finite output (an unwritten block?)"
  for g in grads:
    assert np.isfinite(g).all(), "non-finite gradient (an unwritten block?)"
  low = c["shape"]["dtype"] != jnp.float32
  assert rel_err(out, ref_out) <= (1e-2 if low else 1e-5), rel_err(out, ref_out)
  for gname, g, r in zip(("dq", "dk", "dv", "dsigma"), grads, ref_grads):
    assert rel_err(g, r) <= (2e-2 if low else 1e-4), (gname, rel_err(g, r))
  # Rows with no visible key: zero output and zero dq.
  empty = ~vis.any(-1)  # [B, Nq]
  if empty.any():
    assert np.all(out[empty] == 0)
    assert np.all(grads[0][empty] == 0)
  assert (not empty.any()) == (name != "fp32_gqa_causal_window_segments")


@pytest.mark.parametrize("impl,name", [
    ("xla", "fp32_gqa_causal_window_segments"),
    ("xla_chunked", "fp32_gqa_causal_window_segments"),
    ("pallas_tpu", "fp32_gqa_causal_window_segments"),
    ("xla_chunked", "bf16_d128_block_causal_lookahead_padding"),
    ("pallas_tpu", "bf16_d128_block_causal_lookahead_padding"),
])
def test_return_lse_and_its_gradient(impl, name):
  """`return_lse=True`: lse against float64, and the gradients of a loss that reads both out
  and lse (the lse cotangent enters dS and dσ) against the analytic formulas."""
  c = CASES[name]
  x, q_seg, kv_seg, sigma = case_arrays(name)
  vis = np_visible(x["tq"], x["tk"], q_seg=q_seg, kv_seg=kv_seg, **c["mask"])
  b, nq, h, _ = x["q"].shape
  dlse = np.random.default_rng(3).normal(size=(b, h, nq)).astype(np.float32)
  scale = x["q"].shape[-1] ** -0.5
  ref_out, ref_lse, ref_grads = np_attention(x["q"], x["k"], x["v"], x["tq"], x["tk"], sigma,
                                             scale, vis, x["dout"], dlse)
  extra = _impl_kwargs(impl, c["blocks"])

  @jax.jit
  def fwd_bwd(q, k, v, s):
    def loss(q, k, v, s):
      out, lse = api.gaussian_attention(q, k, v, x["tq"], x["tk"], s, q_segment_ids=q_seg,
                                        kv_segment_ids=kv_seg, implementation=impl,
                                        return_lse=True, **c["mask"], **extra)
      read = jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * dlse)
      return jnp.sum(out.astype(jnp.float32) * x["dout"].astype(jnp.float32)) + read, (out, lse)
    return jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, s)

  grads, (out, lse) = fwd_bwd(x["q"], x["k"], x["v"], jnp.asarray(sigma))
  lse = np.asarray(lse)
  assert lse.shape == (b, h, nq) and lse.dtype == np.float32
  empty = ~np.broadcast_to(vis.any(-1)[:, None], lse.shape)
  assert np.array_equal(np.isneginf(lse), empty)
  low = c["shape"]["dtype"] != jnp.float32
  lse_err = np.abs(lse[~empty] - ref_lse[~empty]) / (1.0 + np.abs(ref_lse[~empty]))
  assert lse_err.max() <= (1e-2 if low else 1e-5), lse_err.max()
  assert rel_err(np.asarray(out, np.float32), ref_out) <= (1e-2 if low else 1e-5)
  for gname, g, r in zip(("dq", "dk", "dv", "dsigma"), grads, ref_grads):
    assert rel_err(np.asarray(g, np.float32), r) <= (2e-2 if low else 1e-4), (gname,
                                                                               rel_err(g, r))
  # The lse term changes dq, dk and dσ (dv = Pᵀ·dout does not see it): a backend that
  # ignored dlse would fail above.
  _, base_grads = np_attention(x["q"], x["k"], x["v"], x["tq"], x["tk"], sigma, scale, vis,
                               x["dout"])
  for i in (0, 1, 3):
    assert rel_err(ref_grads[i], base_grads[i]) > 1e-2


def test_pallas_gpu_backend():
  """GPU kernels: interpret-mode numerics when the module is present, else a clear error."""
  mod = _gpu_module()
  if mod is None:
    x, q_seg, kv_seg, sigma = case_arrays("fp16_unsorted_nomask")
    with pytest.raises(NotImplementedError, match="pallas_gpu"):
      api.gaussian_attention(x["q"], x["k"], x["v"], x["tq"], x["tk"], sigma,
                             implementation="pallas_gpu")
    return
  # The Hopper kernels take 16-bit inputs only; their interpreter is slow on CPU, so one
  # small case here (the module's own tests cover the rest).
  test_matches_float64_reference("pallas_gpu", "fp16_unsorted_nomask")


# ----------------------------------------------------------------------------------------
# Finite differences on the float64 reference.
# ----------------------------------------------------------------------------------------


def test_finite_difference_dsigma_dq():
  """check_grads of the float64 reference: validates the analytic dσ formula used above."""
  impl = "xla"
  from jax.test_util import check_grads
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    b, nq, nk, h, d = 1, 6, 9, 2, 8
    q = jnp.asarray(rng.normal(size=(b, nq, h, d)))
    k = jnp.asarray(rng.normal(size=(b, nk, h, d)))
    v = jnp.asarray(rng.normal(size=(b, nk, h, d)))
    tq = jnp.asarray(np.sort(rng.uniform(0, 1, (b, nq))))
    tk = jnp.asarray(np.sort(rng.uniform(0, 1, (b, nk))))
    sigma = jnp.asarray([0.15, 0.6])

    def f(q, sigma):
      return api.gaussian_attention(q, k, v, tq, tk, sigma, causal=True, implementation=impl)

    assert f(q, sigma).dtype == jnp.float64
    check_grads(f, (q, sigma), order=1, modes=["rev"], eps=1e-5, atol=1e-6, rtol=1e-6)
    # And the analytic NumPy backward used as the reference everywhere else agrees with it.
    dout = rng.normal(size=q.shape)
    vis = np_visible(np.asarray(tq), np.asarray(tk), causal=True)
    _, (dq, _, _, dsig) = np_attention(q, k, v, np.asarray(tq), np.asarray(tk),
                                       np.asarray(sigma), d ** -0.5, vis, dout)
    _, vjp = jax.vjp(f, q, sigma)
    got_dq, got_dsig = vjp(jnp.asarray(dout))
    np.testing.assert_allclose(got_dq, dq, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got_dsig, dsig, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------
# Band skipping.
# ----------------------------------------------------------------------------------------


def _np_skipped_pairs(tq, tk, sigma, cutoff, bq, bk):
  """[B, H, Nq, Nk] True where the pair lies in a skipped (q-block, k-block, head) triple."""
  b, nq = tq.shape
  nk = tk.shape[1]
  inv = np_inv(sigma)
  out = np.zeros((b, len(sigma), nq, nk), bool)
  for i0 in range(0, nq, bq):
    for j0 in range(0, nk, bk):
      tqb, tkb = tq[:, i0:i0 + bq], tk[:, j0:j0 + bk]
      gap = np.maximum(np.maximum(tkb.min(1) - tqb.max(1), tqb.min(1) - tkb.max(1)), 0.0)
      skip = gap[:, None] ** 2 * inv[None, :] > cutoff  # [B, H]
      out[:, :, i0:i0 + bq, j0:j0 + bk] = skip[:, :, None, None]
  return out


def test_band_skipping_bound_and_really_skips():
  b, n, h, d, bq, bk = 1, 48, 2, 64, 16, 16
  x = make_inputs(11, b=b, nq=n, nk=n, h=h, hkv=h, d=d, dtype=jnp.float32, self_times=True,
                  t_max=4.0)
  # 0.26 s spacing: adjacent blocks of the narrow head are skipped at cutoff 3 (pen ≈ 5).
  x["tq"] = x["tk"] = np.linspace(0, 12, n, dtype=np.float32)[None]
  sigma = np.asarray([0.08, 0.15], np.float32)
  scale = d ** -0.5
  vis = np_visible(x["tq"], x["tk"])
  exact = np_attention(x["q"], x["k"], x["v"], x["tq"], x["tk"], sigma, scale, vis)
  for cutoff in (3.0, 20.0):
    skipped, total = common.count_skipped_blocks(
        jnp.asarray(x["tq"]), jnp.asarray(x["tk"]), jnp.asarray(sigma),
        spec=common.MaskSpec(bias_cutoff=cutoff), block_q=bq, block_k=bk)
    pairs = _np_skipped_pairs(x["tq"], x["tk"], sigma, cutoff, bq, bk)
    np_blocks = pairs[:, :, ::bq, ::bk]
    assert skipped == int(np_blocks.sum()) and 0 < skipped < total, (cutoff, skipped, total)
    if cutoff != 3.0:
      continue  # one interpret-mode kernel run keeps the test fast; 3.0 has a visible error
    out, grads = run_impl("pallas_tpu", x, None, None, sigma, dict(bias_cutoff=cutoff),
                          dict(interpret=TPU_INTERPRET, block_q=bq, block_k=bk))
    # 1) It really skips: the result equals attention with the skipped pairs removed, forward
    #    and backward (the backward skips the same blocks).
    ref_out, ref_grads = np_attention(x["q"], x["k"], x["v"], x["tq"], x["tk"], sigma, scale,
                                      vis[:, None] & ~pairs, x["dout"])
    assert rel_err(out, ref_out) <= 1e-5
    for g, r in zip(grads, ref_grads):
      assert rel_err(g, r) <= 1e-4
    # 2) The documented bound: |out − exact| ≤ 2·ε·max|v|, ε = min(1, |S|·exp(A − m − c)).
    q64, k64 = x["q"].astype(np.float64), x["k"].astype(np.float64)
    a = np.einsum("bqhd,bkhd->bhqk", q64, k64) * scale  # un-biased logits
    dt = x["tq"][:, :, None].astype(np.float64) - x["tk"][:, None, :]
    s = a - dt[:, None] ** 2 * np_inv(sigma)[None, :, None, None]
    m = np.where(pairs, -np.inf, s).max(-1)  # max kept logit [B, H, Nq]
    big_a = np.where(pairs, a, -np.inf).max(-1)
    n_s = pairs.sum(-1)
    eps = np.minimum(1.0, n_s * np.exp(big_a - m - cutoff))
    bound = 2 * eps * np.abs(x["v"]).max()  # [B, H, Nq]
    err = np.abs(out - exact).max(-1).transpose(0, 2, 1)  # [B, H, Nq]
    assert np.all(err <= bound + 1e-6), float((err - bound).max())
    assert err.max() > 1e-6  # the skipped pairs did carry weight: skipping is observable


# ----------------------------------------------------------------------------------------
# Sharding, dispatch, validation, helpers.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["xla", "xla_chunked", "pallas_tpu"])
def test_sharded_one_vs_eight_devices(impl):
  from avatar_jax import sharding as shd
  if len(jax.devices()) < 8:
    pytest.fail("tests/conftest.py should provide 8 CPU devices")
  x = make_inputs(5, b=2, nq=24, nk=30, h=4, hkv=2, d=16, dtype=jnp.float32)
  rng = np.random.default_rng(0)
  kv_seg = jnp.asarray(rng.integers(-1, 2, (2, 30)), jnp.int32)
  q_seg = jnp.asarray(rng.integers(0, 2, (2, 24)), jnp.int32)
  sigma = jnp.asarray([0.05, 0.3, 1.0, np.inf], jnp.float32)
  results = []
  # The interpret-mode kernels are slow on one device (16 grid steps per kernel), so the
  # 1-device side of the pallas_tpu comparison is the xla implementation (itself checked
  # against NumPy below); xla and xla_chunked compare with themselves.
  one_device_impl = "xla" if impl == "pallas_tpu" else impl
  for sizes, devs, run in (({"data": 1}, jax.devices()[:1], one_device_impl),
                           ({"data": 2, "context": 2, "tensor": 2}, jax.devices()[:8], impl)):
    mesh = shd.make_mesh(sizes, devices=devs)

    def loss(q, k, v, s, mesh=mesh, run=run):
      o = sharded.sharded_gaussian_attention(
          q, k, v, x["tq"], x["tk"], s, mesh=mesh, causal=True, q_segment_ids=q_seg,
          kv_segment_ids=kv_seg, implementation=run,
          **(dict(interpret=TPU_INTERPRET, block_q=16, block_k=32) if run == "pallas_tpu"
             else {}))
      return jnp.sum(o * x["dout"]), o

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
        x["q"], x["k"], x["v"], sigma)
    results.append(jax.tree.map(np.asarray, (out, grads)))
  (o1, g1), (o8, g8) = results
  assert rel_err(o8, o1) <= 1e-5
  for a, r in zip(g8, g1):
    assert rel_err(a, r) <= 1e-4
  vis = np_visible(x["tq"], x["tk"], causal=True, q_seg=np.asarray(q_seg),
                   kv_seg=np.asarray(kv_seg))
  assert rel_err(o1, np_attention(x["q"], x["k"], x["v"], x["tq"], x["tk"], np.asarray(sigma),
                                  16 ** -0.5, vis)) <= 1e-5


def test_context_ring_matches_float64_and_all_gather():
  """Sequence split over 4 devices: the ring (ppermute of K/V, steps merged by lse) and the
  all-gather schedule both match float64 (out and all four gradients), with causal masks,
  key padding, grouped heads and Nq ≠ Nk; the ring's program permutes and never gathers.

  The ring needs only the backends' lse contract (test_return_lse_and_its_gradient, per
  backend); the Pallas TPU kernels run under it in test_sharded_one_vs_eight_devices.
  """
  impl = "xla_chunked"
  from avatar_jax import sharding as shd
  x = make_inputs(11, b=2, nq=32, nk=24, h=4, hkv=2, d=16, dtype=jnp.float32)
  kv_seg = np.zeros((2, 24), np.int32)
  kv_seg[1, -7:] = -1  # batch row 1: the last 7 keys (two devices' slices) are padding
  sigma = jnp.asarray([0.05, 0.3, 1.0, np.inf], jnp.float32)
  mesh = shd.make_mesh({"data": 2, "context": 4}, devices=jax.devices()[:8])
  extra = dict(chunk_q=8, chunk_k=4)

  def grads_of(schedule):
    def loss(q, k, v, s):
      o = sharded.sharded_gaussian_attention(
          q, k, v, x["tq"], x["tk"], s, mesh=mesh, causal=True, kv_segment_ids=kv_seg,
          context_schedule=schedule, implementation=impl, **extra)
      return jnp.sum(o * x["dout"]), o
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    hlo = fn.lower(x["q"], x["k"], x["v"], sigma).as_text()
    (_, out), grads = fn(x["q"], x["k"], x["v"], sigma)
    return hlo, np.asarray(out), [np.asarray(g) for g in grads]

  vis = np_visible(x["tq"], x["tk"], causal=True, kv_seg=kv_seg)
  ref_out, ref_grads = np_attention(x["q"], x["k"], x["v"], x["tq"], x["tk"],
                                    np.asarray(sigma), 16 ** -0.5, vis, x["dout"])
  for schedule in ("ring", "all_gather"):
    hlo, out, grads = grads_of(schedule)
    assert ("collective_permute" in hlo) == (schedule == "ring"), schedule
    # The ring gathers only the key times and segment ids ([B, Nk] int/float), never K/V.
    gathers = [l for l in hlo.splitlines() if "all_gather" in l and "= " in l]
    kv_gather = any(re.search(r"-> tensor<\d+x\d+x\d+x\d+x", l) for l in gathers)
    assert kv_gather == (schedule == "all_gather"), (schedule, gathers)
    assert rel_err(out, ref_out) <= 1e-5, (schedule, rel_err(out, ref_out))
    for gname, g, r in zip(("dq", "dk", "dv", "dsigma"), grads, ref_grads):
      assert rel_err(g, r) <= 1e-4, (schedule, gname, rel_err(g, r))
  with pytest.raises(ValueError, match="context_schedule"):
    sharded.sharded_gaussian_attention(x["q"], x["k"], x["v"], x["tq"], x["tk"], sigma,
                                       mesh=mesh, context_schedule="tree")


def test_auto_dispatch_on_cpu():
  assert api.resolve_implementation("auto", 2, 4, 100, 100) == "xla"
  assert api.resolve_implementation("auto", 8, 16, 8192, 8192) == "xla_chunked"


def test_auto_dispatch_on_hopper_keeps_head_dims_the_gpu_kernel_fits(monkeypatch):
  monkeypatch.setattr(api, "target_platform", lambda: "gpu")
  monkeypatch.setattr(api, "_is_hopper", lambda: True)
  monkeypatch.setattr(api, "_gpu_module_available", lambda: True)
  pick = lambda d, dtype=jnp.bfloat16: api.resolve_implementation("auto", 2, 4, 256, 256, d, dtype)
  assert [pick(d) for d in (32, 64, 128, 192, 256)] == ["xla", "pallas_gpu", "pallas_gpu", "xla",
                                                        "xla"]
  assert pick(64, jnp.float32) == "xla"


@pytest.mark.parametrize("d", [64, 128, 192])
def test_pallas_gpu_fits_hopper_shared_memory(d):
  """Both passes lower for CUDA (Mosaic GPU checks shared memory against the 227 KB of a Hopper
  CTA when no GPU is attached) at every head dim `auto` sends to the kernel; other dims are
  refused with the reason before Mosaic's own error (which a B-size Q-Former's 192 once hit)."""
  b, nq, nk, h = 2, 200, 300, 2
  q = jnp.zeros((b, nq, h, d), jnp.bfloat16)
  k = jnp.zeros((b, nk, h, d), jnp.bfloat16)
  tq, tk, sig = jnp.zeros((b, nq)), jnp.zeros((b, nk)), jnp.ones((h,))

  def f(q, k, v, sig):
    out = api.gaussian_attention(q, k, v, tq, tk, sig, implementation="pallas_gpu",
                                 q_segment_ids=jnp.ones((b, nq), jnp.int32),
                                 kv_segment_ids=jnp.ones((b, nk), jnp.int32))
    return out.astype(jnp.float32).sum()

  for fn in (f, jax.grad(f, argnums=(0, 1, 2, 3))):
    lower = lambda: jax.jit(fn).trace(q, k, k, sig).lower(lowering_platforms=("cuda",))
    if d in (64, 128):
      assert "mosaic_gpu" in lower().as_text()
    else:
      with pytest.raises(ValueError, match="head dims .*shared memory"):
        lower()


def test_input_validation():
  x = make_inputs(0, b=1, nq=8, nk=10, h=4, hkv=2, d=16, dtype=jnp.float32)
  q, k, v, tq, tk = x["q"], x["k"], x["v"], x["tq"], x["tk"]
  sigma = np.ones(4, np.float32)
  ga = api.gaussian_attention
  with pytest.raises(ValueError, match="H % Hkv"):
    ga(q[:, :, :3], k, v, tq, tk, sigma[:3])
  with pytest.raises(ValueError, match=r"sigma must have shape \[H\]"):
    ga(q, k, v, tq, tk, sigma[:2])
  with pytest.raises(ValueError, match="t_q"):
    ga(q, k, v, tq[:, :5], tk, sigma)
  with pytest.raises(TypeError, match="share a dtype"):
    ga(q, k.astype(jnp.bfloat16), v, tq, tk, sigma)
  with pytest.raises(ValueError, match="k and v"):
    ga(q, k, v[:, :4], tq, tk, sigma)
  with pytest.raises(ValueError, match="without kv_segment_ids"):
    ga(q, k, v, tq, tk, sigma, q_segment_ids=np.zeros((1, 8), np.int32))
  with pytest.raises(TypeError, match="integer"):
    ga(q, k, v, tq, tk, sigma, kv_segment_ids=np.zeros((1, 10), np.float32))
  with pytest.raises(ValueError, match="implementation"):
    ga(q, k, v, tq, tk, sigma, implementation="cuda")
  with pytest.raises(ValueError, match="causal_block"):
    ga(q, k, v, tq, tk, sigma, causal_block=0.0)
  with pytest.raises(ValueError, match="bias_cutoff"):
    ga(q, k, v, tq, tk, sigma, bias_cutoff=-1.0)


def test_reference_public_signature_matches_api():
  """The materialising reference keeps its public signature and semantics."""
  x = make_inputs(2, b=2, nq=12, nk=15, h=2, hkv=1, d=16, dtype=jnp.float32)
  kv_seg = np.zeros((2, 15), np.int32)
  kv_seg[:, -3:] = -1
  sigma = np.asarray([0.2, np.inf], np.float32)
  got = reference.gaussian_attention(x["q"], x["k"], x["v"], x["tq"], x["tk"], sigma,
                                     window=0.5, kv_segment_ids=kv_seg)
  vis = np_visible(x["tq"], x["tk"], window=0.5, kv_seg=kv_seg)
  assert rel_err(got, np_attention(x["q"], x["k"], x["v"], x["tq"], x["tk"], sigma,
                                   16 ** -0.5, vis)) <= 1e-5


def test_block_codes_are_conservative():
  """SKIP only if no pair is visible, FULL only if every pair is (random times and masks)."""
  rng = np.random.default_rng(4)
  b, n, blk = 2, 48, 8
  tq = np.sort(rng.uniform(0, 3, (b, n)), 1).astype(np.float32)
  tk = rng.uniform(0, 3, (b, n)).astype(np.float32)
  q_seg = np.sort(rng.integers(0, 3, (b, n)), 1).astype(np.int32)
  kv_seg = rng.integers(-1, 3, (b, n)).astype(np.int32)
  kv_seg[:, :blk] = q_seg[:, :blk]  # ensure some fully visible candidates
  for mask in (dict(causal=True), dict(causal_block=0.5, lookahead_blocks=1),
               dict(window=0.4), dict()):
    spec = common.MaskSpec(**mask)
    codes = np.asarray(common.block_codes(
        spec, common.block_stats(jnp.asarray(tq), jnp.asarray(q_seg), blk, keys=False),
        common.block_stats(jnp.asarray(tk), jnp.asarray(kv_seg), blk, keys=True),
        jnp.ones((1,), jnp.float32)))[:, 0]
    vis = np_visible(tq, tk, q_seg=q_seg, kv_seg=kv_seg, **mask)
    vb = vis.reshape(b, n // blk, blk, n // blk, blk)
    any_vis, all_vis = vb.any((2, 4)), vb.all((2, 4))
    assert not np.any((codes == common.SKIP) & any_vis), mask
    assert not np.any((codes == common.FULL) & ~all_vis), mask
    assert np.any(codes != common.PARTIAL) or not mask, mask
  # Band skipping on unsorted key times: SKIP only if every pair's Gaussian term < −cutoff.
  sigma = np.asarray([0.1, 0.4], np.float32)
  cutoff = 4.0
  codes = np.asarray(common.block_codes(
      common.MaskSpec(bias_cutoff=cutoff),
      common.block_stats(jnp.asarray(tq), jnp.zeros((b, n), jnp.int32), blk, keys=False),
      common.block_stats(jnp.asarray(tk), jnp.zeros((b, n), jnp.int32), blk, keys=True),
      common.inv_two_sigma_sq(sigma)))  # [B, H, nq, nk]
  pen = ((tq[:, :, None].astype(np.float64) - tk[:, None, :]) ** 2)[:, None] * np_inv(sigma)[
      None, :, None, None]
  min_pen = pen.reshape(b, 2, n // blk, blk, n // blk, blk).min((3, 5))
  skip = codes == common.SKIP
  # Conservative (interval gaps can only under-estimate the true minimum distance) and active.
  assert np.all(min_pen[skip] > cutoff) and skip.any()


def test_interpret_mode_poisons_unwritten_blocks():
  """What the NaN poisoning above catches, checked on a toy kernel.

  An output block the grid never writes back stays NaN. A visited block whose write is
  skipped is written back from a stale VMEM buffer (another block's values), which the
  numerical comparisons against the reference catch.
  """
  from jax.experimental import pallas as pl

  def copy(x_ref, o_ref):
    o_ref[...] = x_ref[...]

  x = jnp.arange(16 * 128, dtype=jnp.float32).reshape(16, 128)
  out = pl.pallas_call(copy, grid=(1,), in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
                       out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
                       out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                       interpret=TPU_INTERPRET)(x)
  out = np.asarray(out)
  assert np.array_equal(out[:8], np.asarray(x[:8])) and np.all(np.isnan(out[8:]))

  def first_only(x_ref, o_ref):
    @pl.when(pl.program_id(0) == 0)
    def _():
      o_ref[...] = x_ref[...]

  out = pl.pallas_call(first_only, grid=(2,),
                       in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
                       out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
                       out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                       interpret=TPU_INTERPRET)(x)
  assert not np.array_equal(np.asarray(out)[8:], np.asarray(x[8:]))


@pytest.mark.parametrize("chip,case", [
    ("TPU_V5E", "causal_window_segments_gqa"), ("TPU_V6E", "causal_window_segments_gqa"),
    ("TPU_V5E", "block_causal_fp16_d64"), ("TPU_V6E", "band_skipping")])
def test_pallas_tpu_lowers_for_tpu(chip, case, monkeypatch):
  """The TPU kernels lower through Pallas' Mosaic TPU rules (forward and backward), not only
  in interpret mode. No TPU here, so the chip description the lowering asks for is registered
  for the CPU device; Mosaic's own compiler (in libtpu) is not exercised."""
  from jax._src.pallas.mosaic import tpu_info
  from avatar_jax.kernels.gaussian_attention import pallas_tpu
  if not hasattr(tpu_info, "registry") or not hasattr(tpu_info.ChipVersion, chip):
    pytest.skip("this jax has no TPU chip registry to lower against")
  version = getattr(tpu_info.ChipVersion, chip)
  monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind,
                      lambda: tpu_info.get_tpu_info_for_chip(version, 1))
  b, nq, nk, h, hkv, d, dtype, spec = {
      "causal_window_segments_gqa": (1, 512, 384, 4, 2, 128, jnp.bfloat16,
                                     common.MaskSpec(causal=True, window=0.5)),
      "block_causal_fp16_d64": (2, 300, 260, 2, 2, 64, jnp.float16,
                                common.MaskSpec(causal_block=0.32, lookahead_blocks=1)),
      "band_skipping": (1, 1024, 1024, 2, 2, 128, jnp.bfloat16,
                        common.MaskSpec(bias_cutoff=20.0)),
  }[case]
  sds = jax.ShapeDtypeStruct
  q, k = sds((b, nq, h, d), dtype), sds((b, nk, hkv, d), dtype)
  tq, tk = sds((b, nq), jnp.float32), sds((b, nk), jnp.float32)
  qs, ks = sds((b, nq), jnp.int32), sds((b, nk), jnp.int32)
  kw = dict(scale=d ** -0.5, spec=spec)

  def fwd(q, k, v, tq, tk, sigma, qs, ks):
    return pallas_tpu.forward(q, k, v, tq, tk, sigma, q_segment_ids=qs, kv_segment_ids=ks, **kw)

  def bwd(q, k, v, tq, tk, sigma, qs, ks, out, lse, do):
    return pallas_tpu.backward(q, k, v, tq, tk, sigma, out, lse, do, q_segment_ids=qs,
                               kv_segment_ids=ks, **kw)

  sig = sds((h,), jnp.float32)
  lowered = [
      jax.jit(fwd).trace(q, k, k, tq, tk, sig, qs, ks).lower(lowering_platforms=("tpu",)),
      jax.jit(bwd).trace(q, k, k, tq, tk, sig, qs, ks, q, sds((b, h, nq), jnp.float32), q)
      .lower(lowering_platforms=("tpu",)),
  ]
  for low, n_kernels in zip(lowered, (1, 2)):
    text = low.as_text()
    assert text.count("tpu_custom_call") >= n_kernels, text[:2000]


def test_package_exports_the_public_entry_points():
  """The README's import works and is the API's function; the sharded one sits beside it."""
  from avatar_jax.kernels.gaussian_attention import (  # pylint: disable=g-import-not-at-top
      gaussian_attention, sharded_gaussian_attention)
  from avatar_jax.kernels.gaussian_attention import api as api_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(7)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 5, 2, 8)), jnp.float32) for _ in range(3))
  t = jnp.asarray(np.arange(5)[None] / 25.0, jnp.float32)
  sigma = jnp.asarray([0.05, 1.0], jnp.float32)
  out = gaussian_attention(q, k, v, t, t, sigma)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(api_lib.gaussian_attention(
      q, k, v, t, t, sigma)))
  assert callable(sharded_gaussian_attention)


def test_package_import_loads_no_pallas_backend():
  """Importing the package (and its two entry points) leaves the Pallas modules unimported."""
  code = ("import sys\n"
          "from avatar_jax.kernels.gaussian_attention import gaussian_attention, "
          "sharded_gaussian_attention\n"
          "bad = [m for m in ('jax.experimental.pallas', 'jax.experimental.pallas.mosaic_gpu',\n"
          "       'avatar_jax.kernels.gaussian_attention.pallas_gpu',\n"
          "       'avatar_jax.kernels.gaussian_attention.pallas_tpu') if m in sys.modules]\n"
          "assert not bad, bad\n")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-2000:]


# fp16 matmuls do not run on XLA:CPU; the fp32 case has rows with no visible key.
@pytest.mark.parametrize("name", ["bf16_d128_block_causal_lookahead_padding"])
def test_dense_bias_peer_matches_float64_reference(name, monkeypatch):
  """implementation="cudnn_bias" (the bias materialised for jax.nn.dot_product_attention, the
  peer benchmarks compare against): on CPU the same path with XLA's attention must match the
  float64 reference, gradients to σ included (rows with no visible key excluded: its finite
  bias averages them instead of returning zeros)."""
  import functools  # pylint: disable=g-import-not-at-top
  from avatar_jax.kernels.gaussian_attention import reference  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(reference, "gaussian_attention_dense_bias", functools.partial(
      reference.gaussian_attention_dense_bias, dpa_implementation="xla"))
  c = CASES[name]
  x, q_seg, kv_seg, sigma = case_arrays(name)
  vis = np_visible(x["tq"], x["tk"], q_seg=q_seg, kv_seg=kv_seg, **c["mask"])
  ref_out, ref_grads = np_attention(x["q"], x["k"], x["v"], x["tq"], x["tk"], sigma,
                                    x["q"].shape[-1] ** -0.5, vis, x["dout"])
  out, grads = run_impl("cudnn_bias", x, q_seg, kv_seg, sigma, c["mask"], {})
  low = c["shape"]["dtype"] != jnp.float32
  assert rel_err(out, ref_out) <= (2e-2 if low else 1e-5), rel_err(out, ref_out)
  for gname, g, r in zip(("dq", "dk", "dv", "dsigma"), grads, ref_grads):
    assert rel_err(g, r) <= (5e-2 if low else 1e-4), (gname, rel_err(g, r))
