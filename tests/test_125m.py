"""The full GPT-Neo 125M shape (random weights), 600 tokens: more than two local windows."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import neo_jax
from tests.conftest import hf_logits, random_ids

pytestmark = pytest.mark.slow


def test_125m_logits_match_transformers(tmp_path, save_hf):
    config = transformers.GPTNeoConfig.from_json_file("configs/gpt-neo-125M.json")
    torch.manual_seed(0)
    hf = transformers.GPTNeoForCausalLM(config).eval()
    directory = save_hf(hf)
    model = neo_jax.from_pretrained(directory, progress=False)
    assert model.config.num_params() == sum(p.numel() for p in hf.parameters()) == 125_198_592

    ids = random_ids(1, 600, config.vocab_size, seed=5)
    ref = hf_logits(hf, ids)
    ours = np.asarray(model(jnp.asarray(ids)))
    delta = np.abs(ours - ref).max()
    print(f"125M float32 max |Δlogit| over 600 tokens: {delta:.3g}")
    assert delta <= 1e-4


@pytest.mark.parametrize("implementation", ["dense", "blockwise"])
def test_125m_long_left_padded_batch(save_hf, implementation):
    """1100 tokens (past DENSE_UP_TO, so `auto` is blockwise there) in a batch whose second row is left-padded
    by 300: every real token's logits within 1e-4 of transformers, for each implementation."""
    config = transformers.GPTNeoConfig.from_json_file("configs/gpt-neo-125M.json")
    torch.manual_seed(1)
    hf = transformers.GPTNeoForCausalLM(config).eval()
    model = neo_jax.from_pretrained(save_hf(hf), attention=implementation, progress=False)
    ids = random_ids(2, 1100, config.vocab_size, seed=6)
    mask = np.ones_like(ids)
    mask[1, :300] = 0
    real = mask.astype(bool)
    delta = np.abs(
        np.asarray(model(jnp.asarray(ids), attention_mask=mask))[real] - hf_logits(hf, ids, mask)[real]
    ).max()
    print(f"125M float32 {implementation} max |Δlogit| over 2 x 1100 tokens, left-padded: {delta:.3g}")
    assert delta <= 1e-4
