"""Model registry: a system is a model file plus a config, never a trainer fork.

A *system* bundles what the trainer needs from a model family:

    @registry.register("name")
    class MySystem:
      def __init__(self, config: ConfigDict)              # config.model
      def build(self, *, rngs: nnx.Rngs, stats=None) -> nnx.Module
      def loss(self, model, batch, rng) -> (scalar loss, {name: scalar})
      def fit_stats(self, batches) -> pytree | None         # optional: data statistics, computed once
      def generate(self, model, batch, rng, **options) -> {name: array}   # optional: sampling
      def evaluate(self, model, config, rng) -> dict          # optional: end-of-training evaluation

The trainer looks systems up by `config.model.name`; it contains no per-model branches.
"""
from __future__ import annotations

import importlib

_SYSTEMS: dict[str, type] = {}
# Modules imported lazily on first lookup, so registering a system costs nothing at import.
_MODULES = (
    "avatar_jax.models.motion.motion_dit",
    "avatar_jax.models.face_reader",
)


def register(name: str):
  def wrap(cls):
    if name in _SYSTEMS and _SYSTEMS[name] is not cls:
      raise ValueError(f"system {name!r} registered twice ({_SYSTEMS[name]} and {cls})")
    _SYSTEMS[name] = cls
    return cls
  return wrap


def _load_all():
  for mod in _MODULES:
    try:
      importlib.import_module(mod)
    except ModuleNotFoundError as e:
      if e.name != mod:  # A real import error inside an existing module must surface.
        raise


def get(name: str) -> type:
  if name not in _SYSTEMS:
    _load_all()
  if name not in _SYSTEMS:
    raise KeyError(f"config.model.name={name!r} is not a registered system; known: {sorted(_SYSTEMS)}")
  return _SYSTEMS[name]


def names() -> list[str]:
  _load_all()
  return sorted(_SYSTEMS)
