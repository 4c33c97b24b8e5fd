"""What every benchmark shares: the same random weights on both sides, and median timings."""

from __future__ import annotations

import statistics
import tempfile
import time

import torch
import transformers

import neo_jax

# Common English words, for synthetic prompts and documents.
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "an",
    "were",
    "are",
    "which",
    "this",
    "be",
    "or",
    "had",
    "it",
    "not",
]


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` (the machine is noisy: medians, not means)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def same_weights(config_path: str, **load_options):
    """A random-weight transformers GPT-Neo (seed 0) and the same weights loaded into neo_jax."""
    transformers.logging.set_verbosity_error()
    config = transformers.GPTNeoConfig.from_json_file(config_path)
    torch.manual_seed(0)
    reference = transformers.GPTNeoForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        model = neo_jax.from_pretrained(directory, progress=False, **load_options)
    return reference, model
