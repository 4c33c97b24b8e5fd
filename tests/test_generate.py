"""Generation against transformers' GPTNeoForCausalLM.generate, samplers, the ring-buffer cache, bad input."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import neo_jax
from neo_jax import generation as gen
from tests.conftest import SMALL, TOKENIZER_DIR, backend_compiles

PAD = 5  # non-zero: transformers' beam search fills with EOS when pad_token_id is 0 ("0 or eos")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small model with transformers' own initialisation (its greedy outputs vary, unlike scaled-up
    weights) and a window of 8, so that 40 new tokens wrap the local ring buffers several times."""
    config = transformers.GPTNeoConfig(**{**SMALL, "window_size": 8})
    torch.manual_seed(0)
    hf = transformers.GPTNeoForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("small")
    hf.save_pretrained(directory)
    return hf, neo_jax.from_pretrained(directory, progress=False)


def left_padded(lengths, vocab, seed=0):
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.full((len(lengths), width), PAD, np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = rng.integers(1, vocab, n)
        mask[row, width - n :] = 1
    return ids, mask


def hf_generate(hf, ids, mask, **kwargs):
    with torch.no_grad():
        out = hf.generate(
            torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), pad_token_id=PAD, do_sample=False, **kwargs
        )
    return out.numpy()


def assert_same_tokens(ours, ref, pad=PAD):
    """transformers trims to the longest row; neo_jax always returns prompt + max_new_tokens, padded."""
    assert (ours[:, : ref.shape[1]] == ref).all(), np.argwhere(ours[:, : ref.shape[1]] != ref)[:5]
    assert (ours[:, ref.shape[1] :] == pad).all()


def frequent_token(tokens):
    values, counts = np.unique(tokens, return_counts=True)
    return int(values[np.argsort(-counts)[1]])


# ------------------------------------------------------------------------------------------- greedy, beams
def test_greedy_matches_transformers_with_eos_and_padding(small):
    hf, model = small
    ids, mask = left_padded([5, 11, 3, 8], SMALL["vocab_size"])
    free = hf_generate(hf, ids, mask, max_new_tokens=40, eos_token_id=None)
    assert_same_tokens(gen.generate(model, ids, mask, max_new_tokens=40, pad_token_id=PAD), free)
    # an EOS that some rows produce: those rows stop, and are padded, while the others go on
    eos = frequent_token(free[:, ids.shape[1] :])
    ref = hf_generate(hf, ids, mask, max_new_tokens=40, eos_token_id=eos)
    assert (ref[:, ids.shape[1] :] == eos).any()
    ours = gen.generate(model, ids, mask, max_new_tokens=40, eos_token_id=eos, pad_token_id=PAD)
    assert_same_tokens(ours, ref)


def test_greedy_with_repetition_penalty_matches_transformers(small):
    hf, model = small
    ids, mask = left_padded([6, 9], SMALL["vocab_size"], seed=3)
    ref = hf_generate(hf, ids, mask, max_new_tokens=30, eos_token_id=None, repetition_penalty=1.7)
    ours = gen.generate(model, ids, mask, max_new_tokens=30, repetition_penalty=1.7, pad_token_id=PAD)
    assert_same_tokens(ours, ref)
    assert not (ours == gen.generate(model, ids, mask, max_new_tokens=30, pad_token_id=PAD)).all()


