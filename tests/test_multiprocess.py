"""Several JAX processes on CPU (jax.distributed with a localhost coordinator), the real trainer:

  run A  launch/local/train.sh, 2 processes x 4 devices, mesh data=2 x fsdp=4: 4 steps, then saves
  one    between the launches, here (1 process x 8 devices): restores A's step 4 (state and data
         position) and saves both again, a checkpoint written by one process
  run B  this file as a program, 4 processes x 2 devices, mesh fsdp=8: records each process's
         first Grain examples, restores A's step 4 (state and data position), saves both again,
         records the batch it resumes with, restores the one-process checkpoint likewise, and
         checks the config-agreement error
  here   1 process x 8 devices: replays A's global batches (the two per-process Grain shards side by
         side) and compares losses, parameters, data positions, the three checkpoints, and the
         batch each resume on another process count (2 -> 4, 2 -> 1, 4 -> 1, 1 -> 4) draws next.

Process start, jax import and compilation cost seconds each, so the two launches do every check.
"""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import trainer_harness as harness
from avatar_jax import checkpointing, distributed, sharding, trainer
from avatar_jax.data import pipeline

# One worker builds the module's fixtures (replay's compile is shared by all its checks).
pytestmark = pytest.mark.xdist_group("multiprocess")

STEPS = 4
MESH_A = {"data": 2, "fsdp": 4}
MESH_B = {"fsdp": 8}
# The subprocesses get the same options through XLA_FLAGS (trainer_harness.subprocess_env).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# One checkpoint, at the end: a multi-process save costs seconds.
OVERRIDES = {**harness.OVERRIDES, "train.num_steps": STEPS, "train.ckpt_every": STEPS,
             "mesh.data": MESH_A["data"], "mesh.fsdp": MESH_A["fsdp"]}


