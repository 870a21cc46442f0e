"""CPU coverage of the Mosaic-GPU Gaussian-attention backend (pallas_gpu.py).

What runs here: the host-side preparation (padding, Gaussian coordinates, mask vectors, block
lists) against straightforward NumPy, and the kernels themselves under Mosaic GPU's CPU
interpreter (jax >= 0.10): TMA copies, barriers, the warp-specialised producer/consumer
protocol, the masked/unmasked loops over block lists, the online softmax, dK/dV/dQ and the dσ
partial sums. What does not: the interpreter executes the matmuls as plain dots, not wgmma,
and has no register layouts or hardware named barriers (the forward's turn-taking runs on an
mbarrier there) — those run only on a GPU (tests/test_gaussian_attention_gpu.py).
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from avatar_jax.kernels.gaussian_attention import common, pallas_gpu, reference

import trainer_harness as harness




def test_position_vectors_reproduce_gaussian_term():
  rng = np.random.default_rng(0)
  b, n, h = 2, 37, 3
  tq = np.sort(rng.uniform(100, 140, (b, n)), axis=1).astype(np.float32)
  tk = np.sort(rng.uniform(100, 140, (b, n + 5)), axis=1).astype(np.float32)
  sigma = np.array([0.05, 0.7, np.inf], np.float32)
  spec = common.MaskSpec(causal=True, window=1.0)
  qs, ks = common.normalise_segment_ids(None, None, b, n, n + 5)
  prep = pallas_gpu._Prep(jnp.zeros((b, n, h, 64), jnp.bfloat16),
                          jnp.zeros((b, n + 5, h, 64), jnp.bfloat16), jnp.asarray(tq),
                          jnp.asarray(tk), jnp.asarray(sigma), 0.125, spec, qs, ks,
                          q_mult=64, k_mult=64)
  gq = np.asarray(prep.qvec[:, :, 0, :n], np.float64)
  gk = np.asarray(prep.kvec[:, :, 0, :n + 5], np.float64)
  got = (gq[..., :, None] - gk[..., None, :]) ** 2 / np.log2(np.e)  # log2 units → natural
  dt = tq.astype(np.float64)[:, :, None] - tk.astype(np.float64)[:, None, :]
  inv = np.where(np.isinf(sigma), 0.0, 0.5 / sigma.astype(np.float64) ** 2)
  want = dt[:, None] ** 2 * inv[None, :, None, None]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-3)
  # Mask rows: raw time (causal/window) then segment id; padded keys carry NaN ids.
  assert pallas_gpu._mask_rows(spec) == ("time", "seg")
  np.testing.assert_array_equal(np.asarray(prep.kvec[:, 0, 1, :n + 5]), tk)
  assert np.all(np.isnan(np.asarray(prep.kvec[:, :, 2, n + 5:])))


def test_block_lists_partial_first_then_full_and_complete():
  rng = np.random.default_rng(1)
  codes = rng.integers(0, 3, (2, 3, 5, 9)).astype(np.int32)
  order, n_p, n_f = (np.asarray(x) for x in pallas_gpu.block_lists(jnp.asarray(codes)))
  for idx in np.ndindex(codes.shape[:3]):
    c = codes[idx]
    want = list(np.flatnonzero(c == 1)) + list(np.flatnonzero(c == 2))
    assert n_p[idx] == (c == 1).sum() and n_f[idx] == (c == 2).sum()
    assert list(order[idx][:len(want)]) == want


def test_static_full_lists_equal_the_computed_ones():
  """No mask, no segment ids (None) and no padding: the block lists are NumPy constants (no
  block statistics, codes or sort at run time); they must equal what the codes give, for the
  forward, the dQ kernel and the grouped dK/dV kernel. Anything maskable computes them."""
  b, n, h, hkv = 2, 512, 4, 2
  t = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32) / 25, (b, n))
  q, k = jnp.zeros((b, n, h, 64), jnp.bfloat16), jnp.zeros((b, n, hkv, 64), jnp.bfloat16)
  sigma = jnp.asarray([0.1, 0.3, 1.0, 3.0], jnp.float32)
  prep = pallas_gpu._Prep(q, k, t, t, sigma, 0.125, common.MaskSpec(), None, None,
                          q_mult=128, k_mult=128)
  assert prep.all_full
  for args, kw in (((128, 128), {}), ((64, 128), dict(keys_major=True, rep=2))):
    got = prep.lists(*args, **kw)
    assert all(isinstance(x, np.ndarray) for x in got)
    codes = prep.codes(*args)
    if kw:
      codes = pallas_gpu._grouped_lists(jnp.swapaxes(codes, 2, 3), h, 2)
    for g, w in zip(got, pallas_gpu.block_lists(codes)):
      np.testing.assert_array_equal(g, np.asarray(w))
  qs, ks = common.normalise_segment_ids(None, None, b, n, n)
  for spec, segs, nk in ((common.MaskSpec(causal=True), (None, None), n),
                         (common.MaskSpec(), (qs, ks), n),
                         (common.MaskSpec(), (None, None), n - 5)):
    prep = pallas_gpu._Prep(q, k[:, :nk], t, t[:, :nk], sigma, 0.125, spec, *segs,
                            q_mult=128, k_mult=128)
    assert not prep.all_full
    assert not isinstance(prep.lists(128, 128)[0], np.ndarray)


def _inputs(seed, b, nq, nk, h, hkv, d):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
  tq = jnp.asarray(np.sort(rng.uniform(0, nq / 25, (b, nq)), axis=1), jnp.float32)
  tk = jnp.asarray(np.sort(rng.uniform(0, nq / 25, (b, nk)), axis=1), jnp.float32)
  return f(b, nq, h, d), f(b, nk, hkv, d), f(b, nk, hkv, d), f(b, nq, h, d), tq, tk


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.all(np.isfinite(a))
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _assert_matches_float64(q, k, v, do, tq, tk, sigma, spec, qs, ks, got):
  """got = (out, dq, dk, dv, dσ) against autodiff of the float64 reference (rel. 1e-2 / 2e-2)."""
  d = q.shape[-1]
  with jax.enable_x64(True):
    c = lambda x: jnp.asarray(np.asarray(x, np.float64))

    def loss(q, k, v, sigma):
      o = reference.gaussian_attention_segments(
          q, k, v, c(tq), c(tk), sigma, scale=d ** -0.5, spec=spec, q_segment_ids=qs,
          kv_segment_ids=ks)
      return jnp.sum(o * c(do)), o

    (_, ref_out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
        c(q), c(k), c(v), c(sigma))
  assert _rel(got[0], ref_out) < 1e-2
  for name, g, want in zip(("dq", "dk", "dv", "dsigma"), got[1:], grads):
    assert _rel(g, want) < 2e-2, name


def test_interpret_forward_backward_with_lse_cotangent_matches_float64_reference():
  """Causal + window + key padding, Nk not a block multiple, grouped heads: out, lse and all
  gradients of a loss reading out and lse (what the context ring merges by), backward(dlse=...),
  against autodiff of the float64 reference; dlse enters delta and the dσ partial (through pen̄).
  (dlse changes no kernel, only their inputs, so this also covers backward without it; the
  grouped-heads test below runs that call.)"""
  b, nq, nk, h, hkv, d = 1, 128, 100, 2, 1, 64
  q, k, v, do, tq, tk = _inputs(2, b, nq, nk, h, hkv, d)
  sigma = jnp.asarray([0.15, 0.9], jnp.float32)
  kv_ids = np.zeros((b, nk), np.int32)
  kv_ids[:, -9:] = -1  # padding keys
  spec = common.MaskSpec(causal=True, window=2.0)
  qs, ks = common.normalise_segment_ids(None, jnp.asarray(kv_ids), b, nq, nk)
  dlse = jnp.asarray(np.random.default_rng(5).standard_normal((b, h, nq)), jnp.float32)
  # Small explicit blocks keep the interpreter's work (one grid point per CTA) low.
  kw = dict(scale=d ** -0.5, spec=spec, q_segment_ids=qs, kv_segment_ids=ks, interpret=True,
            block_q=64, block_kv=128, block_kv_dq=64)
  out, lse = pallas_gpu.forward(q, k, v, tq, tk, sigma, **kw)
  got = pallas_gpu.backward(q, k, v, tq, tk, sigma, out, lse, do, dlse=dlse, **kw)
  assert lse.shape == (b, h, nq)
  finite = np.isfinite(np.asarray(lse))  # causal: rows before the first key see nothing
  with jax.enable_x64(True):
    c = lambda x: jnp.asarray(np.asarray(x, np.float64))

    def loss(q, k, v, sigma, with_lse=True):
      o, l = reference.gaussian_attention_segments(
          q, k, v, c(tq), c(tk), sigma, scale=d ** -0.5, spec=spec, q_segment_ids=qs,
          kv_segment_ids=ks, return_lse=True)
      read = jnp.sum(jnp.where(finite, l, 0.0) * c(dlse)) if with_lse else 0.0
      return jnp.sum(o * c(do)) + read, (o, l)

    (_, (ref_out, ref_lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3),
                                                        has_aux=True)(c(q), c(k), c(v), c(sigma))
    plain = jax.grad(lambda *a: loss(*a, with_lse=False)[0], argnums=(0, 1, 2, 3))(
        c(q), c(k), c(v), c(sigma))
  np.testing.assert_array_equal(finite, np.isfinite(np.asarray(ref_lse)))
  np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], rtol=1e-3,
                             atol=1e-3)
  assert _rel(out, ref_out) < 1e-2
  for name, g, want in zip(("dq", "dk", "dv", "dsigma"), got, grads):
    assert _rel(g, want) < 2e-2, name
  # dlse reaches dq, dk and dσ (not dv): gradients that ignored it would miss by more than the
  # 2e-2 above.
  for i in (0, 1, 3):
    assert _rel(plain[i], grads[i]) > 5e-2


def test_interpret_persistent_forward_with_empty_items():
  """The persistent forward walks several (batch, head, tile) items per CTA; a whole query
  tile that sees no key (zero steps) must give zeros and lse = −inf without desynchronising
  the K/V ring or the double-buffered Q of the items around it."""
  b, nq, nk, h, d = 2, 384, 96, 2, 64
  q, k, v, _, tq, tk = _inputs(4, b, nq, nk, h, h, d)
  q_ids = np.zeros((b, nq), np.int32)
  q_ids[0, 128:256] = 5  # batch 0, second tile (block_q=64 → tiles of 128): no key has id 5
  q_ids[1, 300:] = 5     # batch 1: part of the last tile only
  qs, ks = common.normalise_segment_ids(jnp.asarray(q_ids), jnp.zeros((b, nk), jnp.int32), b,
                                        nq, nk)
  spec = common.MaskSpec()
  sigma = jnp.asarray([0.2, 1.0], jnp.float32)
  out, lse = pallas_gpu.forward(q, k, v, tq, tk, sigma, scale=d ** -0.5, spec=spec,
                                q_segment_ids=qs, kv_segment_ids=ks, interpret=True,
                                block_q=64, block_kv=64)
  out, lse = np.asarray(out, np.float32), np.asarray(lse)
  empty = q_ids == 5  # [B, Nq]
  assert np.all(out[empty] == 0)
  assert np.all(np.isneginf(lse.transpose(0, 2, 1)[empty]))
  assert np.all(np.isfinite(lse.transpose(0, 2, 1)[~empty]))
  with jax.enable_x64(True):
    c = lambda x: jnp.asarray(np.asarray(x, np.float64))
    ref = reference.gaussian_attention_segments(
        c(q), c(k), c(v), c(tq), c(tk), c(sigma), scale=d ** -0.5, spec=spec,
        q_segment_ids=qs, kv_segment_ids=ks)
  keep = q_ids != 5
  assert _rel(out[keep], np.asarray(ref)[keep]) < 1e-2
  # Without a backward to feed (exact_lse=False) the row sums come from the tensor cores
  # (l_mma): they sum the bf16 P that P·V uses, so not bit-identical, but the empty rows stay
  # exact and the rest within bf16 rounding of the float32 sums.
  out1, lse1 = pallas_gpu.forward(q, k, v, tq, tk, sigma, scale=d ** -0.5, spec=spec,
                                  q_segment_ids=qs, kv_segment_ids=ks, interpret=True,
                                  block_q=64, block_kv=64, exact_lse=False)
  out1, lse1 = np.asarray(out1, np.float32), np.asarray(lse1)
  assert np.all(out1[empty] == 0)
  assert np.all(np.isneginf(lse1.transpose(0, 2, 1)[empty]))
  assert _rel(out1[keep], np.asarray(ref)[keep]) < 1e-2
  fin = np.isfinite(lse)
  assert 0 < np.max(np.abs(lse1[fin] - lse[fin])) < 2e-3


def test_interpret_grouped_heads_with_per_head_band_lists():
  """Grouped heads (2 query heads per K/V head) with band skipping: each query head skips
  different blocks, so the dK/dV kernel's list over (head, query block) pairs differs per head,
  and dK/dV are summed over the group inside the kernel."""
  b, nq, nk, h, hkv, d = 1, 256, 256, 2, 1, 64
  q, k, v, do, _, _ = _inputs(6, b, nq, nk, h, hkv, d)
  tq = jnp.broadcast_to(jnp.arange(nq, dtype=jnp.float32) / 25, (b, nq))
  tk = jnp.broadcast_to(jnp.arange(nk, dtype=jnp.float32) / 25, (b, nk))
  sigma = jnp.asarray([0.04, 3.0], jnp.float32)
  spec = common.MaskSpec(bias_cutoff=20.0)
  qs, ks = common.normalise_segment_ids(None, None, b, nq, nk)

  # The grouped list: entries r·n_qb + qb, partially visible pairs first, every head's own
  # blocks only; the narrow head 0 skips query blocks the wide head 1 keeps.
  cfg = pallas_gpu._blocks({}, d, interpret=True)
  prep = pallas_gpu._Prep(q, k, tq, tk, sigma, d ** -0.5, spec, qs, ks,
                          q_mult=64, k_mult=128)
  codes = np.asarray(jnp.swapaxes(prep.codes(cfg["block_q_dkv"], 2 * cfg["block_kv_dkv"]), 2, 3))
  grouped = pallas_gpu._grouped_lists(jnp.asarray(codes), h, h // hkv)
  order, n_p, n_f = (np.asarray(x) for x in pallas_gpu.block_lists(grouped))
  n_qb = codes.shape[-1]
  for t in range(codes.shape[2]):
    listed = [divmod(int(e), n_qb) for e in order[0, 0, t, :n_p[0, 0, t] + n_f[0, 0, t]]]
    want = [(r, qb) for r in range(h) for qb in range(n_qb)
            if codes[0, r, t, qb] != common.SKIP]
    assert sorted(listed) == sorted(want)
    kept = {r: sum(1 for rr, _ in listed if rr == r) for r in range(h)}
    assert kept[0] < kept[1]

  kw = dict(scale=d ** -0.5, spec=spec, q_segment_ids=qs, kv_segment_ids=ks, interpret=True)
  out, lse = pallas_gpu.forward(q, k, v, tq, tk, sigma, **kw)
  dq, dk, dv, dsig = pallas_gpu.backward(q, k, v, tq, tk, sigma, out, lse, do, **kw)
  assert dk.shape == k.shape and dv.shape == v.shape
  # Against the dense reference: skipped blocks are below e^-20 of the row maximum.
  _assert_matches_float64(q, k, v, do, tq, tk, sigma, common.MaskSpec(), qs, ks,
                          (out, dq, dk, dv, dsig))


def test_affine_key_blocks_are_found_and_reproduce_the_coordinates():
  """Regular grids (25 fps, 50 Hz with an offset, 4-frame latents, 160 s long) fit lines per
  block within 8 ulps of the block's largest |t − t_ref|; irregular blocks and a 1 ms jitter
  do not. g_0 + j·(g_h·dt) then reproduces every Gaussian coordinate of an affine block."""
  rng = np.random.default_rng(3)
  n, bk = 4096, 128
  grids = [np.arange(n) / 25, np.arange(n) / 50 + 0.37, np.arange(n) * 4 / 25, np.arange(n) / 25]
  jitter = np.arange(n) / 25
  jitter[300] += 1e-3  # block 2
  grids.append(jitter)
  grids.append(np.sort(rng.uniform(0, n / 25, n)))
  t = jnp.asarray(np.stack(grids), jnp.float32)  # [B=6, N]
  t_ref = t[:, :1] - 0.5
  dt, ok = (np.asarray(x) for x in pallas_gpu.affine_keys(t, t_ref, bk))
  assert ok.shape == dt.shape == (6, n // bk)
  assert ok[:4].all()
  assert not ok[4, 2] and ok[4, :2].all() and ok[4, 3:].all()
  assert not ok[5].any()
  for g in (0.3, 40.0):  # a wide and a narrow head (q·k units)
    coords = np.asarray(g * (t - t_ref), np.float64).reshape(6, n // bk, bk)
    fit = coords[..., :1] + np.arange(bk) * (g * dt)[..., None]
    err = np.abs(fit - coords).max(-1) / np.abs(coords).max(-1)
    assert err[:4].max() <= 2.0 ** -19
  # An item runs the line-fit loop only if every fully visible block of it is affine.
  codes = jnp.asarray(rng.integers(0, 3, (6, 1, 5, n // bk)), jnp.int32)
  order, n_p, n_f = pallas_gpu.block_lists(codes)
  items = np.asarray(pallas_gpu.affine_items(jnp.asarray(ok), order, n_p, n_f))
  assert items.shape == (6, 1, 5)
  for bi, _, ti in np.ndindex(items.shape):
    full = np.flatnonzero(np.asarray(codes)[bi, 0, ti] == common.FULL)
    assert items[bi, 0, ti] == int(ok[bi, full].all())


def test_interpret_affine_key_steps_match_float64_reference():
  """Fully visible steps over affine key blocks (the line-fit loop) next to items that must
  keep the per-key loop (an irregular block in batch 0), causal masks in front."""
  b, nq, nk, h, d = 2, 256, 256, 2, 64
  q, k, v, _, _, _ = _inputs(7, b, nq, nk, h, h, d)
  tq = jnp.broadcast_to(jnp.arange(nq, dtype=jnp.float32) / 25, (b, nq))
  tk = np.broadcast_to(np.arange(nk, dtype=np.float32) / 50 + 0.3, (b, nk)).copy()
  tk[0, 64:128] = np.sort(np.random.default_rng(8).uniform(1.28, 2.56, 64))
  tk = jnp.asarray(tk)
  sigma = jnp.asarray([0.04, 0.6], jnp.float32)
  for spec in (common.MaskSpec(), common.MaskSpec(causal=True)):
    qs, ks = common.normalise_segment_ids(None, None, b, nq, nk)
    kw = dict(scale=d ** -0.5, spec=spec, q_segment_ids=qs, kv_segment_ids=ks, interpret=True,
              block_q=64, block_kv=64)
    out, lse = pallas_gpu.forward(q, k, v, tq, tk, sigma, affine_k=1, **kw)
    out0, lse0 = pallas_gpu.forward(q, k, v, tq, tk, sigma, affine_k=0, **kw)
    with jax.enable_x64(True):
      c = lambda x: jnp.asarray(np.asarray(x, np.float64))
      ref = reference.gaussian_attention_segments(
          c(q), c(k), c(v), c(tq), c(tk), c(sigma), scale=d ** -0.5, spec=spec,
          q_segment_ids=qs, kv_segment_ids=ks)
    assert _rel(out, ref) < 1e-2
    assert abs(_rel(out, ref) - _rel(out0, ref)) < 1e-4
    np.testing.assert_allclose(np.asarray(lse), np.asarray(lse0), rtol=1e-5, atol=1e-4)


def test_block_options_are_validated_with_the_offending_key():
  cfg = pallas_gpu._blocks({"affine_k": 0, "block_kv": 64}, 128)
  assert cfg["affine_k"] == 0 and cfg["block_kv"] == 64 and cfg["block_q"] == 64
  assert pallas_gpu._blocks({}, 64)["block_q"] == 128  # head dim <= 64: taller query tiles
  with pytest.raises(TypeError, match="block_kvv"):
    pallas_gpu._blocks({"block_kvv": 64}, 128)
  with pytest.raises(TypeError, match="sched"):  # a removed option is an unknown key
    pallas_gpu._blocks({"sched": 0}, 128)
  with pytest.raises(ValueError, match="block_q=96"):
    pallas_gpu._blocks({"block_q": 96}, 128)
  with pytest.raises(ValueError, match="num_stages=0"):
    pallas_gpu._blocks({"num_stages": 0}, 128)
  with pytest.raises(ValueError, match="regs_bwd=236"):  # not a multiple of 8
    pallas_gpu._blocks({"regs_bwd": 236}, 128)
  with pytest.raises(ValueError, match="regs=248"):  # would leave the memory warpgroup < 24
    pallas_gpu._blocks({"regs": 248}, 128)
  with pytest.raises(ValueError, match="affine_k=3"):
    pallas_gpu._blocks({"affine_k": 3}, 128)
  with pytest.raises(ValueError, match="l_mma=2"):
    pallas_gpu._blocks({"l_mma": 2}, 128)
  # The forward's ring releases use hardware barriers: 6 barriers, two operands -> <= 3 stages.
  assert pallas_gpu._blocks({"num_stages": 3}, 128)["num_stages"] == 3
  with pytest.raises(ValueError, match="num_stages=4"):
    pallas_gpu._blocks({"num_stages": 4}, 128)
  assert pallas_gpu._blocks({"num_stages_bwd": 4}, 128)["num_stages_bwd"] == 4


def test_operands_are_padded_only_where_tma_needs_it():
  """Compiled kernels read q/k/v unpadded when the length is a multiple of 8 (TMA zero-fills
  the rest of the last tile; the GPU suite's odd lengths check the results); other lengths get
  the next multiple of 8. The interpreter clamps slices, so there the operands fill whole tiles."""
  x = jnp.arange(2 * 200 * 3, dtype=jnp.float32).reshape(2, 200, 3)
  assert pallas_gpu._pad_rows(x, 256, interpret=False) is x  # no copy
  y = pallas_gpu._pad_rows(x[:, :197], 256, interpret=False)
  assert y.shape == (2, 200, 3)
  np.testing.assert_array_equal(y[:, :197], x[:, :197])
  assert not np.any(y[:, 197:])
  z = pallas_gpu._pad_rows(x, 256, interpret=True)
  assert z.shape == (2, 256, 3) and not np.any(z[:, 200:])
  np.testing.assert_array_equal(z[:, :200], x)
