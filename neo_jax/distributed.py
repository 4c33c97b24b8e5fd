"""Multi-host runs (TPU pod slices, several GPU or CPU hosts): one process per host, JAX's multi-controller
runtime underneath. Every process runs the same program over a mesh spanning all hosts' devices.

    neo_jax.distributed.initialize()            # first, before anything touches a device
    mesh = neo_jax.make_mesh(data=-1, fsdp=8)   # over every device of every host
    model = neo_jax.from_pretrained(src, mesh=mesh)     # each host places only its own shards
    batch = neo_jax.distributed.global_batch(local_rows, mesh)
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from neo_jax.sharding import batch_sharding


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: list[int] | None = None,
    timeout_s: int = 300,
) -> None:
    """Join the other processes. On Cloud TPU every argument is discovered automatically; elsewhere pass
    the coordinator's ``host:port``, the number of processes and this one's id (or set
    ``NEO_JAX_COORDINATOR``, ``NEO_JAX_NUM_PROCESSES``, ``NEO_JAX_PROCESS_ID``). CPU hosts exchange data
    through gloo. Call it once, before any other JAX work."""
    coordinator_address = coordinator_address or os.environ.get("NEO_JAX_COORDINATOR")
    if num_processes is None and "NEO_JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["NEO_JAX_NUM_PROCESSES"])
    if process_id is None and "NEO_JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["NEO_JAX_PROCESS_ID"])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only used by CPU devices
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=timeout_s,
    )


def is_main_process() -> bool:
    return jax.process_index() == 0


def log(*values, **kwargs) -> None:
    """``print`` to stderr from process 0 only, so a pod's output is not repeated once per host."""
    if is_main_process():
        print(*values, file=sys.stderr, flush=True, **kwargs)


def global_batch(local_rows: np.ndarray, mesh, rules=None) -> jax.Array:
    """Assemble one global batch from every process's own rows (``[local_batch, ...]``, the same shape on
    every host), split over the mesh's batch axes."""
    local_rows = np.asarray(local_rows)
    global_shape = (local_rows.shape[0] * jax.process_count(), *local_rows.shape[1:])
    return jax.make_array_from_process_local_data(batch_sharding(mesh, global_shape, rules), local_rows, global_shape)


def gather(tree):
    """Every array of ``tree`` as a full numpy array on every process (for checks, exports and logging)."""
    return multihost_utils.process_allgather(tree, tiled=True)


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is True on any (e.g. one host was told to stop)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def barrier(name: str) -> None:
    """Wait until every process reaches the same ``name``d point (nothing to wait for in one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
