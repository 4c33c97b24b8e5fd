"""Device meshes and logical-axis rules: where every parameter, activation, batch and cache lives.

The model names each parameter's axes (``vocab``, ``embed``, ``heads``, ``mlp``, ``position``, ``layers``)
and each activation's (``batch``, ``heads``, ``mlp``, ``vocab``; the sequence and the residual stream's
features are unnamed, so replicated); rules map those names to the mesh axes ``("data", "fsdp", "tensor")``:

    batch -> (data, fsdp)    embed -> fsdp    heads, mlp, vocab -> tensor    anything else: replicated

A dimension whose size does not divide evenly over its mesh axes is replicated instead (GPT-Neo's vocabulary
of 50257 is prime to every mesh size), so any mesh works.

Activations are constrained (``constrain``) only under a mesh context, ``jax.set_mesh(mesh)`` or
``use_mesh``: the library's entry points (train step, evaluation, generation) enter their model's mesh
themselves, and without a mesh the constraints are inert. Without them XLA would follow the parameters'
fsdp split, and every device would hold the whole batch's activations.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping, Sequence
from typing import TypedDict

import jax
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")
DEFAULT_RULES: Mapping[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "lookup_batch": ("data",),  # embedding rows fresh from the lookup, split along embed over fsdp (model._lookup)
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, devices: Sequence | None = None) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh over ``devices`` (default: all of ``jax.devices()``); one size
    may be -1 to take the devices the others leave."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(
            f"mesh sizes must be positive, with at most one -1; got data={data}, fsdp={fsdp}, tensor={tensor}"
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into a mesh with {known} devices per replica")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs {math.prod(sizes)} devices, "
            f"but {len(devices)} are available"
        )
    axis_types = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh(tuple(sizes), AXES, axis_types, devices=devices)


class MeshSizes(TypedDict):
    """The sizes of a ``("data", "fsdp", "tensor")`` mesh: ``make_mesh(**sizes)``."""

    data: int
    fsdp: int
    tensor: int


def parse_mesh(text: str) -> MeshSizes:
    """``"D,F,T"`` (or ``"D.F.T"``, where commas are taken) as ``{"data": D, "fsdp": F, "tensor": T}``;
    ``make_mesh`` checks the sizes against the devices."""
    try:
        data, fsdp, tensor = (int(x) for x in str(text).replace(".", ",").split(","))
    except ValueError:
        raise ValueError(f"a mesh is three sizes D,F,T (data, fsdp, tensor), e.g. 1,8,1; got {text!r}") from None
    return MeshSizes(data=data, fsdp=fsdp, tensor=tensor)


def spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh | AbstractMesh | Mapping[str, int],
    rules: Mapping | None = None,
) -> PartitionSpec:
    """The ``PartitionSpec`` for an array with logical axis ``names``: each name's mesh axes from ``rules``,
    dropping axes of size 1, axes another dimension already uses, and shardings that do not divide evenly.
    ``mesh`` may also be just the axis sizes, e.g. ``{"data": 1, "fsdp": 8, "tensor": 1}``; rules naming an axis
    the mesh does not have are ignored."""
    rules = DEFAULT_RULES if rules is None else rules
    sizes = mesh.shape if isinstance(mesh, Mesh | AbstractMesh) else mesh
    used, out = set(), []
    for name, size in zip(names, shape, strict=True):
        wanted = rules.get(name, ())
        wanted = (wanted,) if isinstance(wanted, str) else wanted
        axes = tuple(a for a in wanted if sizes.get(a, 1) > 1 and a not in used)
        if axes and size % math.prod(sizes[a] for a in axes) == 0:
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        else:
            out.append(None)
    return PartitionSpec(*out)


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """``x`` with its dimensions split by their logical ``names`` over the mesh in context (see ``use_mesh``);
    unchanged outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec(names, x.shape, mesh))


