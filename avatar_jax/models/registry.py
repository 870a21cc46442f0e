"""Systems by name, without a central list: `config.model.name` is a module path.

"motion.motion_dit" means `avatar_jax.models.motion.motion_dit`; a name that is not found there is
imported as given, so user code ("mylab.models.big_dit") needs no edit here. The module exports a
class `System`, a subclass of `avatar_jax.system.System` (the contract is documented there).
"""
from __future__ import annotations

import importlib

from avatar_jax import system as system_lib

PACKAGE = "avatar_jax.models"


def _import(path: str):
  """The module at `path`, or None when `path` itself does not exist (its own import errors raise)."""
  try:
    return importlib.import_module(path)
  except ModuleNotFoundError as e:
    if e.name is not None and (path == e.name or path.startswith(e.name + ".")):
      return None
    raise


def get(name: str) -> type[system_lib.System]:
  """The `System` class of the module named by `config.model.name`."""
  tried = [f"{PACKAGE}.{name}", name]
  for path in tried:
    module = _import(path)
    if module is None:
      continue
    cls = getattr(module, "System", None)
    if not (isinstance(cls, type) and issubclass(cls, system_lib.System)):
      raise TypeError(f"config.model.name={name!r}: module {path} must export `System`, a subclass "
                      f"of avatar_jax.system.System; found {cls!r}")
    return cls
  raise KeyError(f"config.model.name={name!r}: no module {' or '.join(tried)}; expected a dotted "
                 f"path under {PACKAGE} (e.g. 'motion.motion_dit') or an importable module that "
                 "exports `System`")
