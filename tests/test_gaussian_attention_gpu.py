"""Gaussian attention, Pallas Mosaic-GPU backend, on a real Hopper GPU.

Run on a GPU machine (tests/conftest.py pins JAX to the CPU unless JAX_PLATFORMS is set):
  JAX_PLATFORMS=cuda pytest tests/test_gaussian_attention_gpu.py -q

The matrix (`test_gradients_match_float64`) draws fresh random shapes and inputs on every run:
lengths that are not tile multiples, Nq ≠ Nk, grouped heads, head dim 64/128, bf16 and fp16,
times on different grids, times under every segment-id and mask form. The run's seed is
printed; `GAUSSIAN_GPU_SEED=<seed>` replays it. The output and all four gradients (dq, dk, dv,
dσ) are compared with a float64 NumPy forward + VJP on the same (rounded) inputs.
"""
import os
import secrets

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from avatar_jax.kernels.gaussian_attention import api, common


def _skip_reason():
  backend = jax.default_backend()
  if backend != "gpu":
    return (f"needs a Hopper GPU through JAX_PLATFORMS=cuda (jax runs on {backend!r}; "
            "tests/conftest.py selects the CPU unless JAX_PLATFORMS is set)")
  cap = getattr(jax.devices()[0], "compute_capability", "0")
  if cap < "9.0":
    return f"needs a Hopper (sm_90) GPU, found compute capability {cap}"
  return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))

F32 = jnp.float32
SEED = int(os.environ.get("GAUSSIAN_GPU_SEED", secrets.randbelow(2**31)))
print(f"\n[test_gaussian_attention_gpu] GAUSSIAN_GPU_SEED={SEED}")

# Segment-id and mask forms of the matrix.
FORMS = ("none", "kv_zero", "kv_pad", "q_kv_segments", "causal_pad", "block_causal_pad",
         "window_pad_fp16")
TOL = 2e-2


