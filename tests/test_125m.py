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
