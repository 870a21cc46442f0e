"""Compile a config's train step for a TPU slice without TPUs (ahead of time, from any machine).

    pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"   # libtpu, once
    python -m avatar_jax.compile --config configs/quickstart.py --topology v5p-128
    python -m avatar_jax.compile --config configs/bm_synthdyad.py:size=S --topology v6e-64 \
        --config.mesh.fsdp=8 --json /tmp/bm_v6e.json

Builds exactly what the trainer builds (`trainer.setup`: mesh, sharded state, the jitted step with
donation) on the devices of the TPU topology that libtpu describes, lowers it on abstract batches
of the config's shapes, and compiles it with the TPU compiler. Prints per-device memory (what
`compiled.memory_analysis()` reports: state + batch arguments, temporaries, outputs) and the
collectives of the partitioned program, so a mesh or batch size that does not fit, or a layout
that all-gathers more than intended, shows up before a pod is booked.

The compiler targets the topology's chip: attention kernels resolve to their TPU backend and
Mosaic reads the TPU generation from the mesh's devices (the ambient `jax.set_mesh`), not from
this host's CPU.

Topologies: `v5p-N`, `v4-N` (N TensorCores, two per chip), `v5e-N`/`v5litepod-N`, `v6e-N`
(N chips), or libtpu's own name with `--topology v5e:4x4`.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import json
import math
import os
import re

from absl import app, flags, logging
from ml_collections import config_flags

# jax (and everything importing it) is imported inside the functions: jax reads JAX_PLATFORMS
# when imported, and `run` sets it first.

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/x.py[:args]).",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p-128, v5e-256, v6e-64.")
_JSON = flags.DEFINE_string("json", None, "Also write the report to this JSON file.")
flags.mark_flags_as_required(["config", "topology"])

# (libtpu platform name, TensorCores per chip as counted in the slice name, mesh dims per slice)
_GENERATIONS = {"v4": ("v4", 2, 3), "v5p": ("v5p", 2, 3), "v5e": ("v5e", 1, 2),
                "v5litepod": ("v5e", 1, 2), "v6e": ("v6e", 1, 2)}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str                 # libtpu's, e.g. "v5p:4x4x4"
  chips: int
  host_bounds: tuple[int, int, int]   # chips per host (x, y, z)


def _grid(chips: int, dims: int) -> tuple[int, ...]:
  """The near-cubic power-of-two grid TPU slices use (16 → 4x4, 64 → 4x4x4, 128 → 4x4x8)."""
  if chips & (chips - 1):
    raise ValueError(f"a TPU slice has a power-of-two number of chips, got {chips}")
  e = chips.bit_length() - 1
  sizes = [2 ** (e // dims + (i >= dims - e % dims)) for i in range(dims)]
  return tuple(sizes)


def parse_topology(spec: str) -> Topology:
  """'v5p-128' (Cloud TPU accelerator type) or 'v5p:4x4x4' (libtpu) -> Topology."""
  if ":" in spec:
    gen, shape = spec.split(":", 1)
    dims = tuple(int(d) for d in shape.split("x"))
    chips = math.prod(dims)
  else:
    m = re.fullmatch(r"(v\d+[a-z]*|v5litepod)-(\d+)", spec)
    if not m or m.group(1) not in _GENERATIONS:
      raise ValueError(f"--topology {spec!r}: expected one of {sorted(_GENERATIONS)} followed by "
                       "-N (e.g. v5p-128, v5e-256, v6e-64) or libtpu's name (e.g. v5e:4x4)")
    gen, cores, ndim = _GENERATIONS[m.group(1)]
    if int(m.group(2)) % cores:
      raise ValueError(f"--topology {spec!r}: {m.group(1)} slices count {cores} TensorCores per "
                       "chip, so N must be a multiple of it")
    chips = int(m.group(2)) // cores
    # 3-D slices below 8 chips are one host's 2x2x1 (or 1x2x1).
    dims = _grid(chips, ndim) if ndim == 2 or chips >= 8 else _grid(chips, 2) + (1,)
  # A TPU VM host drives 4 chips (2x2) in pods; a single-host slice has all of them.
  host = (2, 2, 1) if chips >= 4 else (dims + (1, 1))[:3]
  if chips == 8 and len(dims) == 2:
    host = (2, 4, 1)   # the 8-chip v5e / v6e host
  return Topology(f"{gen}:{'x'.join(map(str, dims))}", chips, host)


def topology_devices(topology: Topology):
  """The abstract TPU devices of a slice (needs libtpu; no TPU)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.name,
                                        chip_config_name="default",
                                        chips_per_host_bounds=topology.host_bounds, num_slices=1)
  except Exception as e:  # pylint: disable=broad-except  (libtpu missing or name unknown)
    raise RuntimeError(
        f"could not describe TPU topology {topology.name} ({e}). Compiling for TPUs needs libtpu "
        "matching jax: pip install \"jax[tpu]==<installed jax version>\"") from e
  return desc.devices


