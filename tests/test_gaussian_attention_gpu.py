"""Gaussian attention, Pallas Mosaic-GPU backend, on a real Hopper GPU (skipped without one).

Run on a GPU machine:
  JAX_PLATFORMS=cuda pytest tests/test_gaussian_attention_gpu.py -x -q

Every case draws fresh random inputs and compares the kernel's output, lse and all four
gradients (dq, dk, dv, dσ) against the materialising XLA reference evaluated in float32 on
upcast inputs (HIGHEST matmul precision). Tolerances are relative Frobenius errors at the level
bf16/fp16 operands give (METHOD.md: 1e-3..1e-2).
"""
import os
import zlib

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from avatar_jax.kernels.gaussian_attention import api, common, reference


def _has_hopper():
  try:
    devs = jax.devices("gpu")
  except RuntimeError:
    return False
  return bool(devs) and getattr(devs[0], "compute_capability", "0") >= "9.0"


pytestmark = pytest.mark.skipif(not _has_hopper(), reason="needs a Hopper (sm_90) GPU")

F32 = jnp.float32


def _times(rng, b, n, fps, kind):
  if kind == "grid":
    t = np.arange(n) / fps
    return np.broadcast_to(t, (b, n)).astype(np.float32) + rng.uniform(0, 0.01, (b, 1)).astype(np.float32)
  if kind == "jitter":  # sorted, irregular
    return np.sort(rng.uniform(0, n / fps, (b, n)), axis=1).astype(np.float32)
  return rng.uniform(0, n / fps, (b, n)).astype(np.float32)  # unsorted


CASES = {
    # name: (B, Nq, Nk, H, Hkv, D, dtype, mask kwargs, time kinds (q, k), fps (q, k), sigma)
    "dense_d128": (2, 256, 384, 4, 4, 128, jnp.bfloat16, {}, ("grid", "grid"), (25, 25),
                   [0.04, 0.2, 1.0, np.inf]),
    "causal_gqa_odd_d64": (1, 300, 200, 4, 2, 64, jnp.float16, dict(causal=True),
                           ("grid", "grid"), (25, 50 / 3), [0.08, 0.3, 2.0, np.inf]),
    "block_causal_lookahead": (2, 260, 260, 2, 1, 128, jnp.bfloat16,
                               dict(causal_block=0.32, lookahead_blocks=1), ("grid", "grid"),
                               (25, 25), [0.1, 0.5]),
    "window_jitter": (1, 333, 257, 2, 2, 64, jnp.bfloat16, dict(window=0.4),
                      ("jitter", "jitter"), (25, 20), [0.2, np.inf]),
    "segments_padding": (2, 192, 320, 2, 1, 128, jnp.bfloat16, dict(segments=True),
                         ("grid", "grid"), (25, 25), [0.3, 0.9]),
    "causal_unsorted": (1, 200, 180, 2, 2, 64, jnp.bfloat16, dict(causal=True),
                        ("random", "random"), (25, 25), [0.5, 1.5]),
    "cross_video_audio": (2, 528, 66, 4, 4, 64, jnp.bfloat16, {}, ("grid", "grid"),
                          (25, 25 / 8), [0.08, 0.16, 0.64, np.inf]),
    # Many CTAs per head in both backward kernels.
    "dense_n1024_d128": (2, 1024, 1024, 4, 4, 128, jnp.bfloat16, {}, ("grid", "grid"),
                         (25, 25), [0.04, 0.2, 1.0, np.inf]),
    "causal_window_batch1_d128": (1, 640, 640, 2, 2, 128, jnp.bfloat16,
                                  dict(causal=True, window=2.0), ("grid", "grid"), (25, 25),
                                  [0.08, 0.4]),
}


