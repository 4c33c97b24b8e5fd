"""Embedding a corpus: `neo-jax embed` against sentence-transformers' ``encode`` (which also sorts by length), side by
side in one run on the same random 125M-shape weights (seed 0, a ``GPTNeoModel`` in SGPT's layout, mean pooling),
float32, on this machine's CPU.

    python benchmarks/embed.py [--documents 512] [--batch-size 32] [--rss-documents 2000]

- Throughput: documents of mixed lengths (uniform in [8, 512] tokens of English words), batch 32. neo-jax's first
  run compiles its programs (its persistent compilation cache is off for it); the later runs are what a corpus
  bigger than a few hundred documents sees. Documents/s and tokens/s, medians of ``--repeats`` runs each; the
  two outputs are checked equal (relative 1e-4).
- Memory: peak RSS of `neo-jax embed` (a 2-layer model, so that the corpus dominates) on ``--rss-documents`` and
  on 10x as many, each in its own process.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
import transformers
from common import WORDS

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "gpt2-tokenizer"


def corpus(count: int, seed: int = 0, low: int = 8, high: int = 512) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(low, high + 1)))) for _ in range(count)]


def sgpt_directory(directory: Path, config: transformers.GPTNeoConfig) -> Path:
    """Random weights (seed 0) saved by sentence-transformers: GPTNeoModel, mean pooling."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    torch.manual_seed(0)
    base = directory / "base"
    transformers.GPTNeoModel(config).eval().save_pretrained(base)
    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(TOKENIZER)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(base)
    transformer = Transformer(str(base), max_seq_length=config.max_position_embeddings)
    model = SentenceTransformer(modules=[transformer, Pooling(config.hidden_size, pooling_mode="mean")], device="cpu")
    model.save(str(directory / "sgpt"))
    return directory / "sgpt"


def neo_jax_embed(model: Path, data: Path, out: Path, batch: int, cache: str) -> float:
    command = [sys.executable, "-m", "neo_jax.cli", "embed", "--model", str(model), "--data", str(data)]
    command += ["--output", str(out), "--batch-size", str(batch), "--overwrite", "--compilation-cache", cache]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def peak_rss_mb(model: Path, data: Path, out: Path) -> float:
    """Peak resident memory of one `neo-jax embed` process, MiB."""
    code = (
        "import resource, sys; from neo_jax.cli import main; "
        f"status = main(['embed', '--model', {str(model)!r}, '--data', {str(data)!r}, '--output', {str(out)!r}, "
        "'--overwrite', '--compilation-cache', 'none']); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr); sys.exit(status)"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return round(float(done.stderr.strip().splitlines()[-1]), 1)


def write(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "gpt-neo-125M.json"))
    parser.add_argument("--documents", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-documents", type=int, default=2000)
    args = parser.parse_args()
    from sentence_transformers import SentenceTransformer

    transformers.logging.set_verbosity_error()
    config = transformers.GPTNeoConfig.from_json_file(args.config)
    texts = corpus(args.documents)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = sgpt_directory(tmp, config)
        data = write(tmp / "docs.jsonl", texts)
        tokens = sum(len(ids) for ids in transformers.AutoTokenizer.from_pretrained(model)(texts)["input_ids"])
        reference = SentenceTransformer(str(model), device="cpu")
        theirs, times = None, []
        for _ in range(args.repeats):
            start = time.perf_counter()
            theirs = reference.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)
            times.append(time.perf_counter() - start)
        st_seconds = statistics.median(times)
        cache = str(tmp / "jax-cache")
        first = neo_jax_embed(model, data, tmp / "out.npy", args.batch_size, "none")
        neo_jax_embed(model, data, tmp / "out.npy", args.batch_size, cache)  # fills the cache
        warm = statistics.median(
            neo_jax_embed(model, data, tmp / "out.npy", args.batch_size, cache) for _ in range(args.repeats)
        )
        ours = np.load(tmp / "out.npy")
        error = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
        small = {k: v for k, v in config.to_dict().items() if k != "attention_layers"}
        small = transformers.GPTNeoConfig(**small | {"num_layers": 2, "attention_types": [[["global", "local"], 1]]})
        rss_model = sgpt_directory(tmp / "small", small)
        rss = {}
        for count in (args.rss_documents, 10 * args.rss_documents):
            rss[count] = peak_rss_mb(
                rss_model, write(tmp / f"rss-{count}.jsonl", corpus(count, 1, 8, 64)), tmp / "r.npy"
            )
    rate = lambda seconds: round(args.documents / seconds, 2)
    result = {
        "benchmark": "embed",
        "config": args.config,
        "device": str(jax.devices()[0]),
        "documents": args.documents,
        "tokens": tokens,
        "batch_size": args.batch_size,
        "sentence_transformers": {"seconds": round(st_seconds, 2), "documents_per_s": rate(st_seconds)},
        "neo_jax": {
            "seconds": round(warm, 2),
            "documents_per_s": rate(warm),
            "tokens_per_s": round(tokens / warm, 1),
            "first_run_seconds_compiling": round(first, 2),
            "first_run_documents_per_s": rate(first),
        },
        "ratio": round(st_seconds / warm, 2),
        "ratio_first_run": round(st_seconds / first, 2),
        "max_relative_difference": error,
        "peak_rss_mb": rss,
        "rss_growth_mb_for_10x_documents": round(rss[10 * args.rss_documents] - rss[args.rss_documents], 1),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
