"""The one training loop: mesh → setup (system, state, step) → data → loop → checkpoints → evals.

Every model family trains through this file; what differs lives in its system (a model file
exporting `System`, see avatar_jax/system.py) and its config. Read top to bottom.

The train state is one pytree:
  step    int32 []
  params  trainable nnx.Params (`system.trainable`)       optimiser + EMA
  frozen  every other nnx.Param of the model              loaded or initialised, never updated
  rest    the model's non-Param variables (statistics)
  aux     {name: state of system.aux_models()}            never updated (reference policy, VAE)
  opt     optimiser state over `params` only
  ema     EMA of `params` only
Frozen and auxiliary parameters are saved with the run, so resuming and `restore_model` need no
other workdir; they enter a run through `config.init_from` (see load_init_from).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from avatar_jax import (checkpointing, compile_cache, distributed, sharding, system as system_lib,
                        writers)
from avatar_jax.data import pipeline
from avatar_jax.evals import runner as evals_runner
from avatar_jax.models import registry


class NonFiniteLossError(FloatingPointError):
  """The loss or gradients became NaN/Inf; training stopped, checkpoints left intact."""


class ConfigMismatchError(ValueError):
  """The workdir's checkpoints were written by a config that differs in keys that matter."""


def check_resumable(ckpt: checkpointing.Checkpointer, config: ml_collections.ConfigDict,
                    allow_config_change=()) -> None:
  """Refuses to resume a workdir whose checkpoints were made by another config.

  Keys in checkpointing.CONFIG_FREE_KEYS (mesh, logging and checkpoint cadence, evals, data
  workers) may always change; others only when named in `allow_config_change` (dotted keys or
  prefixes, e.g. ("train.num_steps", "optim")), so extending or retuning a run is deliberate.
  """
  saved = ckpt.saved_config()
  if saved is None:
    return
  flat = checkpointing.flatten_config(config)
  for key in allow_config_change:
    if not any(k == key or k.startswith(key + ".") for k in flat):
      raise KeyError(f"allow_config_change: {key!r} is not a key of the config; it has "
                     f"{sorted(flat)[:12]} ...")
  diff = checkpointing.config_differences(saved, config, allow_config_change)
  if diff:
    lines = "\n".join(f"  {k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in diff.items())
    raise ConfigMismatchError(
        f"{ckpt.directory} was written by another config; differing keys:\n{lines}\nUse a new "
        f"--workdir, or resume with these changes deliberately: "
        f"--allow_config_change={','.join(diff)}")


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


# ============================================================================= mesh
def use_mesh(mesh: jax.sharding.Mesh):
  """Context that makes `mesh` the ambient mesh (jax.set_mesh; use_mesh on older jax)."""
  set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
  return set_mesh(mesh)


# ============================================================================= state
def split_model(system: system_lib.System, model: nnx.Module):
  """(graphdef, trainable params, frozen params, rest) of a model."""
  return nnx.split(model, nnx.All(nnx.Param, system.trainable), nnx.Param, ...)


def state_shardings(abstract_state, mesh):
  """Shardings from the logical axes each variable was created with (sharding.RULES)."""
  specs = nnx.get_partition_spec(abstract_state)
  return sharding.tree_shardings(specs, mesh)


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


def make_train_step(system: system_lib.System, graphdef, aux_graphdefs: Mapping[str, Any],
                    tx: optax.GradientTransformation, schedule, ema_decay: float, base_rng):
  """Pure (state, batch) -> (state, metrics). Skips the update if loss/grads are not finite."""

  def train_step(state, batch):
    rng = jax.random.fold_in(base_rng, state["step"])
    aux = {n: nnx.merge(aux_graphdefs[n], s) for n, s in state["aux"].items()}
    # On-policy batch preparation sees the current weights but is not differentiated.
    current = nnx.merge(graphdef, state["params"], state["frozen"], state["rest"])
    batch = jax.lax.stop_gradient(
        system.prepare_batch(current, aux, batch, jax.random.fold_in(rng, 1)))

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state["frozen"], state["rest"])
      return system.loss(model, batch, rng, aux=aux)

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
    return {**state, "step": state["step"] + 1, "params": params, "opt": opt, "ema": ema}, metrics

  return train_step