def test_min_lengths_bad_words_and_logit_bias_match_transformers(small):
    """min_new_tokens and min_length (prompt and padding counted, as transformers counts) hold EOS back;
    bad_words_ids bans one-token words always and longer ones after their prefix, the prefix reaching into the
    prompt; logit_bias equals transformers' sequence_bias of one-token sequences."""
    hf, model = small
    ids, mask = left_padded([5, 11, 3, 8], SMALL["vocab_size"], seed=4)
    width = ids.shape[1]
    free = hf_generate(hf, ids, mask, max_new_tokens=20, eos_token_id=None)[:, width:]
    eos = int(free[0, 1])  # row 0 would stop at its second token
    frequent = frequent_token(free)
    cases = [
        dict(min_new_tokens=6),
        dict(min_length=width + 9),
        dict(bad_words_ids=[[frequent], [int(free[1, 0]), int(free[1, 1])], [int(ids[2, -1]), int(free[2, 0])]]),
        dict(logit_bias={frequent: -4.0, int(free[3, 2]): 2.5, eos: 1.0}),
        dict(min_new_tokens=4, bad_words_ids=[[frequent]], logit_bias={int(free[0, 0]): -30.0}),
    ]
    for kwargs in cases:
        theirs = dict(kwargs)
        if "logit_bias" in theirs:
            theirs["sequence_bias"] = {(token,): bias for token, bias in theirs.pop("logit_bias").items()}
        ref = hf_generate(hf, ids, mask, max_new_tokens=20, eos_token_id=eos, **theirs)
        ours = gen.generate(model, ids, mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=PAD, **kwargs)
        assert_same_tokens(ours, ref)
        plain = gen.generate(model, ids, mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=PAD)
        assert not (ours == plain).all(), kwargs  # each setting changes what is generated


@pytest.mark.parametrize("early_stopping, length_penalty", [(False, 1.0), (True, 0.5), ("never", 2.0), (False, -1.0)])
def test_beam_search_matches_transformers(small, early_stopping, length_penalty):
    hf, model = small
    ids, mask = left_padded([5, 11, 3], SMALL["vocab_size"], seed=1)
    free = hf_generate(hf, ids, mask, max_new_tokens=25, num_beams=4, eos_token_id=None)
    eos = frequent_token(free[:, ids.shape[1] :])
    kwargs = dict(num_beams=4, eos_token_id=eos, early_stopping=early_stopping, length_penalty=length_penalty)
    ref = hf_generate(hf, ids, mask, max_new_tokens=25, **kwargs)
    ours = gen.generate(model, ids, mask, max_new_tokens=25, pad_token_id=PAD, **kwargs)
    assert_same_tokens(ours, ref)


def test_ring_buffer_gives_the_same_tokens_as_a_full_cache(small, monkeypatch):
    _, model = small
    ids, mask = left_padded([4, 10], SMALL["vocab_size"], seed=2)
    ring = gen.generate(model, ids, mask, max_new_tokens=40)
    assert min(gen.cache_lengths(model.config, 64)) == 8  # local layers really keep only the window
    monkeypatch.setattr(gen.cache, "cache_lengths", lambda config, max_len, lookahead=0: (max_len,) * config.num_layers)
    jax.clear_caches()
    full = gen.generate(model, ids, mask, max_new_tokens=40)
    jax.clear_caches()
    np.testing.assert_array_equal(ring, full)


def test_cache_size_for_125m_at_2048_tokens():
    config = neo_jax.GPTNeoConfig.from_json_file("configs/gpt-neo-125M.json")
    full = 2 * config.num_layers * 2048 * config.hidden_size * 4
    ring = gen.cache_bytes(config, batch=1, max_len=2048)
    assert ring == 6 * 2 * 2048 * 768 * 4 + 6 * 2 * 256 * 768 * 4  # 6 global layers, 6 local windows
    assert abs(ring / full - 0.5625) < 1e-9


def test_nearby_prompt_lengths_share_one_compiled_program(small):
    _, model = small
    gen.generate(model, np.ones((2, 9), np.int64), max_new_tokens=5)
    compiled = gen.compiled_programs()["prefill"]
    gen.generate(model, np.ones((2, 13), np.int64), max_new_tokens=5)
    gen.generate(model, np.ones((2, 16), np.int64), max_new_tokens=5)
    assert gen.compiled_programs()["prefill"] == compiled


