"""Mesh construction and the one logical-axis rules table.

Parameters and activations are annotated with *logical* axis names (what the dimension is);
this table says which mesh axes each logical name is split over. Changing the parallelism of a
model means editing data here or in a config, never model code.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel + parameter sharding),
`context` (sequence parallel), `tensor` (heads / MLP hidden).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "tensor")

# logical name -> mesh axes (None: replicated). The only table in the codebase.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("time", "context"),
    ("height", "context"),   # image rows of video activations (a VAE's convolutions): halo exchange
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("conv_in", None),
    ("conv_out", "tensor"),
)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds a mesh from {axis: size}; one size may be -1 and takes the remaining devices.

  Axes missing from `shape` get size 1, so every mesh has all of MESH_AXES.
  """
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
  # Named in the errors below: on several hosts a mesh is often sized for the wrong host count.
  where = (f" ({jax.process_count()} processes x {jax.local_device_count()} local devices)"
           if devices is None and jax.process_count() > 1 else "")
  devices = list(jax.devices() if devices is None else devices)
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, found {dict(zip(MESH_AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"config.mesh {dict(shape)}: {len(devices)} devices{where} are not "
                       f"divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"found {len(devices)}{where}")
  # Auto axes: the compiler inserts the collectives that parameter sharding needs (FSDP
  # all-gathers of `embed`-sharded weights, tensor-parallel reductions). Under jax.make_mesh's
  # default Explicit axes, a batch-sharded activation times an fsdp-sharded kernel is a type
  # error unless every model resharded its weights by hand.
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=axis_types, devices=devices)


def logical_to_spec(logical: Sequence[str | None] | None, mesh: jax.sharding.Mesh,
                    rules=RULES) -> P:
  """Maps logical axis names to a PartitionSpec, dropping mesh axes of size 1 or used twice."""
  if logical is None:
    return P()
  table = dict(rules)
  used, out = set(), []
  for name in logical:
    if name is not None and name not in table:
      raise KeyError(f"logical axis {name!r} has no rule in sharding.RULES")
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
    used.update(axes)
    out.append(axes if len(axes) > 1 else (axes[0] if axes else None))
  return P(*out)


def tree_shardings(logical_tree, mesh, rules=RULES):
  """Pytree of logical-name tuples (or PartitionSpecs of names) -> pytree of NamedShardings."""
  is_leaf = lambda x: isinstance(x, P) or x is None or (
      isinstance(x, tuple) and all(isinstance(e, (str, type(None))) for e in x))
  return jax.tree.map(lambda l: NamedSharding(mesh, logical_to_spec(l, mesh, rules)),
                      logical_tree, is_leaf=is_leaf)


def batch_sharding(mesh, ndim: int = 1) -> NamedSharding:
  """Leading dimension split over the batch axes, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def mesh_axis_size(name: str) -> int:
  """Size of axis `name` of the ambient mesh (`jax.set_mesh`); 1 outside one or without it."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or name not in mesh.axis_names:
    return 1
  return int(mesh.shape[name])


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """Pins activation x to the rules' layout of its logical axes (e.g. ("batch", "time",
  "embed")) under the current mesh (`jax.set_mesh`); outside one it returns x unchanged.

  This is what makes the `context` axis split time in activations, and `batch` the batch, no
  matter what the compiler would otherwise propagate from the parameters.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, mesh))
