"""Multi-head Gaussian time-distance attention: the one public entry point.

    out = softmax(q·kᵀ·scale − (t_q − t_k)² / (2 σ_h²) + mask) · v

Times are in seconds so that streams at different rates (video frames at 25 fps, audio
tokens at 50 Hz, latent frames covering 4 video frames) align without resampling.
"""
from __future__ import annotations

from avatar_jax.kernels.gaussian_attention import reference


def gaussian_attention(q, k, v, t_q, t_k, sigma, *, scale=None, causal=False,
                       causal_block=None, lookahead_blocks=0, window=None,
                       q_segment_ids=None, kv_segment_ids=None, bias_cutoff=None,
                       implementation="auto"):
  """Attention with a per-head Gaussian bias on time distance.

  Args:
    q: [B, Nq, H, D] queries.
    k, v: [B, Nk, Hkv, D] keys/values; H % Hkv == 0 (grouped heads).
    t_q: [B, Nq] query times (seconds). t_k: [B, Nk] key times (seconds).
    sigma: [H] per-head width in seconds (float32, learnable); `inf` = no bias.
    scale: logit scale, default D**-0.5.
    causal: key j visible to query i iff t_k[j] <= t_q[i].
    causal_block: block length in seconds; if set, causality is block-wise:
      visible iff floor(t_k/b) <= floor(t_q/b) + lookahead_blocks.
    window: if set, visible iff |t_q - t_k| <= window (strict frame-aligned attention).
    q_segment_ids: [B, Nq] int; kv_segment_ids: [B, Nk] int. Visible iff equal;
      a negative key id marks padding (never visible).
    bias_cutoff: if set, pairs whose Gaussian term is below -bias_cutoff may be skipped.
    implementation: "auto" | "xla" | "pallas_gpu" | "pallas_tpu".

  Returns:
    [B, Nq, H, D] in q.dtype. A query with no visible key returns zeros.
  """
  del implementation, bias_cutoff  # Only the reference exists so far.
  return reference.gaussian_attention(
      q, k, v, t_q, t_k, sigma, scale=scale, causal=causal, causal_block=causal_block,
      lookahead_blocks=lookahead_blocks, window=window, q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids)