def _inputs(case, seed):
  b, nq, nk, h, hkv, d, dtype, mask, kinds, fps, sigma = CASES[case]
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, nq, h, d)).astype(np.float32)
  k = rng.standard_normal((b, nk, hkv, d)).astype(np.float32)
  v = rng.standard_normal((b, nk, hkv, d)).astype(np.float32)
  do = rng.standard_normal((b, nq, h, d)).astype(np.float32)
  tq = _times(rng, b, nq, fps[0], kinds[0])
  tk = _times(rng, b, nk, fps[1], kinds[1])
  mask = dict(mask)
  seg = {}
  if mask.pop("segments", False):
    # Two packed segments per row plus key padding; one query segment id has no keys at all.
    qs = (np.arange(nq)[None] * 3 // nq).repeat(b, 0).astype(np.int32)
    ks = (np.arange(nk)[None] * 2 // nk).repeat(b, 0).astype(np.int32)
    ks[:, -37:] = -1
    seg = dict(q_segment_ids=jnp.asarray(qs), kv_segment_ids=jnp.asarray(ks))
  cast = lambda x: jnp.asarray(x, dtype)
  return (cast(q), cast(k), cast(v), jnp.asarray(tq), jnp.asarray(tk),
          jnp.asarray(sigma, F32), cast(do), mask, seg)


def _rel(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  assert np.all(np.isfinite(a)), "non-finite values in kernel output"
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _run(case, seed=0, read_lse=False, **extra):
  """Relative errors of out and the four gradients; `read_lse`: the loss also reads lse."""
  q, k, v, tq, tk, sigma, do, mask, seg = _inputs(case, seed)
  mask = dict(mask, **extra)
  dlse = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(
      (q.shape[0], q.shape[2], q.shape[1])), F32)

  def loss(impl, q, k, v, sigma):
    if not read_lse:
      out = api.gaussian_attention(q, k, v, tq, tk, sigma, implementation=impl, **mask, **seg)
      return jnp.sum(out.astype(F32) * do.astype(F32)), out
    out, lse = api.gaussian_attention(q, k, v, tq, tk, sigma, implementation=impl,
                                      return_lse=True, **mask, **seg)
    read = jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * dlse)
    return jnp.sum(out.astype(F32) * do.astype(F32)) + read, out

  with jax.default_matmul_precision("highest"):
    up = lambda x: x.astype(F32)
    (_, ref_out), ref_g = jax.jit(jax.value_and_grad(
        lambda *a: loss("xla", *a), argnums=(0, 1, 2, 3), has_aux=True))(
            up(q), up(k), up(v), sigma)
  (_, out), g = jax.jit(jax.value_and_grad(
      lambda *a: loss("pallas_gpu", *a), argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, sigma)
  errs = {"out": _rel(out, ref_out)}
  errs.update({n: _rel(a, r) for n, a, r in zip(("dq", "dk", "dv", "dsigma"), g, ref_g)})
  return errs


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(case):
  errs = _run(case, seed=zlib.crc32(case.encode()) % 1000)
  print(case, {k: f"{v:.2e}" for k, v in errs.items()})
  assert errs["out"] < 1e-2, errs
  for name in ("dq", "dk", "dv", "dsigma"):
    assert errs[name] < 2.5e-2, (name, errs)


@pytest.mark.parametrize("case", ["segments_padding", "causal_gqa_odd_d64", "dense_n1024_d128"])
def test_lse_cotangent_matches_reference(case):
  """`return_lse=True` under differentiation: the lse cotangent's share of dq, dk and dσ."""
  errs = _run(case, seed=zlib.crc32(case.encode()) % 1000 + 1, read_lse=True)
  print(case, "read_lse", {k: f"{v:.2e}" for k, v in errs.items()})
  assert errs["out"] < 1e-2, errs
  for name in ("dq", "dk", "dv", "dsigma"):
    assert errs[name] < 2.5e-2, (name, errs)


def test_lse_and_empty_rows():
  """lse matches log Σ exp of the reference logits; a query with no visible key gives 0 / −inf."""
  from avatar_jax.kernels.gaussian_attention import pallas_gpu
  q, k, v, tq, tk, sigma, _, _, _ = _inputs("segments_padding", 3)
  b, nq, nk = q.shape[0], q.shape[1], k.shape[1]
  qs = np.zeros((b, nq), np.int32)
  qs[:, :50] = 7  # no key has id 7
  ks = np.zeros((b, nk), np.int32)
  qs, ks = jnp.asarray(qs), jnp.asarray(ks)
  spec = common.MaskSpec()
  scale = q.shape[-1] ** -0.5
  out, lse = jax.jit(lambda *a: pallas_gpu.forward(
      *a, scale=scale, spec=spec, q_segment_ids=qs, kv_segment_ids=ks))(q, k, v, tq, tk, sigma)
  out = np.asarray(out, np.float32)
  lse = np.asarray(lse)
  assert np.all(out[:, :50] == 0) and np.all(np.isneginf(lse[:, :, :50]))
  # Reference lse from materialised logits (float64 on the host).
  rep = q.shape[2] // k.shape[2]
  qf = np.asarray(q, np.float64)
  kf = np.repeat(np.asarray(k, np.float64), rep, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
  dt = np.asarray(tq, np.float64)[:, :, None] - np.asarray(tk, np.float64)[:, None, :]
  inv = 0.5 / np.asarray(sigma, np.float64) ** 2
  logits = logits - dt[:, None] ** 2 * inv[None, :, None, None]
  ref_lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  np.testing.assert_allclose(lse[:, :, 50:], ref_lse[:, :, 50:], atol=2e-2, rtol=2e-3)
  assert np.all(np.isfinite(out[:, 50:]))


def test_affine_key_steps_agree_with_per_key_steps():
  """On regular grids the forward's fully visible steps use the key blocks' line fits
  (affine_k=1, the default); the per-key form (affine_k=0) must agree to bf16 rounding."""
  from avatar_jax.kernels.gaussian_attention import pallas_gpu
  for case in ("dense_n1024_d128", "cross_video_audio"):
    q, k, v, tq, tk, sigma, _, _, _ = _inputs(case, 11)
    qs, ks = common.normalise_segment_ids(None, None, q.shape[0], q.shape[1], k.shape[1])
    kw = dict(scale=q.shape[-1] ** -0.5, spec=common.MaskSpec(), q_segment_ids=qs,
              kv_segment_ids=ks)
    outs = [jax.jit(lambda *a, f=f: pallas_gpu.forward(*a, affine_k=f, **kw))(
        q, k, v, tq, tk, sigma) for f in (0, 1)]
    (o0, l0), (o1, l1) = outs
    assert _rel(o1, o0) < 2e-3, case
    assert not np.array_equal(np.asarray(o1), np.asarray(o0)), "line-fit steps did not run"
    np.testing.assert_allclose(np.asarray(l1), np.asarray(l0), rtol=0, atol=2e-3)


def test_inference_forward_row_sums_on_tensor_cores():
  """Without a backward (the API's undifferentiated call) the forward's row sums come from the
  tensor cores (l_mma): the output stays as accurate, lse moves by bf16 rounding only."""
  from avatar_jax.kernels.gaussian_attention import pallas_gpu
  for case in ("dense_n1024_d128", "cross_video_audio"):
    q, k, v, tq, tk, sigma, _, _, _ = _inputs(case, 12)
    qs, ks = common.normalise_segment_ids(None, None, q.shape[0], q.shape[1], k.shape[1])
    kw = dict(scale=q.shape[-1] ** -0.5, spec=common.MaskSpec(), q_segment_ids=qs,
              kv_segment_ids=ks)
    fwd = lambda exact: jax.jit(lambda *a: pallas_gpu.forward(*a, exact_lse=exact, **kw))(
        q, k, v, tq, tk, sigma)
    (o0, l0), (o1, l1) = fwd(True), fwd(False)
    with jax.default_matmul_precision("highest"):
      ref = api.gaussian_attention(q.astype(F32), k.astype(F32), v.astype(F32), tq, tk, sigma,
                                   implementation="xla")
    out = jax.jit(lambda *a: api.gaussian_attention(*a, implementation="pallas_gpu"))(
        q, k, v, tq, tk, sigma)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(o1))  # the API takes this path
    assert not np.array_equal(np.asarray(o1), np.asarray(o0)), "tensor-core row sums did not run"
    assert _rel(o1, ref) < 1.05 * _rel(o0, ref) + 1e-4, case
    assert _rel(o1, o0) < 2e-3, case
    np.testing.assert_allclose(np.asarray(l1), np.asarray(l0), rtol=0, atol=8e-3)


@pytest.mark.parametrize("d,h,hkv", [(64, 2, 2), (128, 2, 2), (128, 4, 1)])
def test_band_skipping_matches_dense_and_skips(d, h, hkv):
  """bias_cutoff drops far blocks; with a generous cutoff the result equals the dense one.
  With grouped heads of different widths each query head has its own block list."""
  b, n = 1, 2048
  rng = np.random.default_rng(5)
  q, do = (jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.bfloat16) for _ in range(2))
  k, v = (jnp.asarray(rng.standard_normal((b, n, hkv, d)), jnp.bfloat16) for _ in range(2))
  t = jnp.asarray(np.arange(n)[None] / 25.0, F32)
  sigma = jnp.asarray([0.04, 0.08, 0.5, 0.2][:h], F32)
  skipped, total = common.count_skipped_blocks(t, t, sigma, spec=common.MaskSpec(bias_cutoff=30.0),
                                               block_q=128, block_k=128)
  assert skipped > 0.7 * total

  def f(impl, cutoff, q, k, v, sigma):
    o = api.gaussian_attention(q, k, v, t, t, sigma, implementation=impl, bias_cutoff=cutoff)
    return jnp.sum(o.astype(F32) * do.astype(F32)), o

  g = lambda impl, cutoff: jax.jit(jax.value_and_grad(
      lambda *a: f(impl, cutoff, *a), argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, sigma)
  (_, o_skip), g_skip = g("pallas_gpu", 30.0)
  (_, o_dense), g_dense = g("pallas_gpu", None)
  assert _rel(o_skip, o_dense) < 1e-3
  for a, r in zip(g_skip, g_dense):
    assert _rel(a, r) < 1e-3


@pytest.mark.parametrize("case", ["causal_gqa_odd_d64", "dense_n1024_d128", "segments_padding"])
def test_deterministic(case):
  """Bit-identical gradients on repeated calls."""
  q, k, v, tq, tk, sigma, do, mask, seg = _inputs(case, 11)

  def f(q, k, v, sigma):
    o = api.gaussian_attention(q, k, v, tq, tk, sigma, implementation="pallas_gpu", **mask,
                               **seg)
    return jnp.sum(o.astype(F32) * do.astype(F32))

  gf = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))
  first = gf(q, k, v, sigma)
  for _ in range(3):
    again = gf(q, k, v, sigma)
    for x, y in zip(first, again):
      np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize("axis,schedule", [("data", "ring"), ("context", "ring"),
                                           ("context", "all_gather"), ("tensor", "ring")])