def use_mesh(mesh: Mesh | None):
    """The context in which the model's activations follow ``mesh`` (``jax.set_mesh``); a no-op for None."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def shard_shape(shape: Sequence[int], partition: PartitionSpec, mesh: Mesh | Mapping[str, int]) -> tuple[int, ...]:
    """The shape of one device's shard of an array of ``shape`` split by ``partition``."""
    sizes = mesh.shape if isinstance(mesh, Mesh) else mesh
    parts = [math.prod(sizes[a] for a in ((p,) if isinstance(p, str) else p)) if p else 1 for p in partition]
    parts += [1] * (len(shape) - len(parts))
    return tuple(dim // n for dim, n in zip(shape, parts, strict=True))


def variable_sharding(variable: nnx.Variable, mesh: Mesh, rules: Mapping | None = None) -> NamedSharding:
    """Where a parameter (real or abstract) lives, from the logical names in its metadata."""
    names = variable.get_metadata()["out_sharding"]
    return NamedSharding(mesh, spec(names, variable.get_value().shape, mesh, rules))


def param_shardings(state, mesh: Mesh, rules: Mapping | None = None) -> dict:
    """``NamedSharding`` of every parameter of ``state`` (an ``nnx.State``), as a pure dict shaped like
    ``nnx.to_pure_dict(state)``."""
    return traverse_util.unflatten_dict(
        {path: variable_sharding(v, mesh, rules) for path, v in nnx.to_flat_state(state)}
    )


def shard_model(model, mesh: Mesh, rules: Mapping | None = None):
    """Move ``model``'s parameters onto ``mesh`` (in place) and return it."""
    state = nnx.state(model, nnx.Param)
    placed = jax.device_put(nnx.to_pure_dict(state), param_shardings(state, mesh, rules))
    nnx.replace_by_pure_dict(state, placed)
    nnx.update(model, state)
    return model


def batch_sharding(mesh: Mesh, shape: Sequence[int], rules: Mapping | None = None) -> NamedSharding:
    """Inputs ``[batch, ...]``: the batch split over the rules' batch axes (when it divides evenly)."""
    return NamedSharding(mesh, spec(("batch",) + (None,) * (len(shape) - 1), shape, mesh, rules))


def place_batch(rows: np.ndarray, mesh: Mesh | None, rules: Mapping | None = None):
    """A host batch ``[batch, ...]`` onto devices: split over the mesh's batch axes, or onto the default
    device without a mesh. Every process passes the whole batch and copies only its own devices' rows."""
    return place(rows, None if mesh is None else batch_sharding(mesh, rows.shape, rules))


def model_mesh(model) -> Mesh | None:
    """The mesh the model's parameters live on, or None for a model on one device."""
    leaf = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
    sharding = getattr(leaf, "sharding", None)
    mesh = sharding.mesh if isinstance(sharding, NamedSharding) else None
    return mesh if isinstance(mesh, Mesh) else None


def place(array: np.ndarray, sharding: NamedSharding | None):
    """A host array onto devices: only the shards each device owns are copied (also across hosts)."""
    if sharding is None:
        return jax.device_put(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def device_memory(device=None) -> int:
    """Bytes of memory one device has: what its runtime reports (``bytes_limit``: accelerators), else the host's
    physical memory (CPU devices share it; a container's cgroup limit when it has one)."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats()
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            memory = min(memory, int(open(limit).read()))  # noqa: SIM115 (one read)
    return memory


def check_fits(what: str, nbytes: float, advice: str) -> None:
    """A one-line ValueError when ``nbytes`` (``what`` needs them on one device) exceed ``device_memory``: refused
    from the shapes' arithmetic, before anything is allocated."""
    memory = device_memory()
    if nbytes > memory:
        raise ValueError(
            f"{what} needs {nbytes / 2**30:,.1f} GiB on a device, more than its {memory / 2**30:,.1f} GiB: {advice}"
        )
