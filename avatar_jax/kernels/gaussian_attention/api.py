"""Multi-head Gaussian time-distance attention: the one public entry point.

    out = softmax(q·kᵀ·scale − (t_q − t_k)² / (2 σ_h²) + mask) · v

Times are in seconds so that streams at different rates (video frames at 25 fps, audio
tokens at 50 Hz, latent frames covering 4 video frames) align without resampling.

Implementations (``implementation=``):
  * ``"xla"``: the materialising plain-JAX reference, differentiated by autodiff. Exact,
    O(B·H·Nq·Nk) memory; the default on CPU for small problems.
  * ``"xla_chunked"``: online-softmax reference over KV chunks (``lax.scan``) with a chunked
    backward; O(chunk²) working memory, for long sequences on CPU.
  * ``"pallas_tpu"``: Pallas TPU kernels (``pallas_tpu.py``); ``interpret=True`` runs them on
    CPU in TPU interpret mode.
  * ``"pallas_gpu"``: Pallas Mosaic-GPU kernels for Hopper (``pallas_gpu.py``).
  * ``"cudnn_bias"``: the peer a user would otherwise run: the bias materialised as
    [B, H, Nq, Nk] and passed to ``jax.nn.dot_product_attention(implementation="cudnn")``
    (GPU only; for benchmarks, never chosen by "auto").
  * ``"auto"``: by ``jax.default_backend()``: tpu → pallas_tpu, gpu → pallas_gpu when its
    module is importable (else xla_chunked), cpu → xla, or xla_chunked when the logits
    would exceed ``_AUTO_MATERIALISE_LIMIT`` elements.

All non-``xla`` implementations share one ``jax.custom_vjp`` (below) over the backend
contract documented in ``common.py``. Gradients flow to q, k, v and σ; times and segment ids
are treated as constants.
"""
from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np

from avatar_jax.kernels.gaussian_attention import common
from avatar_jax.kernels.gaussian_attention import reference

IMPLEMENTATIONS = ("auto", "xla", "xla_chunked", "pallas_tpu", "pallas_gpu", "cudnn_bias")
_FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64)
# Above this many logits (B·H·Nq·Nk) "auto" on CPU switches from the materialising reference
# to the chunked one (2^26 float32 logits = 256 MiB, plus the same again for autodiff).
_AUTO_MATERIALISE_LIMIT = 1 << 26


def _backend_module(name: str):
  """Imports the backend module for `name`; a missing GPU module is a clear error."""
  if name == "xla_chunked":
    return reference
  if name == "pallas_tpu":
    return importlib.import_module("avatar_jax.kernels.gaussian_attention.pallas_tpu")
  if name == "pallas_gpu":
    try:
      return importlib.import_module("avatar_jax.kernels.gaussian_attention.pallas_gpu")
    except ImportError as e:
      raise NotImplementedError(
          "implementation='pallas_gpu' needs avatar_jax/kernels/gaussian_attention/"
          f"pallas_gpu.py, which could not be imported ({e}); use implementation='xla' or "
          "'xla_chunked'") from e
  raise ValueError(f"unknown backend {name!r}")


def _gpu_module_available() -> bool:
  try:
    _backend_module("pallas_gpu")
    return True
  except NotImplementedError:
    return False


def _gpu_kernel_fits(d: int | None, dtype) -> bool:
  """Shapes and dtypes the Mosaic-GPU kernel handles: 16-bit wgmma, head dim 64 or 128 (its
  tiles at 192 or 256 need more shared memory than a Hopper CTA has; pallas_gpu.HEAD_DIMS)."""
  if d is None or dtype is None:
    return True
  from avatar_jax.kernels.gaussian_attention import pallas_gpu  # pylint: disable=g-import-not-at-top
  return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and d in pallas_gpu.HEAD_DIMS


def _is_hopper() -> bool:
  """The fused GPU kernel uses Hopper-only instructions (wgmma, TMA): sm_90 only."""
  cc = getattr(jax.devices()[0], "compute_capability", None)
  return cc is not None and str(cc).split(".")[0] == "9"


def target_platform() -> str:
  """The platform the current program is built for: that of the ambient mesh's devices
  (`jax.set_mesh`), else the default backend. They differ when a CPU host compiles for a TPU
  topology (python -m avatar_jax.compile)."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def resolve_implementation(implementation: str, b: int, h: int, nq: int, nk: int,
                           d: int | None = None, dtype=None) -> str:
  """'auto' → a concrete implementation name, by default backend, problem size and dtype.

  On GPU, inputs the fused kernel does not take (float32, small head dims) go to XLA.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation != "auto":
    return implementation
  platform = target_platform()
  if platform == "tpu":
    return "pallas_tpu"
  if platform == "gpu" and _is_hopper() and _gpu_kernel_fits(d, dtype) and _gpu_module_available():
    return "pallas_gpu"
  if b * h * nq * nk > _AUTO_MATERIALISE_LIMIT:
    return "xla_chunked"
  return "xla"


