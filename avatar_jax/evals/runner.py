"""Evaluators declared in the config, run from the training loop and from `avatar_jax.evaluate`.

A run declares its evaluators as `config.evals.<name> = dict(type=..., ...)`:

  c.evals = dict(
      test=runner.evaluator("synthdyad", split="test", num_clips=32),     # metrics table
      sample=runner.evaluator("video", split="test", every=400),          # sample mp4
  )

Common fields (each type adds its own; `defaults(type)` lists them all):
  type        a registered evaluator type (`register`): "synthdyad", "flame56", "video", ...
  split       data split, or several comma-separated ("test,ood"): one result per split
  every       run every `every` training steps (0: never periodically)
  at_end      run after the last training step
  num_clips   eval windows taken from the deterministic (unshuffled) pipeline
  batch_size  windows per generation batch
  windows     "full" (whole clips) or "tile" (consecutive `clip_frames` windows)
  clip_frames window length with windows="tile" (default: config.data.clip_frames)
  seed        sampling seed (None: config.seed + 1)
  options     keyword options of `system.generate` (e.g. {"history_turns": 0} for TIMAR)
Evaluators run in name order (ConfigDict keeps keys sorted). `evaluator(type, **fields)` builds such an entry with every field present, so that each can be
overridden from the command line. A config without `evals` runs `system.evaluators()` with their defaults at the end of training.

The trainer calls `run(system, model, config, workdir, step=step, writer=writer,
final=step == num_steps)` after every step; it runs the evaluators due at that step (`every`
divides it, or `final` and `at_end`) and returns {name: result} ({} when none was due). The
evaluate entry point calls `run(..., only=names, force=True)`.

An evaluator is a function `fn(ctx: Context, cfg) -> result` registered under its type with
`@register("type", **defaults)`; it gets its batches from `batches(ctx, cfg, keys, split)` (the
one data pipeline, `pipeline.make(..., shuffle=False)`) and generates with `generate(...)`.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from avatar_jax import system as system_lib
from avatar_jax.data import pipeline

COMMON = dict(split="test", every=0, at_end=True, num_clips=32, batch_size=16, windows="full",
              clip_frames=None, seed=None, options={})


@dataclasses.dataclass
class Context:
  """What every evaluator sees: the run and where it stands."""
  system: system_lib.System
  model: nnx.Module
  config: ml_collections.ConfigDict
  workdir: str
  step: int | None = None
  writer: Any = None
  name: str = ""


@dataclasses.dataclass(frozen=True)
class _Entry:
  fn: Callable[[Context, ml_collections.ConfigDict], Any]
  defaults: dict


_REGISTRY: dict[str, _Entry] = {}


def register(type_name: str, **defaults):
  """Decorator: registers `fn(ctx, cfg)` as evaluator type `type_name` with its own defaults."""

  def wrap(fn):
    if type_name in _REGISTRY:
      raise ValueError(f"evaluator type {type_name!r} is registered twice")
    _REGISTRY[type_name] = _Entry(fn, {**COMMON, **defaults})
    return fn

  return wrap


def types() -> tuple[str, ...]:
  _import_evaluators()
  return tuple(sorted(_REGISTRY))


def defaults(type_name: str) -> dict:
  """Every field of evaluator type `type_name` with its default."""
  _import_evaluators()
  if type_name not in _REGISTRY:
    raise KeyError(f"unknown evaluator type {type_name!r}; registered: {sorted(_REGISTRY)}")
  return dict(type=type_name, **_REGISTRY[type_name].defaults)


def evaluator(type_name: str, **fields) -> ml_collections.ConfigDict:
  """`config.evals.<name>` with every field of `type_name` present (so each can be overridden,
  e.g. `--config.evals.test.windows=tile`); None defaults become typed int placeholders."""
  full = defaults(type_name)
  unknown = sorted(set(fields) - set(full))
  if unknown:
    raise KeyError(f"evaluator type {type_name!r} has no fields {unknown}; expected {sorted(full)}")
  full.update(fields)
  return ml_collections.ConfigDict(
      {k: ml_collections.config_dict.placeholder(int) if v is None else v for k, v in full.items()})


def _import_evaluators():
  # The modules register their types on import.
  from avatar_jax.evals import long_video, motion, reconstruction, samples  # pylint: disable=g-import-not-at-top,unused-import


def declared(config: ml_collections.ConfigDict, system: system_lib.System | None = None
             ) -> dict[str, ml_collections.ConfigDict]:
  """{name: full evaluator config} from `config.evals` (defaults filled in); without
  `config.evals`, the system's default evaluator types, each named after its type."""
  evals = config.get("evals")
  if evals is None and config.get("eval") is not None and "splits" in config.eval:
    # Checkpoints written before `evals` existed carry `eval` (one SynthDyad table per split).
    old = config.eval
    evals = {"eval": dict(type="synthdyad", split=",".join(old.splits), num_clips=old.num_clips,
                          baselines=old.baselines, batch_size=old.batch_size,
                          at_end=old.get("at_end", True))}
  if evals is None:
    evals = {t: {"type": t} for t in (system.evaluators() if system is not None else ())}
  out = {}
  for name, cfg in dict(evals).items():
    cfg = dict(cfg)
    if "type" not in cfg:
      raise KeyError(f"config.evals.{name} has no 'type'; expected one of {types()}")
    full = defaults(cfg["type"])
    unknown = sorted(set(cfg) - set(full))
    if unknown:
      raise KeyError(f"config.evals.{name}: unknown fields {unknown} for type {cfg['type']!r}; "
                     f"expected {sorted(full)}")
    full.update(cfg)
    out[name] = ml_collections.ConfigDict(full)
  return out


