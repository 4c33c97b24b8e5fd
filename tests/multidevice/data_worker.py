"""One of two processes of the data-loading check (tests/test_pretrain.py starts both).

    python tests/multidevice/data_worker.py PROCESS_ID PORT DATA_DIR OUT_DIR

Each process has 2 CPU devices; together they form a (1, 4, 1) mesh. Each loads the batches of steps 3-5 of a
prepared directory and writes the row ranges it read (rows-ID.json); process 0 writes the gathered global
batches (batch-STEP.npy).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["JAX_NUM_CPU_DEVICES"] = "2"
os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np

from neo_jax import data, distributed
from neo_jax.sharding import make_mesh


class Recorded(data.Batches):
    """Batches that note every row range they read."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: dict[int, list] = {}

    def rows(self, step, start=0, stop=None):
        self.read.setdefault(step, []).append((start, self.batch_size if stop is None else stop))
        return super().rows(step, start, stop)


def main() -> None:
    process_id, port, directory, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
    distributed.initialize(f"127.0.0.1:{port}", 2, process_id, timeout_s=120)
    mesh = make_mesh(1, 4, 1)
    batches = Recorded(data.TokenData(directory), seq_len=16, batch_size=8, seed=1)
    loader = data.Loader(batches, mesh, start=3)
    gathered = {}
    for step in (3, 4, 5):
        array, _ = loader.next()
        gathered[step] = distributed.gather(array)
    loader.close()
    (out / f"rows-{process_id}.json").write_text(json.dumps({s: batches.read[s] for s in (3, 4, 5)}))
    if distributed.is_main_process():
        for step, batch in gathered.items():
            np.save(out / f"batch-{step}.npy", np.asarray(batch))
    distributed.barrier("done")


if __name__ == "__main__":
    main()
