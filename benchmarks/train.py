"""Train-step speed: neo_jax vs transformers + torch.optim.AdamW, same random 125M-shape weights and batch.

    python benchmarks/train.py [--batch 4] [--seq 512] [--repeats 5] [--dtype float32|bfloat16]
                               [--lora-rank R [--lora-targets q_proj,v_proj]]

Prints one JSON object: tokens/s of a full AdamW step (forward, backward, update) on each side (medians of
--repeats steps after warm-up), their ratio, neo_jax's first-step (compile) time, and model FLOPs
utilisation as ``neo-jax train`` reports it: ``neo_jax.aot.train_flops`` (6 x matmul parameters + 12 x layers x
hidden x seq FLOPs per token) over ``neo_jax.aot.peak_flops`` (a TPU's published peak, elsewhere the best rate
of a large matmul in the same dtype). The reference runs on CUDA when PyTorch sees a
GPU, with bfloat16 autocast for --dtype bfloat16 (float32 weights and AdamW state on both sides).
With --lora-rank both sides train LoRA adapters only (alpha 2R): neo_jax.lora against PEFT, and the MFU
line is left out (the frozen weights get no gradient, so 6 x parameters is not the work done).
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

from neo_jax.aot import peak_flops, train_flops
from neo_jax.config import DTYPES, REMAT
from neo_jax.train import make_optimizer, train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/gpt-neo-125M.json")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--remat", choices=REMAT, default="none")
    parser.add_argument("--attention", default="auto", help="neo_jax.attention implementation")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank only")
    parser.add_argument("--lora-targets", default="q_proj,v_proj")
    args = parser.parse_args()

    reference, model = same_weights(args.config, dtype=args.dtype, attention=args.attention)
    targets = tuple(args.lora_targets.split(","))
    if args.lora_rank:
        import peft

        from neo_jax import lora

        lora.add(model, lora.LoRAConfig(r=args.lora_rank, alpha=2 * args.lora_rank, targets=targets))
        settings = peft.LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=list(targets))
        reference = peft.get_peft_model(reference, settings)
    config = reference.config
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq))
    jax_ids = jnp.asarray(ids, jnp.int32)
    optimizer = make_optimizer(model, learning_rate=1e-5)

    def ours():
        jax.block_until_ready(train_step(model, optimizer, jax_ids, remat=args.remat))

    start = time.perf_counter()
    ours()
    first_step = time.perf_counter() - start
    ours_s = median_seconds(ours, args.repeats)

    tokens = args.batch * args.seq
    result = {
        "benchmark": "train",
        "config": args.config,
        "device": str(jax.devices()[0]),
        "dtype": args.dtype,
        "remat": args.remat,
        "attention": args.attention,
        "batch": args.batch,
        "seq": args.seq,
        "lora_rank": args.lora_rank,
        "neo_jax_tokens_per_s": round(tokens / ours_s, 1),
        "neo_jax_first_step_s": round(first_step, 2),
    }
    if not args.lora_rank:
        flops = train_flops(model.config, args.batch, args.seq)[0]  # as neo-jax train's mfu
        result["mfu"] = round(flops / ours_s / peak_flops(jax.devices()[:1], args.dtype), 3)
    if not args.skip_transformers:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        reference.to(device).train()
        trainable = [p for p in reference.parameters() if p.requires_grad]  # all of them, or the adapters
        torch_optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        torch_ids = torch.as_tensor(ids, device=device)
        autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
        result["transformers_device"] = device

        def theirs():
            with autocast:
                loss = reference(torch_ids, labels=torch_ids).loss
            torch_optimizer.zero_grad()
            loss.backward()
            torch_optimizer.step()
            if device == "cuda":
                torch.cuda.synchronize()

        theirs()
        theirs_s = median_seconds(theirs, args.repeats)
        result["transformers_tokens_per_s"] = round(tokens / theirs_s, 1)
        result["ratio"] = round(theirs_s / ours_s, 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
