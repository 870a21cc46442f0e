"""Multi-head attention over time-stamped tokens with a per-head Gaussian time-distance bias.

Narrow heads (σ of a frame or two) can lock lips to the own audio; wide heads (seconds) can
gather the listening context of the partner's speech. The same module gives the ablation
modes of the Beyond Monologue paper:
  - "gaussian": learned or fixed per-head σ (seconds),
  - "global":   no time bias (σ = ∞),
  - "frame":    strict frame-aligned attention (a hard window of ±`window` seconds).

Beyond the bias, the layer carries what streaming and video models need: causal and
block-causal (with look-ahead) masks on time, segment ids, grouped K/V heads, rotary position
embeddings on time (1D) or on (time, height, width) of video latent tokens (3D, Wan's split of
the head dim), an explicit KV cache for incremental decoding (flax gemma's `(out, cache)`
style), and the mesh's `context` axis: under `jax.set_mesh` with context > 1 the attention
runs through `sharded_gaussian_attention`, so activations stay split along time.
"""
from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avatar_jax import sharding
from avatar_jax.kernels.gaussian_attention import api as gattn
from avatar_jax.kernels.gaussian_attention import sharded as gattn_sharded
from avatar_jax.models.layers import dense

MODES = ("gaussian", "global", "frame")
ROPES = (None, "1d", "3d")


def init_sigmas(num_heads: int, lo: float, hi: float) -> np.ndarray:
  """Per-head widths spread geometrically from lo to hi seconds: [H]."""
  if num_heads == 1:
    return np.array([lo], np.float32)
  return np.geomspace(lo, hi, num_heads).astype(np.float32)


# ============================================================================== rotary embedding
def rope_split(head_dim: int, kind: str) -> tuple[int, ...]:
  """Rotated channels per position axis: (D,) for 1D; (D_t, D_h, D_w) for 3D, Wan's split
  (height and width get 2·⌊D/6⌋ each, time the rest), every part even."""
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
  if kind == "1d":
    return (head_dim,)
  hw = 2 * (head_dim // 6)
  return (head_dim - 2 * hw, hw, hw)


def apply_rope(x: jax.Array, pos: jax.Array, kind: str, theta: float = 10_000.0) -> jax.Array:
  """Rotates pairs of channels of x [B, N, H, D] by angles pos·θ^(−2i/d).

  pos: [B, N] (1D: e.g. time in frames) or [B, N, 3] (3D: time, row, column). Computed in
  float32, returned in x's dtype. Rotating q and k alike makes q·k depend on pos_q − pos_k only.
  """
  parts = rope_split(x.shape[-1], kind)
  pos = pos[..., None] if kind == "1d" else pos
  if pos.shape[-1] != len(parts):
    raise ValueError(f"RoPE {kind}: positions [..., {len(parts)}] expected, got {pos.shape}")
  angles = []
  for a, d in enumerate(parts):
    freq = theta ** (-np.arange(0, d, 2, dtype=np.float32) / d)  # [d/2]
    angles.append(pos[..., a:a + 1].astype(jnp.float32) * freq)  # [B, N, d/2]
  ang = jnp.concatenate(angles, axis=-1)[:, :, None, :]  # [B, N, 1, D/2]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., 0::2], xf[..., 1::2]
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


# ==================================================================================== KV cache
@flax.struct.dataclass
class KVCache:
  """Keys/values of the tokens seen so far, for incremental decoding (fixed length, jittable).

  k, v: [B, L, Hkv, D] (already projected and rotated); t: [B, L] key times (seconds);
  seg: [B, L] int32 segment ids, −1 for slots not yet written (never visible); end: int32
  scalar, the number of tokens written so far.
  ring: a ring buffer (static): token i lives in slot i mod L, so the newest L tokens stay and
  memory is constant however long the stream runs (a sliding window; visibility still follows
  the times, so L must hold a layer's `window` plus the tokens written per call). Writes of n
  tokens need L % n == 0.
  """
  k: jax.Array
  v: jax.Array
  t: jax.Array
  seg: jax.Array
  end: jax.Array
  ring: bool = flax.struct.field(pytree_node=False, default=False)

  @classmethod
  def init(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
           dtype=jnp.float32, *, ring: bool = False) -> "KVCache":
    z = jnp.zeros((batch, max_len, num_kv_heads, head_dim), dtype)
    return cls(k=z, v=z, t=jnp.zeros((batch, max_len), jnp.float32),
               seg=jnp.full((batch, max_len), -1, jnp.int32), end=jnp.zeros((), jnp.int32),
               ring=ring)

  def append(self, k, v, t, seg) -> "KVCache":
    """Writes n new tokens at [end, end + n) (mod L for a ring): k, v [B, n, Hkv, D], t [B, n],
    seg [B, n]."""
    n, size = k.shape[1], self.k.shape[1]
    if self.ring and size % n:
      raise ValueError(f"ring KVCache of {size} slots takes writes that divide it, got {n}")
    at = self.end % size if self.ring else self.end
    put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype),
                                                               at, axis=1)
    return KVCache(k=put(self.k, k), v=put(self.v, v), t=put(self.t, t), seg=put(self.seg, seg),
                   end=self.end + n, ring=self.ring)


