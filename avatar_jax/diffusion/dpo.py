"""Direct preference optimisation for flow / diffusion models (Diffusion-DPO, Wallace et al. 2023,
as Avatar Forcing uses it).

For a preferred sample x_w and a rejected x_l of the same conditions, both noised with the SAME
noise and level t, the policy's and the frozen reference's flow errors

    e_θ(x) = ‖v_θ(x_t, t) − (x − ε)‖²,   e_ref(x) likewise with the reference model

give the objective

    L = −log σ(−β · [(e_θ(x_w) − e_ref(x_w)) − (e_θ(x_l) − e_ref(x_l))])

i.e. lower the error on the winner and raise it on the loser, both relative to the reference.
β sets how far the policy may move from the reference (large β: stay close).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def loss(err_w, err_w_ref, err_l, err_l_ref, beta: float):
  """Per-example errors [B] (mean squared velocity error of each sample) -> (loss, metrics).

  metrics: the implicit reward margin (its mean should grow) and how often the policy already
  prefers the winner (accuracy)."""
  margin = (err_w - err_w_ref) - (err_l - err_l_ref)
  inside = -beta * margin
  loss = -jnp.mean(jax.nn.log_sigmoid(inside))
  return loss, {"dpo_loss": loss, "dpo_margin": -jnp.mean(margin),
                "dpo_accuracy": jnp.mean((inside > 0).astype(jnp.float32)),
                "dpo_err_winner": jnp.mean(err_w), "dpo_err_loser": jnp.mean(err_l)}


def per_example(v_pred, v_target):
  """Mean squared error per example: [B, ...] -> [B] float32."""
  err = jnp.square(v_pred.astype(jnp.float32) - v_target.astype(jnp.float32))
  return jnp.mean(err.reshape(err.shape[0], -1), axis=1)
