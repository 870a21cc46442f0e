"""Config helpers shared by configs/*.py (big_vision style `get_config(arg)`)."""
from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults):
  """Parses `"size=S,res=64,flag"` into a ConfigDict over `defaults`, typed like the defaults.

  Unknown names, names given twice, values that do not parse as the default's type, and a bare
  name whose default is not a bool are errors, so a typo on the command line never passes
  silently.
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  seen = set()
  for item in arg.split(","):
    if not item:
      continue
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise KeyError(f"config argument {key!r} is unknown; expected one of {sorted(defaults)}")
    if key in seen:
      raise ValueError(f"config argument {key!r} is given twice in {arg!r}")
    seen.add(key)
    default = defaults[key]
    if not eq:
      if default is not None and not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...); its default is "
                         f"{type(default).__name__} {default!r}")
      value = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r}: expected true/false")
      value = value.lower() in ("true", "1")
    elif default is not None:
      try:
        value = type(default)(value)
      except ValueError:
        raise ValueError(f"config argument {key}={value!r}: expected {type(default).__name__} "
                         f"(like the default {default!r})") from None
    out[key] = value
  return out


SHARED = dict(
    # JAX's persistent compilation cache (compile_cache.py, docs/launch.md): "" leaves JAX's own
    # setting (JAX_COMPILATION_CACHE_DIR, else none); a directory overrides it. Where a run
    # compiles, not what it computes: resuming may change it (checkpointing.CONFIG_FREE_KEYS).
    compile_cache="",
)
"""Top-level keys every config has, with these defaults unless the config file sets them."""


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the SHARED keys a config does not set, then locks it so that setting an unknown key
  (e.g. `--config.trian.steps`) raises."""
  for key, value in SHARED.items():
    if key not in config:
      config[key] = value
  config.lock()
  return config


def freeze(cfg) -> ml_collections.FrozenConfigDict:
  """An immutable, hashable copy of a (sub)config, for a module to keep: jit caches key on it.

  Plain dicts held as values (e.g. `model.audio.wav2vec2.arch`, a converted checkpoint's
  architecture) become nested configs too, which `FrozenConfigDict` alone refuses; lists become
  tuples.
  """
  return ml_collections.FrozenConfigDict(ml_collections.ConfigDict(
      cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)))


def init_from(workdir: str = "", *, step: int | None = None, include=(), exclude=(),
              into: str = "model") -> ml_collections.ConfigDict:
  """`config.init_from`: start a stage from another run's weights (trainer.init_from_entries).

  workdir "" loads nothing; include/exclude are regexes over variable paths ("blocks/0/.*");
  into is "model", "model/<submodule>" or "aux/<name>".
  """
  # A typed placeholder, so that `--config.init_from.step=N` can override the None default.
  step = ml_collections.config_dict.placeholder(int) if step is None else step
  return ml_collections.ConfigDict(dict(workdir=workdir, step=step, include=tuple(include),
                                        exclude=tuple(exclude), into=into))
