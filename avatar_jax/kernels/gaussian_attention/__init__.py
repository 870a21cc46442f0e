"""Multi-head Gaussian time-distance attention.

    from avatar_jax.kernels.gaussian_attention import gaussian_attention
    out = gaussian_attention(q, k, v, t_q, t_k, sigma, causal=..., kv_segment_ids=...)

`gaussian_attention` (api.py) dispatches to the XLA reference or the Pallas GPU / TPU kernels;
`sharded_gaussian_attention` (sharded.py) runs it under a mesh, with the `context` axis split
over devices (ring or all-gather schedule). Importing this package imports no Pallas backend.
"""
from avatar_jax.kernels.gaussian_attention.api import IMPLEMENTATIONS, gaussian_attention
from avatar_jax.kernels.gaussian_attention.sharded import sharded_gaussian_attention

__all__ = ["IMPLEMENTATIONS", "gaussian_attention", "sharded_gaussian_attention"]
