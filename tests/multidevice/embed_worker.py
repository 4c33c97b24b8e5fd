"""One of two processes of the multi-host embedding check (tests/test_distributed.py starts both).

    python tests/multidevice/embed_worker.py PROCESS_ID PORT MODEL CORPUS OUT

Each process has 2 CPU devices; together they form a (2, 2, 1) mesh. Both run `neo-jax embed` on the same corpus
into one output, as `tpu_scripts/run.sh` runs a command on every worker of a slice.
"""

from __future__ import annotations

import os
import sys

os.environ["JAX_NUM_CPU_DEVICES"] = "2"
os.environ["JAX_PLATFORMS"] = "cpu"


def main() -> int:
    process_id, port, model, corpus, out = sys.argv[1:6]
    os.environ.update(
        NEO_JAX_DISTRIBUTED="1",
        NEO_JAX_COORDINATOR=f"127.0.0.1:{port}",
        NEO_JAX_NUM_PROCESSES="2",
        NEO_JAX_PROCESS_ID=process_id,
    )
    from neo_jax.cli import main as neo_jax

    command = ["embed", "--model", model, "--data", corpus, "--output", out, "--mesh", "2,2,1", "--batch-size", "4"]
    return neo_jax([*command, "--compilation-cache", "none"])


if __name__ == "__main__":
    sys.exit(main())
