"""Full forward pass (logits for every position), neo_jax vs transformers, same random weights, side by side.

    python benchmarks/forward.py [--config configs/gpt-neo-125M.json] [--batch 1] [--seq 512] [--repeats 7]

Prints one JSON object: tokens/s of each, their ratio (neo_jax / transformers, medians of --repeats
timed runs after one warm-up each), and neo_jax's first-call (trace + compile) time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

import neo_jax


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/gpt-neo-125M.json")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    transformers.logging.set_verbosity_error()
    config = transformers.GPTNeoConfig.from_json_file(args.config)
    torch.manual_seed(0)
    reference = transformers.GPTNeoForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        model = neo_jax.from_pretrained(directory, progress=False)

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
