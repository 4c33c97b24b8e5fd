"""Greedy generation speed, neo_jax vs transformers (PyTorch), on the same random 125M-shape weights.

    python benchmarks/generate.py [--batch-sizes 1,8] [--prompt-len 32] [--new-tokens 128]
                                  [--prefill-len 512] [--repeats 3] [--dtype float32|bfloat16]
                                  [--weights float32|bfloat16|int8]

Prints one JSON object. For each batch size: both decode rates in new tokens/s (medians of --repeats runs,
each a whole ``generate`` call, after a warm-up) and their ratio; neo_jax's first call (compile included).
At batch 1 also the fraction of the memory roofline: parameter bytes per token / seconds per token /
measured memory bandwidth. "prefill": the time to the first token of a --prefill-len prompt, both sides.
transformers runs only in float32 on the CPU; --dtype bfloat16 is for accelerators. --weights is neo_jax's
weight format (neo_jax.quantize; default: --dtype), the reference staying in float32.

    python benchmarks/generate.py --pair TARGET DRAFT --corpus FILES... [--draft-tokens 4]

Speculative decoding instead, on a trained pair (Hugging Face directories, e.g. ``neo-jax convert RUN DIR --to
hf`` of two ``neo-jax train`` runs on the same text): greedy new tokens/s at batch 1 and 8 of plain decoding,
the draft model and n-gram drafting, each with its speedup over plain and its acceptance rate, on prompts
from --corpus (the training text: "open-ended") and on prompts that end by starting to repeat a passage they
hold ("grounded"); and at batch 1 transformers' own plain, assisted (``assistant_model``) and prompt-lookup
generation of the same pair.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np
import torch
from common import median_seconds, same_weights
from flax import nnx

import neo_jax
from neo_jax.config import DTYPES, WEIGHTS


def memory_bandwidth() -> float:
    """Bytes/s of a large multi-threaded reduction (what a memory-bound decode step can at best stream)."""
    x = torch.ones(2**28)  # 1 GiB
    x.sum()
    return x.numel() * 4 / median_seconds(lambda: x.sum(), 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/gpt-neo-125M.json")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--weights", choices=WEIGHTS, help="neo_jax's weight format (default: --dtype)")
    parser.add_argument("--skip-transformers", action="store_true", help="neo_jax only (e.g. on a GPU)")
    parser.add_argument("--pair", nargs=2, metavar=("TARGET", "DRAFT"), help="speculative decoding (see above)")
    parser.add_argument("--corpus", nargs="+", help="the pair's training text (prompts are cut from it)")
    parser.add_argument("--draft-tokens", type=int, default=4)
    args = parser.parse_args()
    if args.pair:
        print(json.dumps(speculative(args), indent=1))
        return

    reference, model = same_weights(args.config, dtype=args.dtype, weights=args.weights or args.dtype)
    config = reference.config
    rng = np.random.default_rng(0)

    def ours(ids, new):
        return lambda: neo_jax.generate(model, ids, max_new_tokens=new)

    def theirs(ids, new):
        return transformers_greedy(reference, ids, new)

    result = {
        "benchmark": "generate",
        "config": args.config,
        "dtype": args.dtype,
        "weights": args.weights or args.dtype,
        "device": str(jax.devices()[0]),
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
    }
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))  # what a decode step reads
    bandwidth = memory_bandwidth()
    result["memory_bandwidth_gb_s"] = round(bandwidth / 1e9, 2)
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        ids = rng.integers(0, config.vocab_size, (batch, args.prompt_len))
        start = time.perf_counter()
        ours(ids, args.new_tokens)()
        first_call = time.perf_counter() - start
        ours_s = median_seconds(ours(ids, args.new_tokens), args.repeats)
        entry = {
            "neo_jax_tokens_per_s": round(batch * args.new_tokens / ours_s, 1),
            "neo_jax_first_call_s": round(first_call, 2),
        }
        if not args.skip_transformers:
            theirs(ids, 4)()  # warm-up
            theirs_s = median_seconds(theirs(ids, args.new_tokens), args.repeats)
            entry["transformers_tokens_per_s"] = round(batch * args.new_tokens / theirs_s, 1)
            entry["ratio"] = round(theirs_s / ours_s, 3)
        if batch == 1:
            entry["roofline_fraction"] = round(param_bytes / (ours_s / args.new_tokens) / bandwidth, 3)
        result[f"decode_batch_{batch}"] = entry

    ids = rng.integers(0, config.vocab_size, (1, args.prefill_len))
    ours(ids, 1)()
    entry = {"neo_jax_s": round(median_seconds(ours(ids, 1), args.repeats), 4)}
    if not args.skip_transformers:
        theirs(ids, 1)()
        entry["transformers_s"] = round(median_seconds(theirs(ids, 1), args.repeats), 4)
        entry["ratio"] = round(entry["transformers_s"] / entry["neo_jax_s"], 3)
    result[f"prefill_{args.prefill_len}"] = entry
    print(json.dumps(result, indent=1))


def speculative(args) -> dict:
    """The --pair benchmark."""
    import transformers

    target, draft = (neo_jax.from_pretrained(d, progress=False) for d in args.pair)
    references = [transformers.GPTNeoForCausalLM.from_pretrained(d).eval() for d in args.pair]
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.pair[0])
    text = " ".join(Path(f).read_text() for f in args.corpus)
    corpus = np.array(tokenizer(text)["input_ids"])
    rng = np.random.default_rng(0)
    k, new = args.draft_tokens, args.new_tokens

    def prompts(batch: int, grounded: bool) -> np.ndarray:
        starts = rng.integers(0, len(corpus) - 200, batch)
        if not grounded:  # a window of the training text, to be continued
            return np.stack([corpus[s : s + args.prompt_len] for s in starts])
        return np.stack([np.concatenate([corpus[s : s + 96], corpus[s : s + 8]]) for s in starts])  # then repeat

    def ours(ids, **kw):
        statistics: dict = {}
        run = lambda: neo_jax.generate(target, ids, max_new_tokens=new, statistics=statistics, **kw)
        run()  # compile
        seconds = median_seconds(run, args.repeats)
        rate = statistics["accepted_tokens"] / statistics["draft_tokens"] if statistics else None
        return seconds, None if rate is None else round(rate, 3)

    result = {"benchmark": "generate --pair", "pair": args.pair, "draft_tokens": k, "new_tokens": new}
    result["parameters"] = [m.config.num_params() for m in (target, draft)]
    for batch in (1, 8):
        for kind in ("open-ended", "grounded"):
            ids = prompts(batch, kind == "grounded")
            plain, _ = ours(ids)
            entry = {"plain_tokens_per_s": round(batch * new / plain, 1)}
            for name, proposer in (("draft", draft), ("ngram", "ngram")):
                seconds, rate = ours(ids, draft=proposer, num_draft_tokens=k)
                entry[name] = {
                    "tokens_per_s": round(batch * new / seconds, 1),
                    "speedup": round(plain / seconds, 3),
                    "acceptance": rate,
                }
            if batch == 1 and not args.skip_transformers:
                entry["transformers"] = transformers_rates(references, ids, new, k, args.repeats)
            result[f"batch_{batch}_{kind}"] = entry
    return result


def transformers_greedy(reference, ids, new: int, **extra):
    """A call of transformers' greedy ``generate`` of exactly ``new`` tokens (``extra``: its other keywords)."""

    def run():
        with torch.no_grad():
            reference.generate(
                torch.as_tensor(ids),
                attention_mask=torch.ones(ids.shape, dtype=torch.long),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                **extra,
            )

    return run


def transformers_rates(references, ids, new: int, k: int, repeats: int) -> dict:
    """transformers' tokens/s at batch 1: plain, assisted by the draft, and prompt lookup."""
    reference, assistant = references
    modes = {"plain": {}, "assisted": {"assistant_model": assistant}, "prompt_lookup": {"prompt_lookup_num_tokens": k}}
    rates = {}
    for name, extra in modes.items():
        run = transformers_greedy(reference, ids, new, **extra)
        run()
        rates[name] = round(new / median_seconds(run, repeats), 1)
    rates["assisted_speedup"] = round(rates["assisted"] / rates["plain"], 3)
    rates["prompt_lookup_speedup"] = round(rates["prompt_lookup"] / rates["plain"], 3)
    return rates


if __name__ == "__main__":
    main()