def test_one_architecture_from_two_directories_compiles_once(tmp_path):
    """Where a model came from is kept beside it, not in its graph definition (a static jit argument): a second
    model of the same shape reuses every compiled program, which XLA's compile events show."""
    for name in "ab":
        transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(**SMALL)).save_pretrained(tmp_path / name)
    first, second = (neo_jax.from_pretrained(tmp_path / name, progress=False) for name in "ab")
    ids = np.ones((1, 5), np.int64)
    neo_jax.generate(first, ids, max_new_tokens=3)
    with backend_compiles() as compiles:
        neo_jax.generate(second, ids, max_new_tokens=3)
    assert compiles == []


def test_loading_a_model_does_not_import_training(tmp_path):
    code = (
        "import sys, neo_jax; neo_jax.from_pretrained(sys.argv[1], progress=False); "
        "print(sorted(m for m in ('neo_jax.train', 'neo_jax.finetune', 'neo_jax.checkpoints') if m in sys.modules))"
    )
    transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(**SMALL)).save_pretrained(tmp_path)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['neo_jax.checkpoints']"  # Orbax helpers, not the training code


# ------------------------------------------------------------------------------------------- sampling
def test_same_seed_same_samples_other_seed_other_samples(small):
    _, model = small
    ids = np.ones((4, 6), np.int64)
    sample = lambda seed: gen.generate(model, ids, max_new_tokens=20, do_sample=True, seed=seed)
    np.testing.assert_array_equal(sample(1), sample(1))
    assert not (sample(1) == sample(2)).all()


def test_temperature_to_zero_is_greedy(small):
    _, model = small
    ids, mask = left_padded([5, 7], SMALL["vocab_size"], seed=4)
    greedy = gen.generate(model, ids, mask, max_new_tokens=20)
    cold = gen.generate(model, ids, mask, max_new_tokens=20, do_sample=True, temperature=1e-4, seed=3)
    zero = gen.generate(model, ids, mask, max_new_tokens=20, do_sample=True, temperature=0.0, seed=3)
    np.testing.assert_array_equal(cold, greedy)
    np.testing.assert_array_equal(zero, greedy)


def test_top_k_never_leaves_the_k_best(small):
    _, model = small
    rows, steps, k = 16, 6, 3
    ids = np.tile(np.arange(1, 7), (rows, 1))
    out = gen.generate(model, ids, max_new_tokens=steps, do_sample=True, top_k=k, temperature=2.0, seed=0)
    logits = np.asarray(model(jnp.asarray(out[:, :-1])))  # every prefix's next-token logits
    for step in range(steps):
        position = ids.shape[1] - 1 + step
        best = np.argsort(-logits[:, position], axis=-1)[:, :k]
        assert all(out[row, position + 1] in best[row] for row in range(rows))
    assert len(np.unique(out[:, ids.shape[1]])) > 1  # it did sample


def first_token_frequencies(model, n, **sampling):
    out = gen.generate(model, np.ones((n, 4), np.int64), max_new_tokens=1, do_sample=True, seed=7, **sampling)
    return np.bincount(out[:, -1], minlength=model.config.vocab_size) / n


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = transformers.GPTNeoConfig(**{**SMALL, "vocab_size": 12, "hidden_size": 16, "num_heads": 2})
    torch.manual_seed(1)
    hf = transformers.GPTNeoForCausalLM(config).eval()
    with torch.no_grad():
        hf.transformer.wte.weight.normal_(0, 1.0)  # a spread-out next-token distribution
    directory = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(directory)
    model = neo_jax.from_pretrained(directory, progress=False)
    logits = np.asarray(model(jnp.ones((1, 4), jnp.int32)))[0, -1].astype(np.float64)
    return model, logits


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize(
    "sampling, expected",
    [
        ({}, lambda z: softmax(z)),
        ({"temperature": 0.7}, lambda z: softmax(z / 0.7)),
        ({"top_k": 4}, lambda z: softmax(np.where(z >= np.sort(z)[-4], z, -np.inf))),
        ({"min_p": 0.3}, lambda z: softmax(np.where(softmax(z) >= 0.3 * softmax(z).max(), z, -np.inf))),
    ],
    ids=["plain", "temperature", "top-k", "min-p"],
)
def test_sampled_frequencies_match_the_distribution(tiny, sampling, expected):
    """20000 draws of the first token: every frequency within 5 standard errors of its probability."""
    model, logits = tiny
    n = 20000
    freq = first_token_frequencies(model, n, **sampling)
    p = expected(logits)
    assert (freq[p == 0] == 0).all()
    assert (np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12).all(), (freq, p)


