"""One of two processes of the multi-host check (tests/test_distributed.py starts both).

    python tests/multidevice/multihost_worker.py PROCESS_ID PORT CHECKPOINT_DIR OUT_DIR

Each process has 4 CPU devices; together they form a (2, 2, 2) mesh over 8. Process 0 writes the
gathered logits, greedy tokens, the loss of one SGD train step and the parameters after it to OUT_DIR; both write the
model after that step as one Orbax checkpoint, OUT_DIR/orbax.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["JAX_NUM_CPU_DEVICES"] = "4"
os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np
import optax
from flax import nnx, traverse_util

import neo_jax
from neo_jax import distributed
from neo_jax.train import train_step


def main() -> None:
    process_id, port, checkpoint, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
    distributed.initialize(f"127.0.0.1:{port}", 2, process_id, timeout_s=120)
    mesh = neo_jax.make_mesh(2, 2, 2)
    model = neo_jax.from_pretrained(checkpoint, mesh=mesh, progress=False)

    ids = np.load(out / "ids.npy")
    rows = len(ids) // 2
    batch = distributed.global_batch(ids[process_id * rows : (process_id + 1) * rows], mesh)
    assert (distributed.gather(batch) == ids).all(), "the global batch is not the rows in process order"

    logits = distributed.gather(nnx.jit(lambda m, x: m(x))(model, batch))
    tokens = neo_jax.generate(model, ids[:, :12], max_new_tokens=10)  # every host passes the same prompts
    loss = float(train_step(model, nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param), batch)["loss"])
    params = distributed.gather(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    neo_jax.save_pretrained(model, out / "orbax", format="orbax", progress=False)  # collective
    if distributed.is_main_process():
        np.save(out / "logits.npy", logits)
        np.save(out / "tokens.npy", tokens)
        flat = {"/".join(map(str, k)): v for k, v in traverse_util.flatten_dict(params).items()}
        np.savez(out / "params.npz", **flat)
        (out / "result.json").write_text(json.dumps({"loss": loss, "devices": len(mesh.devices.flat)}))
    distributed.barrier("done")


if __name__ == "__main__":
    main()