def _check_inputs(q, k, v, t_q, t_k, sigma, q_segment_ids, kv_segment_ids):
  def shape(x):
    return tuple(np.shape(x))

  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"expected q [B, Nq, H, D], k/v [B, Nk, Hkv, D]; got q {shape(q)}, "
                     f"k {shape(k)}, v {shape(v)}")
  b, nq, h, d = q.shape
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape [B, Nk, Hkv, D]; got k {shape(k)}, "
                     f"v {shape(v)}")
  bk, nk, hkv, dk = k.shape
  if bk != b or dk != d:
    raise ValueError(f"k/v {shape(k)} do not match q {shape(q)} in batch or head dim "
                     "(expected [B, Nk, Hkv, D] with q's B and D)")
  if hkv == 0 or h % hkv:
    raise ValueError(f"q has H={h} heads and k/v have Hkv={hkv}: expected H % Hkv == 0")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.dtype not in _FLOAT_DTYPES:
      raise TypeError(f"{name} must be bfloat16/float16/float32, got {x.dtype}")
  if not (q.dtype == k.dtype == v.dtype):
    raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
  if shape(t_q) != (b, nq) or shape(t_k) != (b, nk):
    raise ValueError(f"expected t_q [B, Nq] = {(b, nq)} and t_k [B, Nk] = {(b, nk)}; got "
                     f"t_q {shape(t_q)}, t_k {shape(t_k)}")
  for name, t in (("t_q", t_q), ("t_k", t_k)):
    if not jnp.issubdtype(jnp.result_type(t), jnp.floating):
      raise TypeError(f"{name} must hold float times in seconds, got dtype {jnp.result_type(t)}")
  if shape(sigma) != (h,):
    raise ValueError(f"sigma must have shape [H] = ({h},) (one width per query head), got "
                     f"{shape(sigma)}")
  if not jnp.issubdtype(jnp.result_type(sigma), jnp.floating):
    raise TypeError(f"sigma must be a float array, got dtype {jnp.result_type(sigma)}")
  for name, s, n in (("q_segment_ids", q_segment_ids, nq), ("kv_segment_ids", kv_segment_ids, nk)):
    if s is None:
      continue
    if shape(s) != (b, n):
      raise ValueError(f"{name} must have shape {(b, n)}, got {shape(s)}")
    if not jnp.issubdtype(jnp.result_type(s), jnp.integer):
      raise TypeError(f"{name} must be integer, got dtype {jnp.result_type(s)}")


