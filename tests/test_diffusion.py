"""Diffusion toolkit: per-token noise levels in the samplers, the cosine / x0-prediction path."""
import jax
import jax.numpy as jnp
import numpy as np

from avatar_jax.diffusion import cosine, flow, samplers


def _field(x, t):
  # A velocity that depends on x and on the (per-token) level, so the levels matter.
  return jnp.sin(x) * (1.0 + flow._expand(t, x)) - 0.3 * x


def test_per_token_levels_all_equal_match_the_scalar_sampler():
  x0 = jax.random.normal(jax.random.key(0), (3, 12, 4))
  for method in samplers.METHODS:
    scalar = samplers.sample_ode(_field, x0, steps=7, method=method)
    per_token = samplers.sample_ode(_field, x0, steps=7, method=method,
                                    levels=lambda s: jnp.full((12,), s, jnp.float32))
    np.testing.assert_array_equal(np.asarray(per_token), np.asarray(scalar))


def test_pyramid_levels_stagger_blocks_and_end_clean():
  lv = samplers.pyramid_levels(0.5, 12, 4, lag=0.5)
  assert lv[0] > lv[4] > lv[8] and np.all(np.diff(np.asarray(lv)[:4]) == 0)
  np.testing.assert_array_equal(samplers.pyramid_levels(1.0, 12, 4, 0.5), np.ones(12))
  np.testing.assert_array_equal(samplers.pyramid_levels(0.0, 12, 4, 0.5), np.zeros(12))
  # Later blocks lag, so a staggered solve differs from the synchronous one.
  x0 = jax.random.normal(jax.random.key(1), (2, 12, 4))
  stag = samplers.sample_ode(_field, x0, steps=8,
                             levels=lambda s: samplers.pyramid_levels(s, 12, 4, 0.5))
  assert not np.allclose(stag, samplers.sample_ode(_field, x0, steps=8))


def test_flow_interpolate_per_frame_levels():
  x1, x0 = jnp.ones((2, 3, 1)), jnp.zeros((2, 3, 1))
  t = jnp.asarray([[0.1, 0.5, 0.9], [0.2, 0.2, 0.2]])
  np.testing.assert_allclose(flow.interpolate(x1, x0, t)[..., 0], t)
  np.testing.assert_allclose(flow.interpolate(x1, x0, jnp.asarray([0.3, 0.3]))[..., 0], 0.3)


def test_cosine_schedule_endpoints_and_noising():
  assert float(cosine.alpha_bar(0.0)) == 1.0
  assert float(cosine.alpha_bar(cosine.T_MAX)) < 1e-5
  x0, eps = jnp.full((2, 5, 1), 2.0), jnp.ones((2, 5, 1))
  xt = cosine.q_sample(x0, eps, jnp.zeros((2, 5)))
  np.testing.assert_allclose(xt, x0)


def test_ddim_with_the_exact_denoiser_recovers_the_data_distribution():
  """Data N(μ, s²) in 1-D: E[x0 | x_t] is known in closed form; DDIM (the probability-flow
  ODE) with it must map N(0, 1) noise to samples with mean μ and std s."""
  mu, s = 1.5, 0.5

  def denoise(x, t):
    ab = cosine._expand(cosine.alpha_bar(t), x)
    a, var_n = jnp.sqrt(ab), 1.0 - ab
    return mu + a * s ** 2 * (x - a * mu) / (ab * s ** 2 + var_n)

  noise = jax.random.normal(jax.random.key(2), (20000, 1))
  out = cosine.ddim_sample(denoise, noise, steps=100)
  assert abs(float(out.mean()) - mu) < 0.02, float(out.mean())
  assert abs(float(out.std()) - s) < 0.02, float(out.std())
  # Per-token levels all equal: identical to the scalar schedule.
  out_tok = cosine.ddim_sample(denoise, noise[:, None, :], steps=100,
                               levels=lambda u: jnp.full((1,), cosine.T_MAX * (1.0 - u)))
  np.testing.assert_allclose(out_tok[:, 0], out, rtol=1e-6, atol=1e-6)