def test_sharded_matches_one_gpu(axis, schedule):
  """The kernels under `sharded_gaussian_attention` on two GPUs (batch, sequence with K/V
  passed round the ring or all-gathered, or heads split) give what one GPU gives, forward and
  all four gradients."""
  from avatar_jax import sharding as shd
  from avatar_jax.kernels.gaussian_attention import sharded
  gpus = jax.devices("gpu")
  if len(gpus) < 2:
    pytest.skip(f"needs 2 GPUs, found {len(gpus)}")
  q, k, v, tq, tk, sigma, do, mask, seg = _inputs("dense_n1024_d128", 21)  # B2 H4 Hkv4
  mask = dict(mask, causal=True)

  def grads(mesh):
    def f(q, k, v, sigma):
      o = sharded.sharded_gaussian_attention(q, k, v, tq, tk, sigma, mesh=mesh,
                                             implementation="pallas_gpu",
                                             context_schedule=schedule, **mask, **seg)
      return jnp.sum(o.astype(F32) * do.astype(F32)), o
    (_, o), g = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(
        q, k, v, sigma)
    return [np.asarray(x, np.float32) for x in (o, *g)]

  one = grads(shd.make_mesh({"data": 1}, devices=gpus[:1]))
  two = grads(shd.make_mesh({axis: 2}, devices=gpus[:2]))
  errs = {n: _rel(a, r) for n, a, r in zip(("out", "dq", "dk", "dv", "dsigma"), two, one)}
  print(axis, schedule, {n: f"{e:.1e}" for n, e in errs.items()})
  assert all(e < 2e-3 for e in errs.values()), errs
  assert np.abs(one[0]).max() > 0.1  # not all-zero outputs


if __name__ == "__main__":
  raise SystemExit(pytest.main([__file__, "-x", "-q", "-s"] + os.sys.argv[1:]))
