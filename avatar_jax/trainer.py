"""The one training loop: mesh → data → state → step → checkpoints → samples → evals.

Every model family trains through this file; what differs lives in its system (model file,
see models/registry.py) and its config. Read top to bottom.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from avatar_jax import checkpointing, sharding, writers
from avatar_jax.data import pipeline
from avatar_jax.models import registry


class NonFiniteLossError(FloatingPointError):
  """The loss or gradients became NaN/Inf; training stopped, checkpoints left intact."""


# ============================================================================= optimiser
def make_optimizer(cfg: ml_collections.ConfigDict, num_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup + cosine decay and global-norm clipping; no decay on 1-D params."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
      decay_steps=max(num_steps, cfg.warmup_steps + 1), end_value=cfg.lr * cfg.end_lr_factor)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask),
  ), schedule


# ============================================================================= state
def build_abstract(system, config, stats):
  """Model structure without allocating: (graphdef, abstract params, abstract rest)."""
  model = nnx.eval_shape(lambda: system.build(rngs=nnx.Rngs(config.seed), stats=stats))
  return nnx.split(model, nnx.Param, ...)


def state_shardings(abstract_state, mesh):
  """Shardings from the logical axes each variable was created with (sharding.RULES)."""
  specs = nnx.get_partition_spec(abstract_state)
  return sharding.tree_shardings(specs, mesh)


def new_state(params, rest, tx):
  """The train state pytree: {step, params, rest (non-trained variables), opt, ema}."""
  return {"step": jnp.zeros((), jnp.int32), "params": params, "rest": rest, "opt": tx.init(params),
          "ema": jax.tree.map(jnp.copy, params)}


def create_state(system, config, mesh, stats, tx):
  """Initial train state, created directly sharded (never materialised on one device)."""
  graphdef, params, rest = build_abstract(system, config, stats)

  def init():
    model = system.build(rngs=nnx.Rngs(config.seed), stats=stats)
    _, p, r = nnx.split(model, nnx.Param, ...)
    return new_state(p, r, tx)

  abstract = jax.eval_shape(init)
  shardings = {
      "step": sharding.replicated(mesh),
      "params": state_shardings(params, mesh),
      "rest": state_shardings(rest, mesh),
      "ema": state_shardings(params, mesh),
  }
  # Optimiser moments mirror the params they belong to; scalars (counts) are replicated.
  shardings["opt"] = _opt_shardings(abstract["opt"], shardings["params"], mesh)
  state = jax.jit(init, out_shardings=shardings)()
  return graphdef, state, shardings


def _opt_shardings(opt_abstract, param_shardings, mesh):
  """Optimiser moments (mu, nu, ...) mirror the params they belong to; counts are replicated."""
  by_path = {tuple(k): s for k, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}

  def pick(path, _):
    # A moment's path ends with its parameter's path (e.g. (0, 'mu', 'blocks', 0, ...)).
    for n in range(len(path)):
      if tuple(path[n:]) in by_path:
        return by_path[tuple(path[n:])]
    return sharding.replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, opt_abstract)


# ============================================================================= step
def make_train_step(system, graphdef, tx, schedule, ema_decay: float, base_rng):
  """Pure (state, batch) -> (state, metrics). Skips the update if loss/grads are not finite."""

  def train_step(state, batch):
    rng = jax.random.fold_in(base_rng, state["step"])

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state["rest"])
      return system.loss(model, batch, rng)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    params, opt = keep(params, state["params"]), keep(opt, state["opt"])
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state["ema"], params)
    metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
               "nonfinite": 1.0 - finite.astype(jnp.float32)}
    return {"step": state["step"] + 1, "params": params, "rest": state["rest"], "opt": opt,
            "ema": ema}, metrics

  return train_step


def model_from_state(graphdef, state, *, ema: bool = True):
  return nnx.merge(graphdef, state["ema"] if ema else state["params"], state["rest"])


# ============================================================================= main loop
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config.model` on `config.data` in `workdir`, resuming from its last checkpoint."""
  # ------------------------------------------------------------------ setup
  workdir = os.path.abspath(workdir)
  mesh = sharding.make_mesh(dict(config.mesh))  # Validated before anything is written.
  os.makedirs(workdir, exist_ok=True)
  logging.info("Mesh %s on %d devices (%s).", dict(mesh.shape), mesh.size, jax.default_backend())
  writer = writers.create(os.path.join(workdir, "tb"), just_logging=jax.process_index() > 0,
                          video_fps=config.data.synthdyad.fps)
  num_steps = int(config.train.num_steps)
  base_rng = jax.random.key(config.seed)

  # ------------------------------------------------------------------ data
  train_iter = pipeline.make(config.data, "train", seed=config.seed)

  # ------------------------------------------------------------------ model + state
  system = registry.get(config.model.name)(config.model)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    max_to_keep=config.train.max_checkpoints)
  resume_step = ckpt.latest_step()
  stats = None
  if resume_step is None and hasattr(system, "fit_stats"):
    # A separate iterator, so fitting statistics never consumes training batches.
    stats_iter = pipeline.make(config.data, "train", seed=config.seed + 1)
    stats = system.fit_stats([next(stats_iter) for _ in range(config.train.stats_batches)])
  tx, schedule = make_optimizer(config.optim, num_steps)
  graphdef, state, shardings = create_state(system, config, mesh, stats, tx)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  logging.info("%s: %.2fM parameters.", config.model.name, n_params / 1e6)
  if resume_step is not None:
    abstract = checkpointing.abstract_like(state, shardings)
    state = ckpt.restore(abstract, train_iter)
    logging.info("Resumed from %s at step %d.", ckpt.directory, resume_step)
  first_step = int(state["step"])

  # ------------------------------------------------------------------ step function
  batch_sharding = lambda b: jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim), b)
  step_fn = make_train_step(system, graphdef, tx, schedule, config.optim.ema_decay, base_rng)
  train_step = jax.jit(step_fn, donate_argnums=0,
                       out_shardings=(shardings, sharding.replicated(mesh)))

  # ------------------------------------------------------------------ loop
  progress = writers.progress(num_steps, writer, first_step=first_step,
                              bar=config.train.progress_bar and jax.process_index() == 0)
  pending, last_good = [], resume_step
  sampler = _Sampler(system, config, workdir, writer)

  def check_finite():
    for s, m in pending:
      if float(m["nonfinite"]) > 0:
        ckpt.wait()
        kept = (f"the last good checkpoint (step {last_good}) in {ckpt.directory} is intact"
                if last_good is not None else "no checkpoint had been written yet")
        raise NonFiniteLossError(
            f"loss/gradients became NaN or Inf at step {s} (loss={float(m['loss'])}); training "
            f"stopped; {kept}. Lower optim.lr or check the data of that step.")

  t_start = time.monotonic()
  for step in range(first_step + 1, num_steps + 1):
    batch = pipeline.to_global(next(train_iter), mesh)
    state, metrics = train_step(state, batch)
    pending.append((step, metrics))
    progress(step)
    if step % config.train.log_every == 0 or step == num_steps:
      check_finite()
      summary = {k: float(np.mean([float(m[k]) for _, m in pending])) for k in pending[0][1]}
      summary.pop("nonfinite")
      writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
      pending = []
    if step % config.train.ckpt_every == 0 or step == num_steps:
      check_finite()
      ckpt.save(step, state, train_iter, config)
      last_good = step
    if config.train.sample_every and (step % config.train.sample_every == 0 or step == num_steps):
      sampler(step, model_from_state(graphdef, state))
  progress.close()
  ckpt.wait()
  logging.info("Training done in %.1f s.", time.monotonic() - t_start)

  # ------------------------------------------------------------------ final evaluation
  results = {}
  if config.eval.at_end and hasattr(system, "evaluate"):
    results = system.evaluate(model_from_state(graphdef, state), config, workdir, writer=writer,
                              step=num_steps)
  writer.flush()
  ckpt.close()
  return results


