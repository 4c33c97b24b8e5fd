"""Shared helpers: random-weight reference models built with transformers, never downloaded."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

# Tests never download: the hub and datasets libraries work from local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# libtpu is installed for the ahead-of-time TPU compiles: JAX itself runs on the CPU and probes for no chip.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest
import torch
import transformers

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "gpt2-tokenizer"

# Small enough to be fast, large enough that the window (16) is crossed and heads are split.
SMALL = dict(
    vocab_size=320,
    hidden_size=64,
    num_layers=4,
    num_heads=4,
    attention_types=[[["global", "local"], 2]],
    window_size=16,
    max_position_embeddings=256,
    bos_token_id=0,
    eos_token_id=0,
)


def make_hf_model(seed: int = 0, **overrides) -> transformers.GPTNeoForCausalLM:
    """A transformers GPT-Neo with every parameter random, LayerNorms and biases included, so that a
    wrongly mapped bias or scale cannot hide behind transformers' zero/one initialisation."""
    config = transformers.GPTNeoConfig(**{**SMALL, **overrides})
    torch.manual_seed(seed)
    model = transformers.GPTNeoForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, 0.05)
    return model


def hf_logits(model, input_ids, attention_mask=None, position_ids=None) -> np.ndarray:
    as_torch = lambda x: None if x is None else torch.as_tensor(np.asarray(x), dtype=torch.long)
    with torch.no_grad():
        out = model(as_torch(input_ids), attention_mask=as_torch(attention_mask), position_ids=as_torch(position_ids))
    return out.logits.float().numpy()


@contextlib.contextmanager
def backend_compiles():
    """Collects one entry per program compiled inside the block: each XLA backend compilation, and each program
    taken from JAX's persistent compilation cache instead (CI runs with one, and a hit there is a program
    that a process's own caches missed, which is what these tests count)."""
    import jax

    compiles = []

    def compiled(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    def taken_from_disk(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(compiled)
    jax.monitoring.register_event_listener(taken_from_disk)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(compiled)
        jax.monitoring.unregister_event_listener(taken_from_disk)


def random_ids(batch: int, seq: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq), dtype=np.int32)


@pytest.fixture
def save_hf(tmp_path):
    """save_hf(model, name="hf", **save_pretrained_kwargs) -> directory holding the saved model."""

    def save(model, name: str = "hf", **kwargs) -> Path:
        directory = tmp_path / name
        model.save_pretrained(directory, **kwargs)
        return directory

    return save


# A 2-layer GPT-Neo with GPT-2's vocabulary (make_hf_model's overrides), for the tests that need real text.
GPT2_VOCAB = dict(
    vocab_size=50257, num_layers=2, attention_types=[[["global", "local"], 1]], eos_token_id=50256, bos_token_id=50256
)


def save_gpt2_vocab_model(directory: Path, **overrides) -> Path:
    """A ``GPT2_VOCAB`` model saved with the tokenizer in ``directory``, as a hub download would be."""
    hf = make_hf_model(**GPT2_VOCAB, **overrides)
    hf.save_pretrained(directory)
    transformers.GPT2TokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def gpt2_model_dir(tmp_path_factory) -> Path:
    return save_gpt2_vocab_model(tmp_path_factory.mktemp("gpt2-vocab-model"))
