"""The System contract: everything the trainer, the evaluators and the encode job need from a model
family, documented here and nowhere else.

A *system* is one model file plus a config. The file (a module under `avatar_jax.models`, named by
`config.model.name` as a dotted path, e.g. "motion.motion_dit"; or any importable "pkg.mod") exports
a class called `System`, a subclass of `System` below, built as `System(config)` with the WHOLE
config (model, data, optim, ...), so data facts such as fps come from `pipeline.facts(config.data)`
instead of copies in the model config.

What the trainer does with it, in order (see trainer.setup and docs/architecture.md):

  spec   = system.data_spec()                   batch keys to produce: pipeline.make(..., keys=spec.keys)
  stats  = system.fit_stats(batches)            once, before the first step (None: nothing to fit)
  model  = system.build(rngs=..., stats=stats)  nnx.Module; its variables split three ways:
             trainable  nnx.Param matching `system.trainable`  -> optimiser + EMA
             frozen     every other nnx.Param (a VAE under a DiT)  -> neither
             rest       non-Param variables (data statistics)
  aux    = system.aux_models(rngs=...)          {name: nnx.Module} beside the model, never trained
                                                (a DPO reference policy, a decoder); weights come
                                                from `config.init_from` entries with into="aux/<name>"
  step:    batch = system.prepare_batch(model, aux, batch, rng)   inside jit, no gradient
           loss, metrics = system.loss(model, batch, rng, aux)    gradient w.r.t. trainable only
  eval:    outputs = system.generate(model, batch, rng)           -> Outputs (tagged with its space)
           frames  = system.decode(outputs, batch)                host side, uint8 [B, T, H, W, 3]
           system.evaluators()                                    default evaluator types
  encode:  system.encode(model, batch)                            features for pre-encoded datasets
"""
from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx, struct

Batch = Mapping[str, jax.Array]


@struct.dataclass
class Outputs:
  """What `System.generate` returns: a value tagged with the space it lives in.

  value: the generated array, e.g. motion [B, T, C], FLAME [B, T, 56], video latents [B, T, h, w, c].
  space: "motion" (SynthDyad coefficients), "flame56" (exp 50, jaw 3, pose 3) or "video_latent";
    evaluators and `System.decode` dispatch on it.
  extras: anything else a sampler wants to hand on (intermediate latents, attention maps, ...).
  """
  value: jax.Array
  space: str = struct.field(pytree_node=False)
  extras: dict = struct.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What a system consumes from the pipeline.

  keys: batch keys the loss/generate read (e.g. ("motion_self", "mel_self", "mel_partner"));
    the pipeline computes only these (plus its bookkeeping keys example_index, clip_start,
    identity_*).
  optional_keys: further keys `encode` and `generate` read when the batch has them (the VAE
    encodes a reference_image beside the video; a video DiT samples from a reference_image
    instead of its pre-encoded latent).
  """
  keys: tuple[str, ...]
  optional_keys: tuple[str, ...] = ()


class System(abc.ABC):
  """Base class of every system; subclasses implement `data_spec`, `build` and `loss` at least.

  Attributes:
    config: the whole run config.
    trainable: nnx filter selecting the trained parameters among the model's nnx.Params (default:
      all of them). Every other Param is frozen: no optimiser state, no EMA, no gradient. A stage
      that trains only the heads sets e.g. `nnx.PathContains("head")`.
  """

  trainable: Any = nnx.Param

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  @abc.abstractmethod
  def data_spec(self) -> DataSpec:
    """The batch keys this system reads (training and generation)."""

  @abc.abstractmethod
  def build(self, *, rngs: nnx.Rngs, stats: Any = None) -> nnx.Module:
    """The model, with parameters annotated with logical axis names (sharding.RULES)."""

  def fit_stats(self, batches: Sequence[Mapping[str, np.ndarray]]) -> Any:
    """Data statistics (a pytree) from a few host batches, fixed before training; None: none."""
    del batches
    return None

  def aux_models(self, *, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
    """Models that live beside the trained one and are never trained: {name: module}."""
    del rngs
    return {}

  def prepare_batch(self, model: nnx.Module, aux: dict[str, nnx.Module], batch: Batch,
                    rng: jax.Array) -> Batch:
    """Runs inside the jitted step before `loss`, without gradient (e.g. on-policy negatives)."""
    del model, aux, rng
    return batch

  @abc.abstractmethod
  def loss(self, model: nnx.Module, batch: Batch, rng: jax.Array,
           aux: dict[str, nnx.Module] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(scalar loss, {name: scalar metric}); differentiated w.r.t. the trainable params."""

  def generate(self, model: nnx.Module, batch: Batch, rng: jax.Array, **options) -> Outputs:
    """Samples outputs for the conditioning in `batch`."""
    raise NotImplementedError(f"{type(self).__module__}.System does not generate")

  def decode(self, outputs: Outputs, batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """Host side: uint8 frames [B, T, H, W, 3] of `outputs` (rendered motion, decoded latents)."""
    raise NotImplementedError(f"{type(self).__module__}.System cannot decode {outputs.space!r}")

  def encode(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
    """Features written by the encode job (`python -m avatar_jax.encode`): {key: [B, ...]}."""
    raise NotImplementedError(f"{type(self).__module__}.System has no encoder")

  def evaluators(self) -> tuple[str, ...]:
    """Evaluator types run when the config does not name its own (config.evals)."""
    return ()