def abstract_batch(config, system, mesh):
  """ShapeDtypeStructs of one global batch: each key's per-example shape from one generated
  example, the global batch size from the config, sharded like the trainer's batches."""
  import jax  # pylint: disable=g-import-not-at-top
  from avatar_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  data = copy.deepcopy(config.data)
  data.cache, data.synthdyad.cache = False, False
  data.batch_size, data.worker_count = 1, 0
  one = next(pipeline.make(data, "train", keys=system.data_spec().keys, shard_index=0,
                           shard_count=1))
  sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(pipeline.batch_axes(mesh)))
  return {k: jax.ShapeDtypeStruct((int(config.data.batch_size),) + v.shape[1:], v.dtype,
                                  sharding=sharding) for k, v in one.items()}


def collectives(hlo_text: str) -> dict[str, int]:
  """Count of each collective op in compiled HLO text (async starts counted once)."""
  counts = collections.Counter()
  for op in COLLECTIVES:
    # The op itself ("... all-reduce(" or "all-reduce-start("), not a use of its result
    # ("get-tuple-element(%all-reduce.3)").
    counts[op] = len(re.findall(rf"(?<![%\w-]){op}(?:-start)?\(", hlo_text))
  return dict(counts)


def compile_train_step(config, topology: Topology) -> dict:
  """Compiles the config's train step for `topology`; returns the report (see module doc)."""
  from avatar_jax import sharding, trainer  # pylint: disable=g-import-not-at-top
  devices = topology_devices(topology)
  mesh = sharding.make_mesh(dict(config.mesh), devices=devices)
  s = trainer.setup(config, mesh, fit=False, init_from=False, abstract=True)
  batch = abstract_batch(config, s.system, mesh)
  with trainer.use_mesh(mesh):
    lowered = s.train_step.lower(s.state, batch)
  compiled = lowered.compile()
  mem = compiled.memory_analysis()
  text = compiled.as_text()
  gib = lambda n: round(n / 2**30, 4)
  report = {
      "topology": topology.name, "devices": len(devices), "device_kind": devices[0].device_kind,
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "batch": int(config.data.batch_size), "params_m": round(s.num_params["trainable"] / 1e6, 3),
      "per_device_gib": {
          "arguments": gib(mem.argument_size_in_bytes), "outputs": gib(mem.output_size_in_bytes),
          "temporaries": gib(mem.temp_size_in_bytes), "aliased": gib(mem.alias_size_in_bytes),
          "total": gib(mem.argument_size_in_bytes + mem.output_size_in_bytes
                       + mem.temp_size_in_bytes - mem.alias_size_in_bytes)},
      "collectives": collectives(text),
      "tpu_kernels": text.count("tpu_custom_call"),
  }
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  topology = parse_topology(_TOPOLOGY.value)
  # What libtpu would otherwise ask the (absent) metadata server for, with a warning each.
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  if ":" not in _TOPOLOGY.value:
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", _TOPOLOGY.value)
  report = compile_train_step(_CONFIG.value, topology)
  logging.info("Compiled for %s: %s", topology.name, report)
  m = report["per_device_gib"]
  lines = [f"{report['device_kind']} x {report['devices']} ({topology.name}), "
           f"mesh {report['mesh']}, batch {report['batch']}, "
           f"{report['params_m']}M trainable parameters",
           "per device (GiB): " + ", ".join(f"{k} {v}" for k, v in m.items()),
           "collectives: " + ", ".join(f"{k} {v}" for k, v in report["collectives"].items()),
           f"Pallas TPU kernel calls: {report['tpu_kernels']}"]
  print("\n".join(lines))   # the tool's output (an entry point, not library code)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(report, f, indent=1)


def run():
  # This host compiles; it does not run on TPUs. Without this, JAX would try to open the TPU
  # that libtpu's presence suggests. libtpu reads the slice from the topology, not the metadata
  # server, which a non-TPU machine does not have.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  app.run(main)


if __name__ == "__main__":
  run()