def _env(tmp_path_factory, local_devices: int) -> dict[str, str]:
  env = harness.subprocess_env(harness.cache_dir(tmp_path_factory))
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+",
                            f"--xla_force_host_platform_device_count={local_devices}",
                            env["XLA_FLAGS"])
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _free_port():
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _leaves(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


# ============================================================================ run B (a program)
def probe(workdir_a: str, workdir_b: str, workdir_one: str, out: str) -> None:
  """One process of run B (4 x 2 devices): everything it finds goes to `out`/process_<i>.*."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  assert distributed.initialize() == "explicit"
  me = jax.process_index()
  ckpt = checkpointing.Checkpointer(os.path.join(workdir_a, "checkpoints"))
  config = ckpt.restore_config()
  s = trainer.setup(config, sharding.make_mesh(MESH_B), fit=False, init_from=False, abstract=True)
  # This process's rows of the first global batches: one epoch = 16 examples / global batch 8.
  it = pipeline.make(config.data, "train", keys=s.system.data_spec().keys, seed=config.seed)
  ids = [next(it)["example_index"].tolist() for _ in range(2)]
  # A's state and data position (saved by 2 processes) onto 4: `it` moves to A's position.
  state = ckpt.restore(s.state, it, step=STEPS)
  ckpt.close()
  # Whole arrays, each assembled from the shards of every process.
  full = multihost_utils.process_allgather(state, tiled=True)
  if me == 0:
    np.savez(os.path.join(out, "state.npz"), **_leaves(full))
  # The same state and position, saved by 4 processes.
  saver = checkpointing.Checkpointer(os.path.join(workdir_b, "checkpoints"), async_save=False)
  saver.save(STEPS, state, it, config=config)
  saver.close()
  # The batch this resume trains on next: its rows of A's global batch STEPS.
  np.savez(os.path.join(out, f"next_{me}.npz"), **next(it))
  # The same state and position saved by one process (the fixture), restored onto 4.
  it_one = pipeline.make(config.data, "train", keys=s.system.data_spec().keys, seed=config.seed)
  one = checkpointing.Checkpointer(os.path.join(workdir_one, "checkpoints"))
  from_one = multihost_utils.process_allgather(one.restore(s.state, it_one, step=STEPS), tiled=True)
  one.close()
  if me == 0:
    np.savez(os.path.join(out, "state_from_one.npz"), **_leaves(from_one))
  np.savez(os.path.join(out, f"next_from_one_{me}.npz"), **next(it_one))
  distributed.check_same_config(config)   # agreeing processes pass
  differing = copy.deepcopy(config)
  differing.seed = config.seed + me
  try:
    distributed.check_same_config(differing)
    error = ""
  except ValueError as e:
    error = str(e)
  with open(os.path.join(out, f"process_{me}.json"), "w") as f:
    json.dump({"ids": ids, "error": error, "devices": jax.local_device_count(),
               "processes": jax.process_count()}, f)


# ============================================================================ launches
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  def launch(root):
    a, b, one, out = (os.path.join(root, n) for n in ("a", "b", "one", "probe"))
    os.makedirs(out)
    env = _env(tmp_path_factory, 4)
    env.update(PROCS="2", PORT=str(_free_port()))
    cmd = [os.path.join(harness.REPO, "launch", "local", "train.sh"),
           f"{harness.QUICKSTART}:{harness.CONFIG_ARG}", a,
           *[f"--config.{k}={v}" for k, v in OVERRIDES.items()]]
    run_a = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    with open(os.path.join(out, "log_a.txt"), "w") as f:
      f.write(run_a.stdout + run_a.stderr)
    assert run_a.returncode == 0, (run_a.stdout + run_a.stderr)[-4000:]

    # A one-process checkpoint for B to restore (1 -> 4) without another launch: A's step 4
    # (state and data position) restored here onto 1 x 8 devices and saved again.
    ckpt = checkpointing.Checkpointer(os.path.join(a, "checkpoints"))
    config = ckpt.restore_config()
    ckpt.close()
    s = trainer.setup(config, sharding.make_mesh(MESH_A), fit=False, init_from=False,
                      abstract=True)
    it = pipeline.make(config.data, "train", keys=s.system.data_spec().keys, seed=config.seed)
    state = _restore(a, s, {"data": 2, "fsdp": 2, "tensor": 2}, it)
    saver = checkpointing.Checkpointer(os.path.join(one, "checkpoints"), async_save=False)
    saver.save(STEPS, state, it, config=config)
    saver.close()

    env = _env(tmp_path_factory, 2)
    env.update(AVATAR_COORDINATOR=f"localhost:{_free_port()}", AVATAR_NUM_PROCESSES="4")
    procs = [subprocess.Popen([sys.executable, __file__, a, b, one, out], cwd=harness.REPO,
                              env={**env, "AVATAR_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(4)]
    try:
      logs_b = [p.communicate(timeout=300)[0] for p in procs]
    finally:
      for p in procs:   # one failed process leaves the others waiting for it
        p.kill()
    for i, p in enumerate(procs):
      assert p.returncode == 0, f"process {i} of run B:\n{logs_b[i][-4000:]}"

  # Launched once per test run: a module fixture is rebuilt whenever other modules' tests run
  # in between on the same worker, and these launches are the suite's most expensive setup.
  root = harness.built_once(tmp_path_factory, "multiprocess", launch)
  out = os.path.join(root, "probe")
  probes = [json.loads(open(os.path.join(out, f"process_{i}.json")).read()) for i in range(4)]
  return {"a": os.path.join(root, "a"), "b": os.path.join(root, "b"),
          "one": os.path.join(root, "one"),
          "log_a": open(os.path.join(out, "log_a.txt")).read(), "probes": probes,
          "state_b": dict(np.load(os.path.join(out, "state.npz"))),
          "next_b": [dict(np.load(os.path.join(out, f"next_{i}.npz"))) for i in range(4)],
          "state_from_one": dict(np.load(os.path.join(out, "state_from_one.npz"))),
          "next_from_one": [dict(np.load(os.path.join(out, f"next_from_one_{i}.npz")))
                            for i in range(4)]}


@pytest.fixture(scope="module")
def replay():
  """Run A on one process x 8 devices: the two processes' Grain shards side by side are its
  global batches (process p's rows follow process p-1's, as jax.make_array_from_process_local_data
  lays them out on the mesh)."""
  config = harness.load_quickstart(**OVERRIDES)
  s = trainer.setup(config, sharding.make_mesh(MESH_A), compiler_options=FAST_COMPILE)
  keys = s.system.data_spec().keys
  shards = [pipeline.make(config.data, "train", keys=keys, seed=config.seed, shard_index=p,
                          shard_count=2) for p in range(2)]
  host = [_concat([next(it) for it in shards]) for _ in range(STEPS)]
  # Where each shard stands after the run, and the batch it gives next.
  positions, following = [it.get_state() for it in shards], [next(it) for it in shards]
  state, losses, init = s.state, [], _leaves(s.state)
  for batch in host:
    state, metrics = s.train_step(state, s.batch(batch))
    losses.append(float(metrics["loss"]))
  return {"config": config, "setup": s, "state": jax.device_get(state), "losses": losses,
          "init": init, "following": following, "positions": positions, "keys": keys,
          "ids": [b["example_index"].tolist() for b in host]}


def _concat(parts) -> dict[str, np.ndarray]:
  """Per-process batches side by side: the global batch."""
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _restore(workdir: str, s: trainer.Setup, mesh_shape, data_iter=None) -> dict:
  """A workdir's last state restored onto this process's 8 devices laid out as `mesh_shape`
  (and its data position onto `data_iter`, if given)."""
  mesh = sharding.make_mesh(mesh_shape)
  on_mesh = jax.tree.map(lambda x: jax.sharding.NamedSharding(mesh, x.spec), s.shardings,
                         is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
  target = checkpointing.abstract_like(s.state, on_mesh)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    return ckpt.restore(target, data_iter, step=STEPS)
  finally:
    ckpt.close()


# ============================================================================ checks
def test_run_a_two_processes_four_devices_each(runs):
  log = runs["log_a"]
  for i in (0, 1):
    assert f"[{i}] " in log and f"Process {i} of 2, 4 local / 8 global devices" in log, log[-3000:]
  # The loss is a global quantity: both processes log the same value at every step.
  losses = {i: dict(re.findall(rf"^\[{i}\] .*\] \[(\d+)\] .*train/loss=([0-9.eE+-]+)", log, re.M))
            for i in (0, 1)}
  assert sorted(map(int, losses[0])) == list(range(1, STEPS + 1))
  assert losses[0] == losses[1]
  # Each process wrote its own data position into the checkpoint.
  data = os.path.join(runs["a"], "checkpoints", str(STEPS), "data")
  assert sorted(f for f in os.listdir(data) if f.endswith(".json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]


def test_two_processes_step_like_one_process(runs, replay):
  """Losses and parameters of run A equal the 1-process 8-device run on the same global batches."""
  logged = harness.read_scalars(os.path.join(runs["a"], "tb"), "train/loss")[-1]
  np.testing.assert_allclose([logged[i] for i in range(1, STEPS + 1)], replay["losses"],
                             rtol=1e-5)
  # Saved by 2 processes, restored onto 1 process x 8 devices (another layout: data=8).
  got = _leaves(_restore(runs["a"], replay["setup"], {"data": 8}))
  want = _leaves(replay["state"])
  assert got.keys() == want.keys()
  moved = 0
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    moved += "params" in k and not np.array_equal(want[k], replay["init"][k])
  assert moved > 0   # the comparison covers trained weights, not only the initialisation


def test_checkpoint_restores_across_process_counts(runs, replay):
  """A (2 x 4) restored by 4 x 2 processes, B (saved by 4 x 2) restored here, and the checkpoint
  saved by 1 process restored here and by 4 x 2 processes: same arrays."""
  data = os.path.join(runs["one"], "checkpoints", str(STEPS), "data")
  assert sorted(f for f in os.listdir(data) if f.endswith(".json")) == ["process_0-of-1.json"]
  a_here = _leaves(_restore(runs["a"], replay["setup"], {"fsdp": 8}))
  b_here = _leaves(_restore(runs["b"], replay["setup"], {"data": 2, "fsdp": 2, "tensor": 2}))
  one_here = _leaves(_restore(runs["one"], replay["setup"], {"data": 8}))
  a_on_four, one_on_four = runs["state_b"], runs["state_from_one"]
  assert a_here.keys() == b_here.keys() == a_on_four.keys() == one_here.keys() == one_on_four.keys()
  for k in a_here:
    np.testing.assert_array_equal(a_on_four[k], a_here[k], err_msg=k)
    np.testing.assert_array_equal(b_here[k], a_here[k], err_msg=k)
    np.testing.assert_array_equal(one_here[k], a_here[k], err_msg=k)
    np.testing.assert_array_equal(one_on_four[k], one_here[k], err_msg=f"1 -> 4: {k}")


def test_saved_data_position_gives_the_next_batch(runs, replay):
  """Each process's saved Grain state is its shard's position after the last step (the global
  batch position, the same for both): set on a fresh iterator it yields exactly the batch an
  uninterrupted run would train on next."""
  config = replay["config"]
  assert replay["positions"][0] == replay["positions"][1]
  for p in range(2):
    path = os.path.join(runs["a"], "checkpoints", str(STEPS), "data", f"process_{p}-of-2.json")
    saved = json.loads(open(path).read())
    assert saved == json.loads(json.dumps(replay["positions"][p]))
    it = pipeline.make(config.data, "train", keys=replay["keys"], seed=config.seed,
                       shard_index=p, shard_count=2)
    it.set_state(saved)
    nxt, want = next(it), replay["following"][p]
    assert nxt.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(nxt[k], want[k], err_msg=k)


def test_resume_on_another_process_count_gives_the_next_batch(runs, replay):
  """A (2 processes) resumed by 4 (run B) and by 1 (here), B (4) resumed by 1, and the 1-process
  save of A's position resumed by 4 (run B): each draws exactly the global batch run A would have
  trained on next (the resuming processes' rows side by side)."""
  want = _concat(replay["following"])
  got = {"2 -> 4": _concat(runs["next_b"]), "1 -> 4": _concat(runs["next_from_one"])}
  data = os.path.join(runs["b"], "checkpoints", str(STEPS), "data")
  assert sorted(f for f in os.listdir(data) if f.endswith(".json")) == [
      f"process_{i}-of-4.json" for i in range(4)]
  config = replay["config"]
  for name, workdir in (("2 -> 1", runs["a"]), ("4 -> 1", runs["b"])):
    it = pipeline.make(config.data, "train", keys=replay["keys"], seed=config.seed)
    _restore(workdir, replay["setup"], {"data": 8}, it)
    got[name] = next(it)
  for name, batch in got.items():
    assert batch.keys() == want.keys(), name
    for k in want:
      np.testing.assert_array_equal(batch[k], want[k], err_msg=f"{name}: {k}")


def test_each_process_reads_its_own_examples(runs, replay):
  probes = runs["probes"]
  assert [(p["processes"], p["devices"]) for p in probes] == [(4, 2)] * 4
  seen = [sorted(i for batch in p["ids"] for i in batch) for p in probes]
  assert all(len(s) == 4 for s in seen), seen   # 2 rows of each of 2 global batches
  flat = sorted(i for s in seen for i in s)
  assert flat == list(range(16)), seen          # no example twice, none left out
  # The 4 processes' rows side by side are run A's (2 processes') global batches.
  for step in range(2):
    assert sum((p["ids"][step] for p in probes), []) == replay["ids"][step]


def test_disagreeing_config_is_an_error(runs):
  errors = [p["error"] for p in runs["probes"]]
  assert all("processes [1, 2, 3] resolved a different config than process 0" in e
             for e in errors), errors


def test_mesh_that_does_not_fit_the_devices():
  with pytest.raises(ValueError, match="needs 16 devices, found 8"):
    sharding.make_mesh({"data": 2, "fsdp": 8})
  with pytest.raises(ValueError, match="not divisible by 3"):
    sharding.make_mesh({"data": -1, "tensor": 3})


def test_detect_cluster_from_environment():
  assert distributed.detect({}) is None
  assert distributed.detect({"SLURM_NTASKS": "1"}) is None
  assert distributed.detect({"SLURM_NTASKS": "4"}) == "slurm"
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "10.0.0.2"}) is None
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}) == "tpu"
  explicit = dict(AVATAR_COORDINATOR="h:1", AVATAR_NUM_PROCESSES="2", AVATAR_PROCESS_ID="0")
  assert distributed.detect({**explicit, "SLURM_NTASKS": "4"}) == "explicit"
  with pytest.raises(ValueError, match=r"\['AVATAR_PROCESS_ID'\] are not"):
    distributed.detect({k: v for k, v in explicit.items() if k != "AVATAR_PROCESS_ID"})