def due(cfg: ml_collections.ConfigDict, step: int | None, final: bool) -> bool:
  return bool((cfg.every and step is not None and step % cfg.every == 0) or (final and cfg.at_end))


def splits(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  s = cfg.split
  return tuple(x for x in s.split(",") if x) if isinstance(s, str) else tuple(s)


def run(system: system_lib.System, model: nnx.Module | Callable[[], nnx.Module], config: ml_collections.ConfigDict,
        workdir: str, *, step: int | None = None, writer=None, final: bool = False,
        only: Sequence[str] | None = None, force: bool = False,
        overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Runs the evaluators of `config.evals` due at `step`; returns {name: result}.

  model: the model, or a function returning it (the trainer passes one, so that the EMA model
    is assembled only at steps where an evaluator is due);
  only: run just these names; force: run them whatever `every`/`at_end` say (the CLI);
  overrides: fields set on every evaluator run (e.g. {"split": "ood", "num_clips": 2}).
  """
  results = {}
  for name, cfg in sorted(declared(config, system).items()):
    if (only is not None and name not in only) or not (force or due(cfg, step, final)):
      continue
    if callable(model) and not isinstance(model, nnx.Module):
      model = model()   # built only when an evaluator is due
    for key, value in (overrides or {}).items():
      if value is not None and key in cfg:
        cfg[key] = value
    ctx = Context(system, model, config, workdir, step=step, writer=writer, name=name)
    logging.info("Evaluator %s (%s) at step %s.", name, cfg.type, step)
    results[name] = _REGISTRY[cfg.type].fn(ctx, cfg)
  return results


# ------------------------------------------------------------------------------ shared helpers
def data_config(config: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict
                ) -> ml_collections.ConfigDict:
  """config.data for deterministic eval windows of `cfg` (whole clips or tiles)."""
  data = copy.deepcopy(config.data)
  data.batch_size = int(cfg.batch_size)
  data.eval_windows = cfg.windows
  if cfg.windows == "full":
    data.clip_frames = 0     # whole clips, whatever the training window
  elif cfg.clip_frames:
    data.clip_frames = int(cfg.clip_frames)
  # Prepared lazily: caching would prepare the whole split when `num_clips` of it are read.
  data.synthdyad.cache = False
  data.worker_count = 0
  return data


def batches(ctx: Context, cfg: ml_collections.ConfigDict, keys: Sequence[str], split: str,
            data: ml_collections.ConfigDict | None = None) -> Iterator[dict[str, np.ndarray]]:
  """The first `cfg.num_clips` eval windows of `split` with `keys` (+ bookkeeping keys), in host
  batches of <= `cfg.batch_size`, from `pipeline.make(..., shuffle=False)` (one pass) of the run's
  data (`data_config`) or of `data`."""
  data = data_config(ctx.config, cfg) if data is None else data
  it = pipeline.make(data, split, keys=tuple(dict.fromkeys(keys)), shuffle=False, num_epochs=1,
                     shard_index=0, shard_count=1)
  left = int(cfg.num_clips)
  for batch in it:
    if left <= 0:
      break
    n = len(batch["example_index"])
    if n > left:
      batch = {k: v[:left] for k, v in batch.items()}
    left -= min(n, left)
    yield batch
  if left > 0:
    raise ValueError(f"config.evals.{ctx.name}: num_clips={cfg.num_clips} but split {split!r} has "
                     f"only {int(cfg.num_clips) - left} eval windows (config.data.split_sizes, "
                     f"windows={cfg.windows!r})")


def _generate(state, batch, rng, *, graphdef, fn, options):
  return fn(nnx.merge(graphdef, state), batch, rng, **dict(options))


_generate_jit = jax.jit(_generate, static_argnames=("graphdef", "fn", "options"))


def generator(system: system_lib.System, model: nnx.Module, *, fn=None, **options):
  """`gen(batch, rng) -> Outputs` (value as NumPy): `system.generate` (or `fn(model, batch, rng,
  **options)`, e.g. a system's reconstruction of the true latents) jitted once per shape."""
  graphdef, state = nnx.split(model)
  spec = system.data_spec()
  keys = tuple(spec.keys) + tuple(getattr(spec, "optional_keys", ()))
  fn = fn or system.generate
  frozen = tuple(sorted(options.items()))
  try:
    hash((graphdef, fn, frozen))
  except TypeError:   # a model or options that cannot be a cache key: compiled for this call
    frozen = None
  if frozen is not None:
    # One compiled program per (model structure, fn, options, shapes) for the whole process:
    # the rows of a table (model, shuffled audio, crosstalk) and every periodic eval reuse it.
    gen = functools.partial(_generate_jit, graphdef=graphdef, fn=fn, options=frozen)
  else:
    gen = jax.jit(functools.partial(_generate, graphdef=graphdef, fn=fn, options=options))

  def call(batch, rng) -> system_lib.Outputs:
    b = {k: jnp.asarray(batch[k]) for k in keys if k in batch}
    out = gen(state, b, rng)
    return out.replace(value=np.asarray(out.value))

  return call


def generate(system: system_lib.System, model: nnx.Module, chunks: Sequence[Mapping[str, np.ndarray]],
             rng: jax.Array, *, fn=None, **options) -> system_lib.Outputs:
  """Generates for consecutive batches; batch starting at window i gets `fold_in(rng, i)`.

  Returns one Outputs whose value is the batches' values concatenated: [N, ...] NumPy.
  fn: what to run instead of `system.generate` (see `generator`).
  """
  gen = generator(system, model, fn=fn, **options)
  outs, i = [], 0
  for batch in chunks:
    outs.append(gen(batch, jax.random.fold_in(rng, i)))
    i += len(next(iter(batch.values())))
  if not outs:
    raise ValueError("generate: no batches")
  return outs[0].replace(value=np.concatenate([o.value for o in outs]))


def concat(chunks: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Batches [b_i, ...] -> one batch [sum b_i, ...] (keys of the first batch)."""
  return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def split_batch(batch: Mapping[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
  n = len(next(iter(batch.values())))
  return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def options(cfg: ml_collections.ConfigDict) -> dict:
  """The evaluator's `system.generate` options as a plain dict."""
  opts = cfg.get("options") or {}
  return dict(opts.to_dict() if isinstance(opts, ml_collections.ConfigDict) else opts)


def rng_for(ctx: Context, cfg: ml_collections.ConfigDict) -> jax.Array:
  return jax.random.key(ctx.config.seed + 1 if cfg.seed is None else int(cfg.seed))