def test_top_p_keeps_the_nucleus(tiny):
    model, logits = tiny
    p = softmax(logits)
    order = np.argsort(-p)
    nucleus = order[: np.searchsorted(np.cumsum(p[order]), 0.6) + 1]
    freq = first_token_frequencies(model, 20000, top_p=0.6)
    assert set(np.flatnonzero(freq)) == set(nucleus.tolist())
    kept = p[nucleus] / p[nucleus].sum()
    assert np.abs(freq[nucleus] - kept).max() < 5 * np.sqrt(0.25 / 20000)


@pytest.mark.parametrize("seed", [0, 1])
def test_processors_equal_transformers_warpers(seed):
    from transformers.generation import logits_process as lp

    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(3, 50)).astype(np.float32) * 3
    seen_ids = rng.integers(0, 50, (3, 7))
    seen = np.zeros((3, 50), bool)
    seen[np.arange(3)[:, None], seen_ids] = True
    t = torch.as_tensor(logits)
    ids = torch.as_tensor(seen_ids)
    pairs = [
        (gen.top_k(jnp.asarray(logits), 5), lp.TopKLogitsWarper(5)(ids, t.clone())),
        (gen.top_p(jnp.asarray(logits), 0.8), lp.TopPLogitsWarper(0.8)(ids, t.clone())),
        (gen.min_p(jnp.asarray(logits), 0.2), lp.MinPLogitsWarper(0.2)(ids, t.clone())),
        (
            gen.repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), 1.3),
            lp.RepetitionPenaltyLogitsProcessor(1.3)(ids, t.clone()),
        ),
    ]
    for ours, ref in pairs:
        np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-6)


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=np.zeros((1, 0), np.int64)), "prompt is empty"),
        (dict(attention_mask=np.zeros((1, 4), np.int64)), "row 0 is empty"),
        (dict(max_new_tokens=300), "exceeds max_position_embeddings"),
        (dict(top_p=0.0, do_sample=True), "top_p must be in"),
        (dict(top_p=1.5, do_sample=True), "top_p must be in"),
        (dict(temperature=-1.0, do_sample=True), "temperature must be >= 0"),
        (dict(top_k=-1, do_sample=True), "top_k must be >= 0"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (dict(num_beams=2, do_sample=True), "num_beams > 1 is beam search"),
        (dict(input_ids=np.full((1, 4), 10_000)), "input_ids must be in"),
        (dict(min_new_tokens=-1), "min_new_tokens must be >= 0"),
        (dict(min_length=2.5), "min_length must be an integer"),
        (dict(bad_words_ids=[1, 2]), "bad_words_ids must be a list of non-empty lists"),
        (dict(bad_words_ids=[[]]), "bad_words_ids must be a list of non-empty lists"),
        (dict(bad_words_ids=[[400]]), "bad_words_ids token must be <= 319"),
        (dict(logit_bias={"x": 1.0}), "logit_bias key 'x' must be an integer"),
        (dict(logit_bias={320: 1.0}), "logit_bias key 320 must be <= 319"),
        (dict(logit_bias={5: float("nan")}), r"logit_bias\[5\] must be a finite number"),
        (dict(logit_bias=[5]), "logit_bias must map token ids to numbers"),
        (dict(num_beams=2, min_new_tokens=3, eos_token_id=1), "min_length / min_new_tokens is not supported with beam"),
        (dict(num_beams=2, bad_words_ids=[[3]]), "bad_words_ids is not supported with beam search"),
    ],
)
def test_bad_input_fails_before_compiling(small, monkeypatch, kwargs, message):
    _, model = small

    def compiled(*args, **kw):
        raise AssertionError("compiled before validating")

    monkeypatch.setattr(gen.loop, "_start", compiled)
    monkeypatch.setattr(gen.beam, "_beam_search", compiled)
    call = {"input_ids": np.ones((1, 4), np.int64), "max_new_tokens": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        gen.generate(model, **call)


# ------------------------------------------------------------------------------------------- text level
@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    config = transformers.GPTNeoConfig(
        **{**SMALL, "vocab_size": 50257, "bos_token_id": 50256, "eos_token_id": 50256, "window_size": 8}
    )
    torch.manual_seed(0)
    hf = transformers.GPTNeoForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("text")
    hf.save_pretrained(directory)
    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(TOKENIZER_DIR)
    tokenizer.save_pretrained(directory)
    return hf, tokenizer, directory


def test_text_generator_equals_transformers_tokens(text_model):
    hf, tokenizer, directory = text_model
    generator = neo_jax.TextGenerator(directory)
    prompts = ["EleutherAI has", "The quick brown fox jumps over the"]
    texts = generator(prompts, max_new_tokens=20)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf.generate(**enc, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    expected = [tokenizer.decode([t for t in row[enc["input_ids"].shape[1] :].tolist() if t != 50256]) for row in ref]
    assert texts == expected
    assert generator("EleutherAI has", max_new_tokens=20) == texts[:1]
    # streaming yields the same text, in pieces
    continuation = generator.stream("EleutherAI has", max_new_tokens=20, chunk_size=4)
    pieces = list(continuation)
    assert len(pieces) > 1 and "".join(pieces) == texts[0]
    assert continuation.new_tokens == 20
    # the caller's tokenizer is used as given, not reconfigured
    own = transformers.AutoTokenizer.from_pretrained(directory)
    before = (own.padding_side, own.pad_token)
    neo_jax.TextGenerator(generator.model, tokenizer=own)(prompts, max_new_tokens=2)
    assert (own.padding_side, own.pad_token) == before


def test_stop_strings(text_model):
    _, _, directory = text_model
    generator = neo_jax.TextGenerator(directory)
    full = generator("EleutherAI has", max_new_tokens=20)[0]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = generator("EleutherAI has", max_new_tokens=20, stop=[stop])[0]
    assert cut == full[: full.index(stop)]
    assert "".join(generator.stream("EleutherAI has", max_new_tokens=20, stop=[stop])) == cut
    with pytest.raises(ValueError, match="empty prompt"):
        generator("", max_new_tokens=5)


@pytest.mark.slow
def test_125m_greedy_past_the_window_matches_transformers(tmp_path):
    """The issue's check: 125M shape, left-padded prompts of different lengths, token for token past the
    256-token window. Long prompts (prefill is cheap) let 80 decode steps take every row past it, where 300
    steps from short prompts cost three times the time."""
    config = transformers.GPTNeoConfig.from_json_file("configs/gpt-neo-125M.json")
    torch.manual_seed(0)
    hf = transformers.GPTNeoForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    model = neo_jax.from_pretrained(tmp_path, progress=False)
    ids, mask = left_padded([200, 240, 220], config.vocab_size, seed=5)
    ref = hf_generate(hf, ids, mask, max_new_tokens=80, eos_token_id=None)
    ours = gen.generate(model, ids, mask, max_new_tokens=80, pad_token_id=PAD)
    assert ref.shape == ours.shape == (3, 320)
    assert (mask.sum(1) + 80 > 256).all()  # every row decodes past the window
    assert len(np.unique(ref[:, 240:])) > 40  # a real, varied continuation
    np.testing.assert_array_equal(ours, ref)
