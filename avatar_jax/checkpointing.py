"""Orbax checkpoints: train state + Grain iterator state + config, restorable onto any mesh.

Layout under `<workdir>/checkpoints/<step>/`: `state` (sharded arrays), `data` (the iterator's
position, so a resumed run sees exactly the batches an uninterrupted one would), `config` (JSON).
The data position is the global batch position, the same on every process (one global order,
data/pipeline.py), so it too restores onto any process count (`DataHandler`).
Saves are asynchronous; a save only becomes visible once complete, so a process killed mid-save
resumes from the previous checkpoint. A visible checkpoint that does not read back (a truncated or
corrupted file, a half-deleted step) is skipped by `restore_latest` with a warning naming the step
and the error, and renamed to `<step>.damaged` so that the run can write that step again.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

from absl import logging
from etils import epath
import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

DAMAGED_SUFFIX = ".damaged"
_STATE_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


class DataHandler(grain.checkpoint.CheckpointHandler):
  """Grain's Orbax handler, restoring onto any process count.

  Saves as Grain does, one `process_<i>-of-<n>.json` per process. Grain restores only the file of
  the same (index, count), which does not exist after a change of process count; here every
  process reads all the saved files (a few hundred bytes each, once per resume), checks they agree
  (the pipeline's position is global, so they must) and sets that state.
  """

  def restore(self, directory: epath.Path, item=None, args: Any = None):
    item = item or args.item
    if not isinstance(item, grain.DatasetIterator):  # a DataLoader's state is per process
      return super().restore(directory, item=item, args=args)
    return restore_data_state(directory, item)


@ocp.args.register_with_handler(DataHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  item: Any


def saved_data_state(directory) -> dict:
  """The iterator state saved in a checkpoint's `data` folder, by any number of processes.

  Raises ValueError if a process's file is missing or the processes saved different states.
  """
  directory = epath.Path(directory)
  found = {}
  for f in directory.iterdir():
    m = _STATE_FILE.fullmatch(f.name)
    if m:
      found[int(m[1]), int(m[2])] = f
  n = max((c for _, c in found), default=0)
  if not n or sorted(found) != [(i, n) for i in range(n)]:
    raise ValueError(f"{directory} should hold one process_<i>-of-<n>.json per saving process, "
                     f"i = 0..n-1; it holds {sorted(f.name for f in found.values())}.")
  states = [json.loads(found[k].read_text()) for k in sorted(found)]
  differ = [i for i, st in enumerate(states) if st != states[0]]
  if differ:
    raise ValueError(
        f"The data iterator states in {directory} differ between processes {differ} and 0, so "
        f"no one position resumes every process. The data order is global and every process "
        f"saves the same state, so this checkpoint was not written by this pipeline or its "
        f"files were changed.")
  return states[0]


def restore_data_state(directory, iterator: grain.DatasetIterator) -> grain.DatasetIterator:
  """Sets `iterator` to the state saved in `directory` (see `saved_data_state`)."""
  iterator.set_state(saved_data_state(directory))
  iterator.start_prefetch()
  return iterator


class Checkpointer:
  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": DataHandler(),
            "config": ocp.JsonCheckpointHandler(),
        })

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter=None, config: ml_collections.ConfigDict | None = None,
           *, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = DataSave(data_iter)
    if config is not None:
      items["config"] = ocp.args.JsonSave(json.loads(config.to_json_best_effort()))
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state, data_iter=None, step: int | None = None):
    """abstract_state: pytree of jax.ShapeDtypeStruct carrying the *target* shardings.

    Restores the state laid out for the current mesh, whatever mesh wrote it, and moves
    `data_iter` (if given) to the saved position, whatever process count wrote it. Returns the
    state.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = DataRestore(data_iter)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def restore_latest(self, abstract_state, data_iter=None) -> tuple[int, object]:
    """(step, state) of the newest checkpoint that reads back, as `restore` would give it.

    Newer checkpoints that fail to read while an older one reads are damaged: each is renamed
    `<step>.damaged` (kept for inspection, ignored from then on) after a warning naming it and
    the error. If none reads back, nothing is renamed (the cause is likely not the files, e.g. a
    model of another shape) and the error lists every step's failure.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    failed = []
    for step in steps:
      try:
        state = self.restore(abstract_state, data_iter, step)
      except Exception as e:  # pylint: disable=broad-except  # any failure to read counts
        failed.append((step, f"{type(e).__name__}: {error_summary(e)}"))
        continue
      for bad, why in failed:
        logging.warning("Checkpoint %s/%d does not read back (%s); resuming from step %d "
                        "instead.", self.directory, bad, why, step)
        self._set_aside(bad)
      return step, state
    raise ValueError(f"no checkpoint in {self.directory} reads back, the run cannot resume:\n  "
                     + "\n  ".join(f"step {s}: {why}" for s, why in failed))

  def saved_config(self) -> ml_collections.ConfigDict | None:
    """The config of the newest checkpoint whose config reads back; None without checkpoints."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self.restore_config(step)
      except Exception:  # pylint: disable=broad-except  # damaged: restore_latest reports it
        continue
    return None

  def _set_aside(self, step: int) -> None:
    """Renames a damaged step out of the manager's view (the primary host does it)."""
    path = os.path.join(self.directory, str(step))
    if jax.process_index() == 0 and os.path.isdir(path):
      target = path + DAMAGED_SUFFIX
      n = 1
      while os.path.exists(target):
        target, n = f"{path}{DAMAGED_SUFFIX}{n}", n + 1
      os.rename(path, target)
      logging.warning("Moved the damaged checkpoint to %s.", target)
    self.manager.reload()

  def state_metadata(self, step: int):
    """Tree of the saved state's array metadata (shape, dtype) at `step`, reading no arrays."""
    return self.manager.item_metadata(step)["state"]

  def restore_partial(self, abstract_subtree, step: int):
    """Only the arrays of `abstract_subtree` (a subtree of the saved state, e.g. {"ema": ...}),
    each restored with its ShapeDtypeStruct's dtype and target sharding; nothing else is read."""
    path = os.path.join(self.directory, str(step), "state")
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_subtree)
    return ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item=abstract_subtree, restore_args=restore_args, partial_restore=True))

  def restore_config(self, step: int | None = None) -> ml_collections.ConfigDict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(out["config"])

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def error_summary(e: BaseException) -> str:
  """The first line of an error message (Orbax and TensorStore errors run to many lines)."""
  return (str(e).strip().splitlines() or [""])[0][:300]


