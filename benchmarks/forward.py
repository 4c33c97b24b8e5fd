"""Full forward pass (logits for every position), neo_jax vs transformers, same random weights, side by side.

    python benchmarks/forward.py [--config configs/gpt-neo-125M.json] [--batch 1] [--seq 512] [--repeats 7]

Prints one JSON object: tokens/s of each, their ratio (neo_jax / transformers, medians of --repeats
timed runs after one warm-up each), and neo_jax's first-call (trace + compile) time.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import median_seconds, same_weights
from flax import nnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/gpt-neo-125M.json")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--attention", default="auto", help="neo_jax.attention implementation")
    args = parser.parse_args()

    reference, model = same_weights(args.config, attention=args.attention)
    config = reference.config

    ids = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq))
    torch_ids, jax_ids = torch.as_tensor(ids), jnp.asarray(ids, jnp.int32)
    forward = nnx.jit(lambda m, x: m(x))

    start = time.perf_counter()
    jax.block_until_ready(forward(model, jax_ids))
    first_call = time.perf_counter() - start

    def run_torch():
        with torch.no_grad():
            reference(torch_ids)

    run_torch()  # warm-up
    tokens = args.batch * args.seq
    torch_s = median_seconds(run_torch, args.repeats)
    jax_s = median_seconds(lambda: jax.block_until_ready(forward(model, jax_ids)), args.repeats)
    print(
        json.dumps(
            {
                "benchmark": "forward",
                "config": args.config,
                "batch": args.batch,
                "seq": args.seq,
                "attention": args.attention,
                "device": str(jax.devices()[0]),
                "transformers_tokens_per_s": round(tokens / torch_s, 1),
                "neo_jax_tokens_per_s": round(tokens / jax_s, 1),
                "ratio": round(torch_s / jax_s, 3),
                "neo_jax_first_call_s": round(first_call, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