def _draw(form, seed):
  """A random problem of `form`: (arrays, api kwargs, description)."""
  rng = np.random.default_rng([seed, FORMS.index(form)])
  b = int(rng.integers(1, 3))
  h = int(rng.choice([2, 4, 8]))
  hkv = int(rng.choice([x for x in (h, h // 2, h // 4) if x >= 1]))
  d = int(rng.choice([64, 128]))
  dtype = jnp.float16 if form.endswith("fp16") or rng.random() < 0.3 else jnp.bfloat16
  nq = int(rng.integers(100, 700)) | 1  # odd: never a tile multiple
  nk = int(rng.integers(60, 500)) | 1
  fq, fk = float(rng.choice([25.0, 50.0, 100.0])), float(rng.choice([12.5, 25.0, 50.0]))
  tq = (np.arange(nq) / fq)[None].repeat(b, 0) + rng.uniform(0, 0.02, (b, 1))
  tk = (np.arange(nk) / fk)[None].repeat(b, 0) + rng.uniform(0, 0.02, (b, 1))
  sigma = np.geomspace(0.04, 2.0, h)
  if h >= 4:
    sigma[-1] = np.inf
  kw = {}
  lengths = rng.integers(nk // 2, nk + 1, b)
  pad = (np.arange(nk)[None] >= lengths[:, None])
  if form == "kv_zero":
    kw["kv_segment_ids"] = np.zeros((b, nk), np.int32)
  elif form in ("kv_pad", "causal_pad", "block_causal_pad", "window_pad_fp16"):
    kw["kv_segment_ids"] = np.where(pad, -1, 0).astype(np.int32)
  elif form == "q_kv_segments":  # packed segments in order, with key padding
    qs = np.sort(rng.integers(0, 3, (b, nq)), axis=1).astype(np.int32)
    ks = np.sort(rng.integers(0, 3, (b, nk)), axis=1).astype(np.int32)
    kw["q_segment_ids"], kw["kv_segment_ids"] = qs, np.where(pad, -1, ks).astype(np.int32)
  if form == "causal_pad":
    kw["causal"] = True
  elif form == "block_causal_pad":
    kw.update(causal_block=float(rng.choice([0.16, 0.32, 0.5])),
              lookahead_blocks=int(rng.integers(0, 3)))
  elif form == "window_pad_fp16":
    kw["window"] = float(rng.choice([0.3, 1.0]))
  q = rng.standard_normal((b, nq, h, d))
  k, v = (rng.standard_normal((b, nk, hkv, d)) for _ in range(2))
  do = rng.standard_normal((b, nq, h, d))
  arrays = dict(q=q, k=k, v=v, do=do, tq=tq.astype(np.float32), tk=tk.astype(np.float32),
                sigma=sigma.astype(np.float32))
  desc = (f"{form}: B{b} Nq{nq} Nk{nk} H{h}/{hkv} D{d} {jnp.dtype(dtype).name} "
          f"fps {fq:g}/{fk:g} {sorted(kw)}")
  return arrays, dtype, kw, desc


def _reference(arrays, kw, dlse=None):
  """float64 NumPy forward and VJP: out, dq, dk, dv, dσ (and lse) of sum(out·do) [+ Σ lse·dlse]."""
  q, k, v, do = (np.asarray(arrays[n], np.float64) for n in ("q", "k", "v", "do"))
  tq, tk = (np.asarray(arrays[n], np.float64) for n in ("tq", "tk"))
  sigma = np.asarray(arrays["sigma"], np.float64)
  b, nq, h, d = q.shape
  rep = h // k.shape[2]
  kk, vv = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  spec = common.MaskSpec(causal=kw.get("causal", False), causal_block=kw.get("causal_block"),
                         lookahead_blocks=kw.get("lookahead_blocks", 0),
                         window=kw.get("window"))
  qs, ks = common.normalise_segment_ids(kw.get("q_segment_ids"), kw.get("kv_segment_ids"),
                                        b, nq, k.shape[1])
  vis = np.asarray(common.visible(spec, arrays["tq"][:, :, None], arrays["tk"][:, None, :],
                                  np.asarray(qs)[:, :, None], np.asarray(ks)[:, None, :]))
  vis = vis[:, None]  # [B, 1, Nq, Nk]
  inv = np.where(np.isinf(sigma), 0.0, 0.5 / sigma ** 2)
  dt2 = (tq[:, :, None] - tk[:, None, :])[:, None] ** 2  # [B, 1, Nq, Nk]
  scale = d ** -0.5
  s = np.einsum("bqhd,bkhd->bhqk", q, kk) * scale - dt2 * inv[None, :, None, None]
  s = np.where(vis, s, -np.inf)
  m = np.max(s, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  e = np.where(vis, np.exp(s - m), 0.0)
  l = e.sum(-1, keepdims=True)
  p = e / np.where(l > 0, l, 1.0)
  lse = np.where(l[..., 0] > 0, m[..., 0] + np.log(np.where(l[..., 0] > 0, l[..., 0], 1.0)),
                 -np.inf)
  out = np.einsum("bhqk,bkhd->bqhd", p, vv)
  dp = np.einsum("bqhd,bkhd->bhqk", do, vv)
  delta = np.einsum("bqhd,bqhd->bhq", do, out)
  if dlse is not None:
    delta = delta - np.where(np.isfinite(lse), dlse, 0.0)
  ds = p * (dp - delta[..., None])
  dq = np.einsum("bhqk,bkhd->bqhd", ds, kk) * scale
  dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
  dv = np.einsum("bhqk,bqhd->bkhd", p, do)
  dk = dk.reshape(b, -1, h // rep, rep, d).sum(3)
  dv = dv.reshape(b, -1, h // rep, rep, d).sum(3)
  # d(−dt²/(2σ²))/dσ = dt²/σ³ = 2·pen/σ
  pen = dt2 * inv[None, :, None, None]
  dsigma = np.where(np.isinf(sigma), 0.0,
                    2.0 * np.einsum("bhqk,bhqk->h", ds, np.broadcast_to(pen, ds.shape)) / sigma)
  return dict(out=out, dq=dq, dk=dk, dv=dv, dsigma=dsigma, lse=lse)


def _rel(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  assert np.all(np.isfinite(a)), "non-finite values in kernel output"
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _kernel_grads(arrays, dtype, kw, dlse=None):
  """The pallas_gpu output and gradients of sum(out·do) [+ Σ lse·dlse], on inputs of `dtype`."""
  cast = lambda x: jnp.asarray(x, dtype)
  q, k, v, do = (cast(arrays[n]) for n in ("q", "k", "v", "do"))
  tq, tk, sigma = (jnp.asarray(arrays[n]) for n in ("tq", "tk", "sigma"))
  kwj = {n: jnp.asarray(x) if isinstance(x, np.ndarray) else x for n, x in kw.items()}

  def loss(q, k, v, sigma):
    if dlse is None:
      out = api.gaussian_attention(q, k, v, tq, tk, sigma, implementation="pallas_gpu", **kwj)
      return jnp.sum(out.astype(F32) * do.astype(F32)), out
    out, lse = api.gaussian_attention(q, k, v, tq, tk, sigma, implementation="pallas_gpu",
                                      return_lse=True, **kwj)
    read = jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * dlse)
    return jnp.sum(out.astype(F32) * do.astype(F32)) + read, out

  (_, out), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
      q, k, v, sigma)
  rounded = {n: np.asarray(x.astype(F32)) for n, x in zip(("q", "k", "v", "do"), (q, k, v, do))}
  return dict(out=out, dq=g[0], dk=g[1], dv=g[2], dsigma=g[3]), dict(arrays, **rounded)


@pytest.mark.parametrize("form", FORMS)
def test_gradients_match_float64(form):
  arrays, dtype, kw, desc = _draw(form, SEED)
  got, rounded = _kernel_grads(arrays, dtype, kw)
  ref = _reference(rounded, kw)
  errs = {n: _rel(got[n], ref[n]) for n in ("out", "dq", "dk", "dv", "dsigma")}
  line = f"seed {SEED} {desc}: " + " ".join(f"{n} {e:.1e}" for n, e in errs.items())
  print(line)
  assert all(e <= TOL for e in errs.values()), line


@pytest.mark.parametrize("form", ["kv_pad", "q_kv_segments"])
def test_lse_cotangent_matches_float64(form):
  """`return_lse=True` under differentiation: the lse cotangent's share of dq, dk and dσ."""
  arrays, dtype, kw, desc = _draw(form, SEED + 1)
  b, nq, h = arrays["q"].shape[:3]
  dlse = np.random.default_rng(SEED).standard_normal((b, h, nq)).astype(np.float32)
  got, rounded = _kernel_grads(arrays, dtype, kw, dlse=jnp.asarray(dlse))
  ref = _reference(rounded, kw, dlse=dlse)
  errs = {n: _rel(got[n], ref[n]) for n in ("out", "dq", "dk", "dv", "dsigma")}
  line = f"seed {SEED + 1} {desc} +dlse: " + " ".join(f"{n} {e:.1e}" for n, e in errs.items())
  print(line)
  assert all(e <= TOL for e in errs.values()), line


# Fixed cases of the remaining tests (B, Nq, Nk, H, Hkv, D, dtype, time kinds, fps, σ).
CASES = {
    "segments_padding": (2, 192, 320, 2, 1, 128, jnp.bfloat16, (25, 25), [0.3, 0.9]),
    "cross_video_audio": (2, 528, 66, 4, 4, 64, jnp.bfloat16, (25, 25 / 8),
                          [0.08, 0.16, 0.64, np.inf]),
    "dense_n1024_d128": (2, 1024, 1024, 4, 4, 128, jnp.bfloat16, (25, 25),
                         [0.04, 0.2, 1.0, np.inf]),
}


def _inputs(case, seed):
  b, nq, nk, h, hkv, d, dtype, fps, sigma = CASES[case]
  rng = np.random.default_rng(seed)
  q, do = (rng.standard_normal((b, nq, h, d)).astype(np.float32) for _ in range(2))
  k, v = (rng.standard_normal((b, nk, hkv, d)).astype(np.float32) for _ in range(2))
  t = lambda n, f: (np.broadcast_to(np.arange(n) / f, (b, n))
                    + rng.uniform(0, 0.01, (b, 1))).astype(np.float32)
  tq, tk = t(nq, fps[0]), t(nk, fps[1])
  seg = {}
  if case == "segments_padding":
    # Two packed segments per row plus key padding.
    qs = (np.arange(nq)[None] * 3 // nq).repeat(b, 0).astype(np.int32)
    ks = (np.arange(nk)[None] * 2 // nk).repeat(b, 0).astype(np.int32)
    ks[:, -37:] = -1
    seg = dict(q_segment_ids=jnp.asarray(qs), kv_segment_ids=jnp.asarray(ks))
  cast = lambda x: jnp.asarray(x, dtype)
  return (cast(q), cast(k), cast(v), jnp.asarray(tq), jnp.asarray(tk),
          jnp.asarray(sigma, F32), cast(do), {}, seg)


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


@pytest.mark.parametrize("d,h,hkv", [(128, 4, 1)])
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


@pytest.mark.parametrize("case", ["segments_padding"])
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