@pytest.mark.parametrize("env,want", [
    # one task per node sees the node's 8 GPUs and drives all of them (JAX alone: only GPU 0)
    ({"SLURM_NTASKS_PER_NODE": "1", "SLURM_LOCALID": "0", "SLURM_GPUS_ON_NODE": "8"},
     list(range(8))),
    # one task per GPU, GPUs bound per task by SLURM: its one visible GPU
    ({"SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_LOCALID": "5", "CUDA_VISIBLE_DEVICES": "5"}, [0]),
    # one task per GPU, every GPU visible to every task: its own
    ({"SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_LOCALID": "5", "SLURM_GPUS_ON_NODE": "8"}, [5]),
    # two tasks per node share 8 GPUs: four each
    ({"SLURM_NTASKS": "4", "SLURM_NNODES": "2", "SLURM_LOCALID": "1",
      "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, [4, 5, 6, 7]),
    ({"SLURM_NTASKS_PER_NODE": "2", "SLURM_LOCALID": "1"}, None),   # CPU job
])
def test_slurm_local_devices(env, want):
  assert distributed.slurm_local_devices(env) == want


def test_slurm_tasks_that_cannot_share_the_gpus():
  with pytest.raises(ValueError, match="3 tasks per node cannot share 8 GPUs"):
    distributed.slurm_local_devices({"SLURM_NTASKS_PER_NODE": "3", "SLURM_LOCALID": "0",
                                     "SLURM_GPUS_ON_NODE": "8"})


if __name__ == "__main__":
  probe(*sys.argv[1:5])