def model_from_state(graphdef, state, *, ema: bool = True) -> nnx.Module:
  """The model of a train state: EMA (or raw) trainable params + frozen params + rest."""
  return nnx.merge(graphdef, state["ema"] if ema else state["params"], state["frozen"],
                   state["rest"])


# ============================================================================= setup
@dataclasses.dataclass
class Setup:
  """Everything built from (config, mesh) before the first step.

  state: the train state (see module docstring), sharded on `mesh`; jax.ShapeDtypeStructs
    carrying those shardings when built with `abstract=True`.
  train_step: jitted (state, global batch) -> (state, metrics); donates the state.
  """
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  system: system_lib.System
  graphdef: Any
  aux_graphdefs: dict[str, Any]
  state: dict[str, Any]
  shardings: dict[str, Any]
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  train_step: Callable
  stats: Any = None

  def batch(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host-local batch -> global arrays, batch dim split over the mesh's batch axes."""
    return pipeline.to_global(host_batch, self.mesh)

  def model(self, state=None, *, ema: bool = True) -> nnx.Module:
    return model_from_state(self.graphdef, self.state if state is None else state, ema=ema)

  def aux(self, state=None) -> dict[str, nnx.Module]:
    state = self.state if state is None else state
    return {n: nnx.merge(self.aux_graphdefs[n], s) for n, s in state["aux"].items()}

  @property
  def num_params(self) -> dict[str, int]:
    """Sizes of the trainable, frozen and auxiliary parameters."""
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    aux = {n: nnx.filter_state(s, nnx.Param) for n, s in self.state["aux"].items()}
    return {"trainable": count(self.state["params"]), "frozen": count(self.state["frozen"]),
            "aux": count(aux)}


def fit_stats(system: system_lib.System, config) -> Any:
  """`system.fit_stats` on `config.train.stats_batches` batches of a separate train iterator."""
  # Its own seed, so fitting statistics never consumes (or shifts) training batches; no clip
  # cache, so reading a few batches does not prepare the whole split (the training iterator
  # fills its own cache right after).
  data = copy.deepcopy(config.data)
  data.cache, data.synthdyad.cache = False, False
  # Every process reads the same (unsharded) batches: statistics are baked into the state, and
  # processes fitting them on their own shards would build different "replicated" parameters.
  it = pipeline.make(data, "train", keys=system.data_spec().keys, seed=config.seed + 1,
                     shard_index=0, shard_count=1)
  return system.fit_stats([next(it) for _ in range(config.train.stats_batches)])


def setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *, stats: Any = None,
          fit: bool = True, init_from: bool = True, abstract: bool = False,
          compiler_options: dict | None = None) -> Setup:
  """The system, its sharded train state and the jitted step of `config` on `mesh`.

  Args:
    stats: data statistics for `system.build`; None: fitted from the data when `fit`.
    fit: call `system.fit_stats` (skip when a checkpoint will overwrite the state anyway).
    init_from: load `config.init_from` weights into the fresh state.
    abstract: build shapes + shardings only (to restore a checkpoint into), allocate nothing.
    compiler_options: XLA options for the train step.
  """
  system = registry.get(config.model.name)(config)
  if stats is None and fit:
    stats = fit_stats(system, config)
  tx, schedule = make_optimizer(config.optim, int(config.train.num_steps))

  def init():
    model = system.build(rngs=nnx.Rngs(config.seed), stats=stats)
    _, params, frozen, rest = split_model(system, model)
    aux = {n: nnx.state(m) for n, m in system.aux_models(rngs=nnx.Rngs(config.seed + 1)).items()}
    return {"step": jnp.zeros((), jnp.int32), "params": params, "frozen": frozen, "rest": rest,
            "aux": aux, "opt": tx.init(params), "ema": jax.tree.map(jnp.copy, params)}

  # Structure without allocating: graphdefs and the logical axes of every variable.
  graphdef = split_model(system, nnx.eval_shape(
      lambda: system.build(rngs=nnx.Rngs(config.seed), stats=stats)))[0]
  aux_graphdefs = {n: nnx.graphdef(m) for n, m in nnx.eval_shape(
      lambda: system.aux_models(rngs=nnx.Rngs(config.seed + 1))).items()}
  shapes = jax.eval_shape(init)
  shardings = {k: state_shardings(shapes[k], mesh) for k in ("params", "frozen", "rest", "ema")}
  shardings["step"] = sharding.replicated(mesh)
  shardings["aux"] = {n: state_shardings(s, mesh) for n, s in shapes["aux"].items()}
  shardings["opt"] = _opt_shardings(shapes["opt"], shardings["params"], mesh)

  if abstract:
    state = checkpointing.abstract_like(shapes, shardings)
  else:
    # Created directly sharded, never materialised on one device.
    state = jax.jit(init, out_shardings=shardings)()
    if init_from:
      state = load_init_from(state, shardings, config.init_from)

  step_fn = make_train_step(system, graphdef, aux_graphdefs, tx, schedule, config.optim.ema_decay,
                            jax.random.key(config.seed))
  train_step = jax.jit(step_fn, donate_argnums=0, compiler_options=compiler_options,
                       out_shardings=(shardings, sharding.replicated(mesh)))
  return Setup(config=config, mesh=mesh, system=system, graphdef=graphdef,
               aux_graphdefs=aux_graphdefs, state=state, shardings=shardings, tx=tx,
               schedule=schedule, train_step=train_step, stats=stats)


