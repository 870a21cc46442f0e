"""JAX's persistent compilation cache, pointed at `config.compile_cache` (docs/launch.md).

With a cache directory, every program XLA compiles (the train step, the state initialiser, the
samplers of the evaluators) is also written there, keyed by its HLO, compile options, devices and
the jax/jaxlib version; a later process that compiles the same program loads it instead. Runs of
a sweep (seeds, ablation variants that share the step's shapes) and resumed runs then skip the
minutes a large model's step takes to compile on a GPU.

`config.compile_cache` (config_lib.SHARED, default "") decides:
  ""     JAX's own setting stands: `JAX_COMPILATION_CACHE_DIR` from the environment (JAX reads it
         when imported), else no cache;
  a dir  that directory (~ expanded, made absolute, created), also over the environment variable:
         a value written in a config or on the command line is the more specific choice.
What is stored is JAX's to decide: programs that compiled in at least
`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` (1 s by default) are.

`apply` is called where a config starts compiling (`trainer.train_and_evaluate`,
`trainer.restore_model` with the run's saved config, `data.encoding.encode`), before the first
compile; `summary` counts what the cache saved in this process.
"""
from __future__ import annotations

import collections
import os
import threading

from absl import logging

_PREFIX = "/jax/compilation_cache/"
_counts: collections.Counter = collections.Counter()
_lock = threading.Lock()
_listening = False


def _on_event(event: str, *args, **kwargs) -> None:
  del args, kwargs
  if event.startswith(_PREFIX):
    with _lock:
      _counts[event[len(_PREFIX):]] += 1


def _on_duration(event: str, duration: float, *args, **kwargs) -> None:
  del args, kwargs
  if event == _PREFIX + "compile_time_saved_sec":
    with _lock:
      _counts["saved_s"] += float(duration)


def _listen() -> None:
  """Counts the cache's monitoring events (jax.monitoring; once per process)."""
  global _listening
  if _listening:
    return
  import jax  # pylint: disable=g-import-not-at-top
  jax.monitoring.register_event_listener(_on_event)
  jax.monitoring.register_event_duration_secs_listener(_on_duration)
  _listening = True


def current() -> str | None:
  """The directory JAX's persistent cache uses now (None: no cache)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.config.values.get("jax_compilation_cache_dir") or None


def set_dir(path: str | None) -> None:
  """Points JAX's cache at `path` (None: off), also after a cache was opened elsewhere."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import (  # pylint: disable=g-import-not-at-top
      compilation_cache as cc)
  before = current()
  if before == path:
    return
  jax.config.update("jax_compilation_cache_dir", path)
  if before is not None:
    # JAX opens the cache at the first compile and keeps it; reopen it at the new directory.
    cc.reset_cache()


def apply(config) -> str | None:
  """Sets the cache from `config.compile_cache` (see the module doc); returns the directory in
  use, or None. Call it before the first compile of the process."""
  _listen()
  # Configs saved by checkpoints written before the key existed have no compile_cache.
  wanted = str(config.get("compile_cache", "") or "")
  if not wanted:
    path = current()
    if path:
      logging.info("Persistent compilation cache: %s (JAX_COMPILATION_CACHE_DIR).", path)
    return path
  path = os.path.abspath(os.path.expanduser(wanted))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    logging.warning("config.compile_cache=%s cannot be created (%s); compiling without it.",
                    wanted, e)
    return current()
  set_dir(path)
  logging.info("Persistent compilation cache: %s (config.compile_cache).", path)
  return path


def counts() -> dict[str, float]:
  """This process's cache events so far: hits (programs loaded instead of compiled), stored
  (compiled and written), saved_s."""
  with _lock:
    c = dict(_counts)
  return {"hits": c.get("cache_hits", 0), "stored": c.get("cache_misses", 0),
          "saved_s": c.get("saved_s", 0.0)}


def summary() -> str | None:
  """One line on what the cache did in this process (None without a cache)."""
  path = current()
  if not path:
    return None
  c = counts()
  return (f"Persistent compilation cache {path}: {c['hits']} programs loaded "
          f"({c['saved_s']:.1f} s of compilation saved), {c['stored']} compiled and stored.")


def log_summary() -> None:
  line = summary()
  if line:
    logging.info("%s", line)
