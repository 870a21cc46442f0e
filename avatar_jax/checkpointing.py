"""Orbax checkpoints: train state + Grain iterator state + config, restorable onto any mesh.

Layout under `<workdir>/checkpoints/<step>/`: `state` (sharded arrays), `data` (the iterator's
position, so a resumed run sees exactly the batches an uninterrupted one would), `config` (JSON).
Saves are asynchronous; a save only becomes visible once complete, so a process killed mid-save
resumes from the previous checkpoint.
"""
from __future__ import annotations

import json
import os

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        })

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter=None, config: ml_collections.ConfigDict | None = None,
           *, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if config is not None:
      items["config"] = ocp.args.JsonSave(json.loads(config.to_json_best_effort()))
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state, data_iter=None, step: int | None = None):
    """abstract_state: pytree of jax.ShapeDtypeStruct carrying the *target* shardings.

    Restores the state laid out for the current mesh, whatever mesh wrote it, and moves
    `data_iter` (if given) to the saved position. Returns the state.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

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


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` with the given target shardings."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