# ============================================================================= init_from
def _path_str(path) -> str:
  """'blocks/0/attn/q/kernel' from a pytree key path (Variable '.value' hops dropped)."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    else:
      parts.append(str(k))
  if parts and parts[-1] == "value":
    parts.pop()
  return "/".join(parts)


def init_from_entries(init_from: ml_collections.ConfigDict | None) -> list[tuple[str, Any]]:
  """(config key, entry) of each `config.init_from` source with a workdir.

  `config.init_from` is one entry (it has a `workdir` field) or several named entries
  (`config.init_from.policy`, `config.init_from.reference`, ...), each with fields
    workdir   the run to load from (its latest or `step`'s checkpoint); empty: no loading
    step      None: latest
    include   regexes (re.search) over the source's variable paths, e.g. "blocks/0/.*"; empty: all
    exclude   regexes removed from the included paths
    into      where the paths land: "model" (default), "model/<submodule>", "aux/<name>"
  The source's weights are its EMA parameters, its frozen parameters and its non-Param variables.
  """
  if not init_from:
    return []
  if "workdir" in init_from:
    entries = [("init_from", init_from)]
  else:
    entries = [(f"init_from.{n}", e) for n, e in init_from.items()]
  return [(k, e) for k, e in entries if e.get("workdir")]


def load_init_from(state, shardings, init_from) -> dict:
  """`state` with the weights of every `config.init_from` entry, resharded onto its shardings."""
  for key, entry in init_from_entries(init_from):
    state = _load_entry(state, shardings, key, entry)
  return state


def _load_entry(state, shardings, key: str, entry) -> dict:
  ckpt = checkpointing.Checkpointer(os.path.join(os.path.abspath(entry.workdir), "checkpoints"))
  step = entry.get("step")
  step = ckpt.latest_step() if step is None else int(step)
  if step is None:
    raise FileNotFoundError(f"config.{key}.workdir={entry.workdir!r} has no checkpoint under "
                            f"{ckpt.directory}")
  # Source variables by relative path; trained weights are read from the EMA.
  source = {}
  for path, m in jax.tree_util.tree_flatten_with_path(ckpt.state_metadata(step))[0]:
    if _key(path[0]) in ("rest", "frozen", "ema"):
      source[_path_str(path[1:])] = (path, m)
  # Every loadable target leaf by full path ("model/<path>", "aux/<name>/<path>"): a trained one
  # twice, since its EMA starts at the loaded weights too.
  targets = {}
  for (part, path), x in _leaves(state).items():
    prefix = "aux" if part == "aux" else "model"
    targets.setdefault(f"{prefix}/{_path_str(path)}", []).append((part, path, x))

  include, exclude = tuple(entry.get("include") or ()), tuple(entry.get("exclude") or ())
  for pattern in include + exclude:
    if not any(re.search(pattern, p) for p in source):
      raise ValueError(f"config.{key}: pattern {pattern!r} matches no variable of the checkpoint "
                       f"{ckpt.directory}/{step}; its paths include {sorted(source)[:8]}")
  chosen = [p for p in sorted(source) if (not include or any(re.search(r, p) for r in include))
            and not any(re.search(r, p) for r in exclude)]
  into = str(entry.get("into") or "model").strip("/")
  if not chosen:
    raise ValueError(f"config.{key}: include={include} exclude={exclude} leave nothing to load "
                     f"from {ckpt.directory}/{step}")

  _check_targets(key, entry, into, chosen, source, targets, f"{ckpt.directory}/{step}")

  # Partial restore of exactly the chosen arrays, each laid out as its target on this mesh.
  flat_shardings = _leaves(shardings)
  request, placed = {}, {}
  for p in chosen:
    src_path, _ = source[p]
    first = targets[f"{into}/{p}"][0]
    sds = jax.ShapeDtypeStruct(first[2].shape, first[2].dtype,
                               sharding=flat_shardings[(first[0], first[1])])
    _set_nested(request, src_path, sds)
    placed[p] = (src_path, targets[f"{into}/{p}"])
  loaded = ckpt.restore_partial(request, step)
  ckpt.close()

  values = {}
  for p, (src_path, dests) in placed.items():
    value = _get_nested(loaded, src_path)
    for i, (part, path, _) in enumerate(dests):
      # params and ema get their own buffers: the train step donates both.
      values[(part, path)] = value if i == 0 else _copy(value)
  out = dict(state)
  for part in ("params", "frozen", "rest", "ema", "aux"):
    out[part] = jax.tree_util.tree_map_with_path(
        lambda path, x, part=part: values.get((part, path), x), state[part])
  n = sum(int(np.prod(source[p][1].shape)) for p in chosen)
  logging.info("config.%s: loaded %d arrays (%.3fM values) from %s step %d into %s: %s",
               key, len(chosen), n / 1e6, entry.workdir, step, into, _summary(chosen))
  return out


def _check_targets(key: str, entry, into: str, chosen, source, targets, where: str) -> None:
  """Raises ValueError naming every chosen checkpoint variable with no counterpart under `into`
  (grouped by the module the model lacks, with the `exclude` that leaves them out), or else
  every shape mismatch."""
  missing = [p for p in chosen if f"{into}/{p}" not in targets]
  if missing:
    # Each missing variable's first path part the model lacks, block indices generalised:
    # "blocks/0/attn2/to_q/kernel" -> "^blocks/[0-9]+/attn2/" when blocks/0 exists but no attn2.
    prefixes = {"/".join(t.split("/")[:i]) for t in targets for i in range(1, t.count("/") + 2)}
    groups = {}
    for p in missing:
      parts = p.split("/")
      i = next(i for i in range(len(parts)) if "/".join([into] + parts[:i + 1]) not in prefixes)
      head = "/".join("[0-9]+" if q.isdigit() else q for q in parts[:i + 1])
      groups.setdefault("^" + head + ("/" if i + 1 < len(parts) else "$"), []).append(p)
    exclude = tuple(entry.get("exclude") or ()) + tuple(groups)
    flag = "(" + ", ".join(map(json.dumps, exclude)) + ("," if len(exclude) == 1 else "") + ")"
    under = sorted(t for t in targets if t.startswith(into + "/")) or sorted(targets)
    raise ValueError(
        f"config.{key}: no counterpart {_summary([repr(f'{into}/{p}') for p in missing], 6)} in "
        f"this model for {len(missing)} of the {len(chosen)} variables chosen from {where} "
        f"(into={into!r}). The model lacks "
        f"{', '.join(f'{g} ({len(v)} variables)' for g, v in groups.items())}. Leave them out "
        f"with --config.{key}.exclude='{flag}' (or narrow `include`), or fix `into`. Model "
        f"paths there include {under[:8]}")
  bad = [f"{p!r} has shape {tuple(source[p][1].shape)} in the checkpoint but "
         f"{tuple(targets[f'{into}/{p}'][0][2].shape)} at '{into}/{p}'" for p in chosen
         if tuple(source[p][1].shape) != tuple(targets[f"{into}/{p}"][0][2].shape)]
  if bad:
    raise ValueError(f"config.{key}: {len(bad)} variables of {where} have another shape in this "
                     f"model (another architecture config?): {_summary(bad, 8)}")


_copy = jax.jit(jnp.copy)


def _leaves(state) -> dict:
  """{(part, key path): leaf} over the model and aux parts of a train state (or its shardings)."""
  return {(part, path): x for part in ("params", "ema", "frozen", "rest", "aux")
          for path, x in jax.tree_util.tree_flatten_with_path(state[part])[0]}


def _summary(paths: list[str], limit: int = 12) -> str:
  return ", ".join(paths[:limit]) + (f", ... ({len(paths) - limit} more)" if len(paths) > limit else "")


def _key(k):
  if isinstance(k, jax.tree_util.DictKey):
    return k.key
  if isinstance(k, jax.tree_util.SequenceKey):
    return k.idx
  return k.name


def _set_nested(tree: dict, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(_key(k), {})
  tree[_key(path[-1])] = value


def _get_nested(tree, path):
  for k in path:
    tree = tree[_key(k)]
  return tree


# ============================================================================= main loop
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change=()) -> dict:
  """Trains `config.model` on `config.data` in `workdir`, resuming from its last checkpoint.

  Resuming needs the config the checkpoints were written with, except for the keys named in
  `allow_config_change` (see check_resumable); a damaged latest checkpoint falls back to the
  previous one (Checkpointer.restore_latest).
  """
  # ------------------------------------------------------------------ mesh + setup
  workdir = os.path.abspath(workdir)
  compile_cache.apply(config)   # before the first compile (config.compile_cache)
  mesh = sharding.make_mesh(dict(config.mesh))  # Validated before anything is written.
  distributed.check_same_config(config)
  os.makedirs(workdir, exist_ok=True)
  logging.info("Mesh %s on %d devices (%s).", dict(mesh.shape), mesh.size, jax.default_backend())
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    max_to_keep=config.train.max_checkpoints)
  resume_step = ckpt.latest_step()
  if resume_step is not None:   # before anything is written into another run's workdir
    check_resumable(ckpt, config, allow_config_change)
  facts = pipeline.facts(config.data)
  writer = writers.create(os.path.join(workdir, "tb"), just_logging=jax.process_index() > 0,
                          video_fps=facts["fps"])
  num_steps = int(config.train.num_steps)
  # A resumed run restores everything, so it neither fits statistics nor loads init_from.
  # (Built outside the mesh context: NNX would read logical axis names as mesh axes there.)
  fresh = resume_step is None
  s = setup(config, mesh, fit=fresh, init_from=fresh, abstract=not fresh)
  logging.info("%s: %s parameters (M).", config.model.name,
               {k: round(v / 1e6, 3) for k, v in s.num_params.items()})
  with use_mesh(mesh):
    # ---------------------------------------------------------------- data
    # Batches become global device arrays in a background thread, two steps ahead, so the
    # host's slicing and the transfer overlap the step; its state is the next batch's position.
    train_iter = pipeline.prefetch_to_device(
        pipeline.make(config.data, "train", keys=s.system.data_spec().keys, seed=config.seed),
        mesh, size=2)
    state = s.state
    if not fresh:
      resume_step, state = ckpt.restore_latest(state, train_iter)
      logging.info("Resumed from %s at step %d.", ckpt.directory, resume_step)
    first_step = int(state["step"])

    # ---------------------------------------------------------------- loop
    progress = writers.progress(num_steps, writer, first_step=first_step,
                                bar=config.train.progress_bar and jax.process_index() == 0)
    pending, last_good, results = [], resume_step, {}

    def check_finite():
      for step, m, ids in pending:
        if float(m["nonfinite"]) > 0:
          ckpt.wait()
          kept = (f"the last good checkpoint (step {last_good}) in {ckpt.directory} is intact"
                  if last_good is not None else "no checkpoint had been written yet")
          raise NonFiniteLossError(
              f"loss/gradients became NaN or Inf at step {step} (loss={float(m['loss'])}); "
              f"training stopped; {kept}. Its batch held {_describe_ids(ids)} of "
              f"config.data.source={config.data.source!r}, split 'train'. Lower optim.lr or "
              f"check the data of that step.")

    t_start, stop = time.monotonic(), False
    with distributed.Preemption() as preemption:
      for step in range(first_step + 1, num_steps + 1):
        batch = next(train_iter)
        state, metrics = s.train_step(state, batch)
        # Which examples each step saw, to name them if its loss turns out non-finite.
        pending.append((step, metrics, {k: batch[k] for k in _ID_KEYS if k in batch}))
        progress(step)
        # SIGTERM (a scheduler's eviction notice, `timeout`): checkpoint this step and stop.
        stop = preemption.reached(step)
        if step % config.train.log_every == 0 or step == num_steps or stop:
          check_finite()
          summary = {k: float(np.mean([float(m[k]) for _, m, _ in pending]))
                     for k in pending[0][1]}
          summary.pop("nonfinite")
          writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
          pending = []
        if step % config.train.ckpt_every == 0 or step == num_steps or stop:
          check_finite()
          ckpt.save(step, state, train_iter, config)
          last_good = step
        if stop:
          logging.warning("Stopped by SIGTERM at step %d of %d: checkpoint saved in %s; rerun "
                          "the same command to resume.", step, num_steps, ckpt.directory)
          break
        # Evaluators of config.evals due at this step (evals/runner.py); the EMA model is
        # built only when one is.
        results.update(evals_runner.run(s.system, lambda st=state: s.model(st), config,
                                        workdir, step=step, writer=writer,
                                        final=step == num_steps))
    progress.close()
    ckpt.wait()
    logging.info("Training %s in %.1f s.", "stopped" if stop else "done",
                 time.monotonic() - t_start)
    compile_cache.log_summary()
  train_iter.close()
  writer.flush()
  ckpt.close()
  return results


_ID_KEYS = ("example_index", "clip_start")


def _describe_ids(ids: Mapping[str, jax.Array]) -> str:
  """'examples [3, 7] (window start frames [0, 25])' of a global batch's bookkeeping keys."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  host = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)).tolist()
          for k, v in ids.items()}
  if "example_index" not in host:
    return "examples of unknown index (the batch has no example_index)"
  starts = f" (window start frames {host['clip_start']})" if "clip_start" in host else ""
  return f"examples {host['example_index']}{starts}"