CONFIG_FREE_KEYS = ("mesh", "evals", "train.progress_bar", "train.log_every", "train.ckpt_every",
                    "train.max_checkpoints", "data.worker_count", "data.prefetch", "data.cache",
                    "data.synthdyad.cache", "compile_cache")
"""Config keys (and everything under them) that a resumed run may change freely: where and how
often it runs and reports, never what it computes (a checkpoint restores onto any mesh)."""


def flatten_config(config: ml_collections.ConfigDict) -> dict:
  """{dotted key: value} of a config, values as its JSON form (tuples become lists)."""
  def flat(tree, prefix):
    if not isinstance(tree, dict):
      return {prefix[:-1]: tree}
    return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
  return flat(json.loads(config.to_json_best_effort()), "")


def config_differences(saved: ml_collections.ConfigDict, current: ml_collections.ConfigDict,
                       allowed=()) -> dict[str, tuple]:
  """{dotted key: (saved value, current value)} of the keys that differ between two configs,
  leaving out CONFIG_FREE_KEYS and the keys (or key prefixes) in `allowed`."""
  a, b = flatten_config(saved), flatten_config(current)
  free = tuple(CONFIG_FREE_KEYS) + tuple(allowed)
  is_free = lambda k: any(k == f or k.startswith(f + ".") for f in free)
  missing = "<absent>"
  return {k: (a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
          if not is_free(k) and a.get(k, missing) != b.get(k, missing)}


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` with the given target shardings."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


WEIGHT_PARTS = ("ema", "frozen", "rest")
"""The parts of a train state that sampling, evaluation, encoding and `config.init_from` read."""


def export_weights(workdir: str, out: str, step: int | None = None) -> str:
  """Writes `<out>/checkpoints/<step>/` holding only the weights of a training workdir's
  checkpoint (EMA, frozen and non-Param variables; no raw parameters, no optimiser state, no
  data position) and its config. Returns `out`.

  The result is about a quarter of an Adam run's checkpoint (weights, EMA and two moments): what
  a finished run ships. `trainer.load_model` (sample, evaluate, encode) and `config.init_from`
  read it like the full workdir; training cannot resume from it.
  """
  src = Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"), async_save=False)
  step = src.latest_step() if step is None else int(step)
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {src.directory}: nothing to export")
  meta = src.state_metadata(step)
  missing = [k for k in WEIGHT_PARTS if k not in meta]
  if missing:
    raise ValueError(f"{src.directory}/{step}/state has no {missing} (it has {sorted(meta)}): "
                     "not a training checkpoint of this codebase")
  one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                          {k: meta[k] for k in WEIGHT_PARTS})
  weights = src.restore_partial(abstract, step)
  config = src.restore_config(step)
  src.close()
  dst = Checkpointer(os.path.join(os.path.abspath(out), "checkpoints"), async_save=False)
  if dst.latest_step() is not None:
    raise FileExistsError(f"{dst.directory} already holds checkpoints {dst.manager.all_steps()}; "
                          "export into an empty directory")
  dst.save(step, weights, config=config, force=True)
  dst.wait()
  dst.close()
  return out


def export_cli(argv: list[str]) -> str:
  """`python -m avatar_jax.convert weights --src <workdir> --out <dir> [--step N]`."""
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="python -m avatar_jax.convert weights",
                              description=export_weights.__doc__)
  p.add_argument("--src", required=True, help="a training workdir")
  p.add_argument("--out", required=True, help="an empty or new directory")
  p.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
  a = p.parse_args(argv)
  return export_weights(a.src, a.out, a.step)