def gaussian_attention(q, k, v, t_q, t_k, sigma, *, scale=None, causal=False,
                       causal_block=None, lookahead_blocks=0, window=None,
                       q_segment_ids=None, kv_segment_ids=None, bias_cutoff=None,
                       implementation="auto", interpret=False, return_lse=False,
                       **block_sizes):
  """Attention with a per-head Gaussian bias on time distance.

  Args:
    q: [B, Nq, H, D] queries.
    k, v: [B, Nk, Hkv, D] keys/values; H % Hkv == 0 (grouped heads).
    t_q: [B, Nq] query times (seconds). t_k: [B, Nk] key times (seconds). Any order.
    sigma: [H] per-head width in seconds (float32, learnable); `inf` = no bias. Nonzero.
    scale: logit scale, default D**-0.5.
    causal: key j visible to query i iff t_k[j] <= t_q[i].
    causal_block: block length in seconds; if set, causality is block-wise:
      visible iff floor(t_k/b) <= floor(t_q/b) + lookahead_blocks.
    window: if set, visible iff |t_q - t_k| <= window (strict frame-aligned attention).
    q_segment_ids: [B, Nq] int; kv_segment_ids: [B, Nk] int. Visible iff equal;
      a negative key id marks padding (never visible). kv_segment_ids alone marks padding
      only; q_segment_ids alone is an error.
    bias_cutoff: if set, pairs whose Gaussian term is below -bias_cutoff may be skipped
      (blocked backends skip whole blocks; "xla" stays exact). Output error per row is at
      most 2·max|v|·|S|·exp(A − m − bias_cutoff), S the skipped keys, m the row's max kept
      logit, A the largest q·k·scale among skipped keys (see docs/gaussian_attention.md).
    implementation: "auto" | "xla" | "xla_chunked" | "pallas_gpu" | "pallas_tpu" | "cudnn_bias".
    interpret: run Pallas kernels in interpret mode (CPU testing).
    return_lse: also return lse [B, H, Nq] float32, the natural-log normaliser
      log Σ_j exp(s_ij) over the visible (kept) keys, −inf for a row with none. Differentiable:
      attention over key chunks merges exactly by lse (what the `context` ring of
      sharded.py does).
    **block_sizes: forwarded to the backend (e.g. block_q=, block_k= for Pallas,
      chunk_q=, chunk_k= for xla_chunked).

  Returns:
    [B, Nq, H, D] in q.dtype, or (out, lse) with `return_lse`. A query with no visible key
    returns zeros (and zero grads).
  """
  _check_inputs(q, k, v, t_q, t_k, sigma, q_segment_ids, kv_segment_ids)
  b, nq, h, d = q.shape
  nk = k.shape[1]
  scale = float(d ** -0.5 if scale is None else scale)
  spec = common.MaskSpec(causal=bool(causal), causal_block=causal_block,
                         lookahead_blocks=int(lookahead_blocks), window=window,
                         bias_cutoff=None if bias_cutoff is None else float(bias_cutoff))
  t_q = jax.lax.stop_gradient(jnp.asarray(t_q))
  t_k = jax.lax.stop_gradient(jnp.asarray(t_k))
  q_seg, kv_seg = common.normalise_segment_ids(q_segment_ids, kv_segment_ids, b, nq, nk)
  impl = resolve_implementation(implementation, b, h, nq, nk, d, q.dtype)
  if impl == "xla":
    if block_sizes:
      raise TypeError(f"implementation='xla' takes no block sizes, got {sorted(block_sizes)}")
    return reference.gaussian_attention_segments(q, k, v, t_q, t_k, sigma, scale=scale,
                                                 spec=spec, q_segment_ids=q_seg,
                                                 kv_segment_ids=kv_seg,
                                                 return_lse=return_lse)
  if impl == "cudnn_bias":
    if block_sizes or return_lse:
      raise TypeError("implementation='cudnn_bias' takes no block sizes and has no lse")
    return reference.gaussian_attention_dense_bias(q, k, v, t_q, t_k, sigma, scale=scale,
                                                   spec=spec, q_segment_ids=q_seg,
                                                   kv_segment_ids=kv_seg)
  if q_segment_ids is None and kv_segment_ids is None:
    q_seg = kv_seg = None  # backends may then know statically that nothing is masked
  static = _Static(impl, scale, spec, bool(interpret), tuple(sorted(block_sizes.items())),
                   bool(return_lse))
  return _attention_vjp(static, q, k, v, t_q, t_k, sigma, q_seg, kv_seg)


class _Static(tuple):
  """Hashable bundle of the non-array arguments of the custom_vjp."""
  __slots__ = ()

  def __new__(cls, impl, scale, spec, interpret, block_sizes, with_lse):
    return super().__new__(cls, (impl, scale, spec, interpret, block_sizes, with_lse))

  impl = property(lambda s: s[0])
  scale = property(lambda s: s[1])
  spec = property(lambda s: s[2])
  interpret = property(lambda s: s[3])
  block_sizes = property(lambda s: dict(s[4]))
  with_lse = property(lambda s: s[5])


def _kwargs(static, q_seg, kv_seg):
  return dict(scale=static.scale, spec=static.spec, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
              interpret=static.interpret, **static.block_sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_vjp(static, q, k, v, t_q, t_k, sigma, q_seg, kv_seg):
  # Not differentiated: unless the caller reads lse, backends may trade its precision for
  # speed.
  out, lse = _backend_module(static.impl).forward(q, k, v, t_q, t_k, sigma,
                                                  exact_lse=static.with_lse,
                                                  **_kwargs(static, q_seg, kv_seg))
  return (out, lse) if static.with_lse else out


def _attention_fwd(static, q, k, v, t_q, t_k, sigma, q_seg, kv_seg):
  out, lse = _backend_module(static.impl).forward(q, k, v, t_q, t_k, sigma,
                                                  **_kwargs(static, q_seg, kv_seg))
  res = (q, k, v, t_q, t_k, sigma, q_seg, kv_seg, out, lse)
  return ((out, lse) if static.with_lse else out), res


def _attention_bwd(static, res, cts):
  q, k, v, t_q, t_k, sigma, q_seg, kv_seg, out, lse = res
  dout, dlse = cts if static.with_lse else (cts, None)
  dq, dk, dv, dsigma = _backend_module(static.impl).backward(
      q, k, v, t_q, t_k, sigma, out, lse, dout, dlse=dlse, **_kwargs(static, q_seg, kv_seg))
  zero = common.zero_cotangent
  return (dq, dk, dv, zero(t_q), zero(t_k), dsigma.astype(sigma.dtype), zero(q_seg),
          zero(kv_seg))


_attention_vjp.defvjp(_attention_fwd, _attention_bwd)