# ============================================================================= restore
def restore_model(workdir: str, *, ema: bool = True, mesh_shape: Mapping[str, int] | None = None,
                  step: int | None = None):
  """(system, model, config, step) from a checkpoint of a training workdir (default: the last).

  Restores only the model's weights (EMA or raw trainable params, frozen params, non-Param
  variables) — never the optimiser state — laid out by the rules table on a mesh of `mesh_shape`
  (default: all local devices on `data`, i.e. replicated; pass e.g. {"fsdp": -1} to shard a
  large model's parameters instead).
  """
  ckpt = checkpointing.Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"))
  steps = sorted(ckpt.manager.all_steps(), reverse=True) if step is None else [step]
  if not steps:
    raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints: train first "
                            f"(python -m avatar_jax.train --config ... --workdir {workdir})")
  mesh = sharding.make_mesh(dict(mesh_shape or {"data": -1}))
  weights = "ema" if ema else "params"
  for i, step in enumerate(steps):
    # The latest checkpoint unless it does not read back; the workdir is left as it is.
    try:
      config = ckpt.restore_config(step)
      compile_cache.apply(config)   # the run's config.compile_cache, before the first compile
      s = setup(config, mesh, fit=False, init_from=False, abstract=True)
      want = {k: s.state[k] for k in (weights, "frozen", "rest") if jax.tree.leaves(s.state[k])}
      saved = ckpt.state_metadata(step)
      if missing := [k for k in want if k not in saved]:
        # Orbax's partial restore would leave them abstract without a word.
        raise ValueError(f"{ckpt.directory}/{step} holds {sorted(saved)}, not {missing}"
                         + (" (exported weights carry the EMA only: ema=True)"
                            if weights == "params" else ""))
      got = ckpt.restore_partial(want, step)
      break
    except Exception as e:  # pylint: disable=broad-except
      if i == len(steps) - 1:
        raise
      logging.warning("Checkpoint %s/%d does not read back (%s: %s); trying step %d.",
                      ckpt.directory, step, type(e).__name__,
                      checkpointing.error_summary(e), steps[i + 1])
  ckpt.close()
  state = {**s.state, **got}   # what was not restored stays abstract and is not used
  return s.system, model_from_state(s.graphdef, state, ema=ema), config, step
