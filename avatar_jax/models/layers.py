"""Small NNX building blocks with logical-axis annotations on every parameter.

Precision: every block takes `dtype` (compute; None = the parameters' dtype) and `param_dtype`
(storage, float32 by default). LayerNorm statistics are computed in float32 whatever `dtype`
is (flax upcasts them), and the sinusoidal timestep embedding is float32.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def logical(init, axes):
  """Initializer whose variable carries logical axis names (mapped to the mesh by sharding.RULES).

  Eager sharding is off: the names are logical, and the trainer places variables itself.
  """
  return nnx.with_partitioning(init, axes, eager_sharding=False)


def dense(din: int, dout: int, axes: tuple[str | None, str | None], *, rngs: nnx.Rngs,
          use_bias: bool = True, zero_init: bool = False, dtype=None,
          param_dtype=jnp.float32) -> nnx.Linear:
  """nnx.Linear whose kernel [din, dout] carries logical axes `axes` (bias: axes[1])."""
  init = nnx.initializers.zeros_init() if zero_init else nnx.initializers.lecun_normal()
  return nnx.Linear(
      din, dout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
      kernel_init=logical(init, axes),
      bias_init=logical(nnx.initializers.zeros_init(), (axes[1],)))


def layer_norm(d: int, *, rngs: nnx.Rngs, affine: bool = True, dtype=None,
               param_dtype=jnp.float32) -> nnx.LayerNorm:
  return nnx.LayerNorm(
      d, use_bias=affine, use_scale=affine, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
      scale_init=logical(nnx.initializers.ones_init(), ("embed",)),
      bias_init=logical(nnx.initializers.zeros_init(), ("embed",)))


class Mlp(nnx.Module):
  def __init__(self, d: int, hidden: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.up = dense(d, hidden, ("embed", "mlp"), **kw)
    self.down = dense(hidden, d, ("mlp", "embed"), **kw)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x)))


class Conv1d(nnx.Module):
  """Temporal convolution over [B, T, Din] -> [B, T, Dout]: 'SAME', or `causal` (pads only the
  past, so output t sees inputs <= t: what a streaming model needs)."""

  def __init__(self, din: int, dout: int, kernel: int, *, rngs: nnx.Rngs, dilation: int = 1,
               causal: bool = False, dtype=None, param_dtype=jnp.float32):
    padding = [(dilation * (kernel - 1), 0)] if causal else "SAME"
    self.conv = nnx.Conv(
        din, dout, kernel_size=(kernel,), kernel_dilation=(dilation,), padding=padding, rngs=rngs,
        dtype=dtype, param_dtype=param_dtype,
        kernel_init=logical(nnx.initializers.lecun_normal(), (None, "conv_in", "conv_out")),
        bias_init=logical(nnx.initializers.zeros_init(), ("conv_out",)))

  def __call__(self, x):
    return self.conv(x)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """Sinusoidal embedding of flow time t in [0, 1]: [...] -> [..., dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (t[..., None].astype(jnp.float32) * 1000.0) * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class AdaLN(nnx.Module):
  """LayerNorm whose shift/scale/gate come from a conditioning vector (DiT's adaLN-Zero)."""

  def __init__(self, d: int, dcond: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
    self.norm = layer_norm(d, rngs=rngs, affine=False, dtype=dtype, param_dtype=param_dtype)
    self.mod = dense(dcond, 3 * d, (None, "embed"), rngs=rngs, zero_init=True, dtype=dtype,
                     param_dtype=param_dtype)

  def __call__(self, x, cond):
    """x: [B, T, D]; cond: [B, Dc] or [B, T, Dc] -> (normed x, gate)."""
    shift, scale, gate = jnp.split(self.mod(jax.nn.silu(cond)), 3, axis=-1)
    if shift.ndim == 2:
      shift, scale, gate = shift[:, None], scale[:, None], gate[:, None]
    return self.norm(x) * (1 + scale) + shift, gate