def _context_size() -> int:
  """Size of the current mesh's `context` axis (1 outside `jax.set_mesh`)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or "context" not in mesh.axis_names:
    return 1
  return int(mesh.shape["context"])


# =================================================================================== the layer
class TimeAttention(nnx.Module):
  """x: [B, Nq, D] at times t_q [B, Nq] attends to ctx: [B, Nk, Dc] at times t_k [B, Nk]."""

  def __init__(self, d: int, dctx: int, num_heads: int, *, rngs: nnx.Rngs, mode: str = "gaussian",
               sigma_range: Sequence[float] = (0.04, 2.0), learn_sigma: bool = True,
               window: float = 0.04, implementation: str = "auto", num_kv_heads: int | None = None,
               causal: bool = False, causal_block: float | None = None, lookahead_blocks: int = 0,
               history: float | None = None,
               rope: str | None = None, rope_theta: float = 10_000.0, rope_rate: float = 25.0,
               dtype=None, param_dtype=jnp.float32):
    """history: seconds; keys farther than this from the query are invisible (|t_q − t_k| ≤
    history, with `causal`/`causal_block` a sliding window into the past that a ring KVCache
    holds in constant memory). rope: None, "1d" (positions = time·`rope_rate`, i.e. frames at
    25 fps by default) or "3d"
    (positions [B, N, 3] passed to the call). dtype: compute dtype of q/k/v and projections
    (bf16 lets the fused GPU/TPU kernels run); σ and the softmax statistics stay float32."""
    if mode not in MODES:
      raise ValueError(f"attention mode {mode!r}: expected one of {MODES}")
    if rope not in ROPES:
      raise ValueError(f"attention rope {rope!r}: expected one of {ROPES}")
    if d % num_heads:
      raise ValueError(f"model width {d} is not divisible by num_heads={num_heads}")
    num_kv_heads = num_kv_heads or num_heads
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, d // num_heads
    self.mode, self.learn_sigma, self.window = mode, learn_sigma, window
    self.implementation = implementation
    self.causal, self.causal_block, self.lookahead_blocks = causal, causal_block, lookahead_blocks
    if history is not None and mode == "frame":
      raise ValueError("attention: `history` bounds the gaussian/global modes; 'frame' has `window`")
    self.history = history
    self.rope, self.rope_theta, self.rope_rate = rope, rope_theta, rope_rate
    self.dtype = dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    dkv = num_kv_heads * self.head_dim
    self.q = dense(d, d, ("embed", "heads"), use_bias=False, **kw)
    self.k = dense(dctx, dkv, ("embed", "heads"), use_bias=False, **kw)
    self.v = dense(dctx, dkv, ("embed", "heads"), use_bias=False, **kw)
    self.o = dense(d, d, ("heads", "embed"), zero_init=True, **kw)
    # σ lives in log space so it stays positive under any optimiser step; always float32.
    log_sigma = jnp.log(init_sigmas(num_heads, *sigma_range))
    self.log_sigma = (nnx.Param(log_sigma, sharding=("heads",), eager_sharding=False)
                      if learn_sigma else nnx.Variable(log_sigma))

  def sigma(self) -> jax.Array:
    """Per-head width in seconds: [H]."""
    if self.mode != "gaussian":
      return jnp.full((self.num_heads,), jnp.inf, jnp.float32)
    return jnp.exp(self.log_sigma[...].astype(jnp.float32))

  def _mask_kwargs(self):
    return dict(causal=self.causal, causal_block=self.causal_block,
                lookahead_blocks=self.lookahead_blocks,
                window=self.window if self.mode == "frame" else self.history)

  def _kernel_on_mesh(self, b: int, nq: int, nk: int) -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
      return False
    return self.implementation_for(b, nq, nk).startswith("pallas")

  def implementation_for(self, batch: int, nq: int, nk: int) -> str:
    """The backend `implementation="auto"` resolves to for these shapes (for benchmarks)."""
    dtype = self.dtype or jnp.float32
    return gattn.resolve_implementation(self.implementation, batch, self.num_heads, nq, nk,
                                        self.head_dim, jnp.dtype(dtype))

  def _rotate(self, x, t, pos):
    if self.rope is None:
      return x
    if self.rope == "1d":
      pos = t * self.rope_rate if pos is None else pos
    elif pos is None:
      raise ValueError("rope='3d' needs positions [B, N, 3] (time, row, column)")
    return apply_rope(x, pos, self.rope, self.rope_theta)

  def __call__(self, x, t_q, ctx, t_k, *, q_segment_ids=None, kv_segment_ids=None,
               pos_q=None, pos_k=None, cache: KVCache | None = None):
    """-> out [B, Nq, D], or (out, cache) when a cache is given.

    With a cache, ctx holds the NEW key tokens (self-attention: ctx = x); they are appended to
    the cache and x attends to everything written so far, under the layer's mask on times.
    """
    b, nq, _ = x.shape
    nk = ctx.shape[1]
    h, hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
    x = sharding.constrain(x, ("batch", "time", "embed"))
    q = self._rotate(self.q(x).reshape(b, nq, h, hd), t_q, pos_q)
    k = self._rotate(self.k(ctx).reshape(b, nk, hkv, hd), t_k, pos_k)
    v = self.v(ctx).reshape(b, nk, hkv, hd)
    kw = dict(implementation=self.implementation, **self._mask_kwargs())
    if cache is not None:
      if q_segment_ids is not None:
        raise ValueError("a KV-cached call takes kv_segment_ids (of the new tokens) only")
      seg = (jnp.zeros((b, nk), jnp.int32) if kv_segment_ids is None
             else jnp.where(jnp.asarray(kv_segment_ids) >= 0, 0, -1).astype(jnp.int32))
      cache = cache.append(k, v, t_k, seg)
      out = gattn.gaussian_attention(q, cache.k, cache.v, t_q, cache.t, self.sigma(),
                                     kv_segment_ids=cache.seg, **kw)
      return self.o(out.reshape(b, nq, h * hd)), cache
    n_ctx = _context_size()
    if (n_ctx > 1 and nq % n_ctx == 0 and nk % n_ctx == 0) or self._kernel_on_mesh(b, nq, nk):
      # Sequence parallel: queries and keys stay split along time over `context`. A Pallas
      # kernel is one opaque call the compiler cannot split, so on a mesh it runs per device
      # under shard_map too (batch and heads split, no communication).
      out = gattn_sharded.sharded_gaussian_attention(
          q, k, v, t_q, t_k, self.sigma(), q_segment_ids=q_segment_ids,
          kv_segment_ids=kv_segment_ids, **kw)
    else:
      out = gattn.gaussian_attention(q, k, v, t_q, t_k, self.sigma(), q_segment_ids=q_segment_ids,
                                     kv_segment_ids=kv_segment_ids, **kw)
    out = sharding.constrain(out.reshape(b, nq, h * hd), ("batch", "time", "heads"))
    return self.o(out)