class _Sampler:
  """Periodic sample video (mp4 + TensorBoard) for systems that can render one."""

  def __init__(self, system, config, workdir, writer):
    self.system, self.config, self.workdir, self.writer = system, config, workdir, writer

  def __call__(self, step, model):
    if not hasattr(self.system, "sample_video") or jax.process_index() > 0:
      return
    path = os.path.join(self.workdir, "samples", f"step_{step:07d}.mp4")
    frames = self.system.sample_video(model, self.config, path, rng=jax.random.key(step))
    self.writer.write_videos(step, {"sample": frames})
    logging.info("Wrote sample video %s", path)


def restore_model(workdir: str, *, ema: bool = True, mesh_shape=None):
  """(system, model, config, step) from the last checkpoint of a training workdir.

  The config is the one saved with the checkpoint; the model is laid out on `mesh_shape`
  (default: all local devices on `data`, i.e. parameters replicated).
  """
  ckpt = checkpointing.Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"))
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints: train first "
                            f"(python -m avatar_jax.train --config ... --workdir {workdir})")
  config = ckpt.restore_config(step)
  mesh = sharding.make_mesh(dict(mesh_shape or {"data": -1}))
  system = registry.get(config.model.name)(config.model)
  tx, _ = make_optimizer(config.optim, int(config.train.num_steps))
  graphdef, params, rest = build_abstract(system, config, None)
  abstract = jax.eval_shape(lambda p, r: new_state(p, r, tx), params, rest)
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  state = ckpt.restore(checkpointing.abstract_like(abstract, shardings), step=step)
  ckpt.close()
  return system, model_from_state(graphdef, state, ema=ema), config, step
