"""Speculative decoding (``generate(..., draft=...)``): greedy output token-identical to plain decoding, and
sampled output following the target's law exactly (a chi-square test that fails under a wrong rule)."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
import pytest
import scipy.stats
import torch
import transformers
from flax import nnx

import neo_jax
from neo_jax import generation as gen
from neo_jax.generation import speculative
from tests.conftest import SMALL
from tests.test_generate import PAD, left_padded


def saved(directory, seed: int, **overrides):
    config = transformers.GPTNeoConfig(**{**SMALL, "window_size": 8, **overrides})
    torch.manual_seed(seed)
    hf = transformers.GPTNeoForCausalLM(config).eval()
    hf.save_pretrained(directory)
    return neo_jax.from_pretrained(directory, progress=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A target with a window of 8 (40 new tokens wrap its local rings), a 2-layer draft, and a draft nearly
    equal to the target (its weights plus a little noise)."""
    target = saved(tmp_path_factory.mktemp("target"), 0)
    small = saved(tmp_path_factory.mktemp("draft"), 1, num_layers=2, attention_types=[[["global", "local"], 1]])
    near = saved(tmp_path_factory.mktemp("near"), 0)
    noisy = jax.tree.map(lambda a: a + 0.002 * jax.random.normal(jax.random.key(3), a.shape), nnx.state(near))
    nnx.update(near, noisy)
    return target, {"smaller": small, "nearly equal": near, "itself": target, "ngram": "ngram"}


@pytest.mark.parametrize("draft", ["smaller", "nearly equal", "itself", "ngram"])
def test_greedy_output_is_token_identical(models, draft):
    """Left-padded rows of different lengths, 40 tokens past a window of 8, k = 1 and 3; and with EOS, a
    repetition penalty, a minimum length and banned words, whose processors see each draft token."""
    target, drafts = models
    ids, mask = left_padded([5, 9, 3, 7], target.config.vocab_size)
    plain = gen.generate(target, ids, mask, max_new_tokens=40, pad_token_id=PAD)
    for k in (1, 3):
        statistics = {}
        out = gen.generate(
            target, ids, mask, max_new_tokens=40, pad_token_id=PAD, draft=drafts[draft], num_draft_tokens=k,
            statistics=statistics,
        )  # fmt: skip
        np.testing.assert_array_equal(out, plain)
        assert statistics["tokens"] == 4 * 39 and statistics["draft_tokens"] <= k * 4 * statistics["rounds"]
        assert 0 < statistics["accepted_tokens"] <= statistics["draft_tokens"]
        if draft == "itself":
            assert statistics["accepted_tokens"] == statistics["draft_tokens"]
    eos = int(plain[1, ids.shape[1] + 12])  # a token row 1 emits: rows stop at different lengths
    processors: dict[str, Any] = dict(
        eos_token_id=eos, repetition_penalty=1.3, min_new_tokens=6, bad_words_ids=[[int(plain[0, -3])], [7, 9]]
    )
    plain = gen.generate(target, ids, mask, max_new_tokens=40, pad_token_id=PAD, **processors)
    assert (plain[:, ids.shape[1] :] == PAD).any()
    out = gen.generate(
        target, ids, mask, max_new_tokens=40, pad_token_id=PAD, draft=drafts[draft], num_draft_tokens=3, **processors
    )
    np.testing.assert_array_equal(out, plain)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A target and a draft of 8 tokens whose next-token laws are spread out and differ."""

    def model(seed, spread):
        directory = tmp_path_factory.mktemp(f"tiny{seed}")
        config = transformers.GPTNeoConfig(**{**SMALL, "vocab_size": 8, "hidden_size": 16, "num_heads": 2})
        torch.manual_seed(seed)
        hf = transformers.GPTNeoForCausalLM(config).eval()
        with torch.no_grad():
            hf.transformer.wte.weight.normal_(0, spread)
        hf.save_pretrained(directory)
        return neo_jax.from_pretrained(directory, progress=False)

    return model(1, 0.3), model(2, 0.3)


PROMPT = [3, 1, 4]


def exact_law(model, sampling: dict, steps: int) -> np.ndarray:
    """The target's law of the first ``steps`` new tokens after ``PROMPT``: ``[vocab] * steps`` probabilities,
    from its logits at every prefix, through the same processors (here in NumPy)."""
    vocab = model.config.vocab_size
    prefixes = np.array(np.meshgrid(*[np.arange(vocab)] * (steps - 1), indexing="ij")).reshape(steps - 1, -1).T
    law = np.ones((vocab,) * steps)
    for length in range(steps):
        rows = np.unique(prefixes[:, :length], axis=0)
        logits = np.asarray(model(np.concatenate([np.tile(PROMPT, (len(rows), 1)), rows], 1)), np.float64)[:, -1]
        for row, z in zip(rows, logits, strict=True):
            seen = np.zeros(vocab, bool)
            seen[[*PROMPT, *row]] = True
            penalty = sampling.get("repetition_penalty", 1.0)
            z = np.where(seen, np.where(z < 0, z * penalty, z / penalty), z) / sampling.get("temperature", 1.0)
            if "top_k" in sampling:
                z = np.where(z >= np.sort(z)[-sampling["top_k"]], z, -np.inf)
            p = np.exp(z - z.max())
            law[tuple(row)] *= (p / p.sum()).reshape((vocab,) + (1,) * (steps - length - 1))
    return law


def chi_square(samples: np.ndarray, law: np.ndarray) -> float:
    """The p-value of the observed joint counts of ``samples`` ([n, steps]) under ``law``; cells expected fewer
    than 5 times are pooled."""
    counts = np.zeros(law.size)
    np.add.at(counts, np.ravel_multi_index(samples.T, law.shape), 1)
    expected = law.ravel() * len(samples)
    assert counts[expected == 0].sum() == 0, "a token the law never gives"
    small = expected < 5
    observed = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    return float(scipy.stats.chisquare(observed, expected).pvalue)


PROCESSED = {"temperature": 0.7, "top_k": 5, "repetition_penalty": 1.5}


@pytest.mark.parametrize(
    "sampling, proposer", [({}, "model"), (PROCESSED, "model"), ({}, "ngram")], ids=["plain", "processed", "ngram"]
)
def test_sampled_output_follows_the_targets_law(tiny, sampling, proposer, monkeypatch):
    """8000 rows of 3 new tokens from a draft whose law differs from the target's (k = 2: the second and third
    tokens are a draft's accepted run, a residual draw or the bonus token): their joint frequencies over the
    512 outcomes pass a chi-square test against the target's exact law, and fail it when a rejection draws
    from p instead of max(0, p - q)."""
    target, draft = tiny
    law = exact_law(target, sampling, 3)
    if proposer == "model":
        distance = np.abs(law - exact_law(draft, sampling, 3)).sum() / 2
        assert distance > 0.3, distance  # the laws differ: many of the draft's tokens are rejected
    else:
        draft = "ngram"

    def sample(seed):
        prompts = np.tile(PROMPT, (8000, 1))
        out = gen.generate(
            target, prompts, max_new_tokens=3, do_sample=True, seed=seed, draft=draft, num_draft_tokens=2, **sampling
        )
        return out[:, len(PROMPT) :]

    right = chi_square(sample(0), law)
    monkeypatch.setattr(speculative, "residual", lambda p, q: p)
    speculative._continue.clear_cache()
    wrong = chi_square(sample(0), law)
    assert right > 1e-3 and wrong < 1e-6, (right, wrong)
    monkeypatch.undo()
    speculative._continue.clear_cache()


def test_ngram_proposals_follow_the_latest_occurrence():
    sequence = np.array([[-2, 5, 6, 7, 1, 5, 6, 8, 2, 5, 6], [-2, -2, 4, 4, 4, 4, 0, 0, 0, 0, 0]], np.int32)
    length = np.array([11, 6])
    got = np.asarray(speculative.ngram_proposals(sequence, length, 3))
    # row 0: "5 6" last occurred at 5 (followed by 8 2 5); row 1: "4 4 4" at 3 (then 4, then the end repeats)
    np.testing.assert_array_equal(got, [[8, 2, 5], [4, 4, 4]])


def test_bad_drafts_are_refused(models, tmp_path):
    target, _ = models
    ids = np.ones((1, 4), np.int64)
    other = saved(tmp_path / "other", 0, vocab_size=330)
    short = saved(tmp_path / "short", 0, max_position_embeddings=6)
    for kwargs, message in [
        (dict(draft=short), "exceeds the draft's max_position_embeddings \\(6\\)"),
        (dict(draft=other), "the draft's vocabulary \\(330 tokens\\) differs from the model's \\(320\\)"),
        (dict(draft="bigram"), "draft must be a GPT-Neo model or 'ngram'"),
        (dict(draft="ngram", num_draft_tokens=0), "num_draft_tokens must be >= 1"),
        (dict(draft="ngram", num_beams=2), "not beam search"),
    ]:
        with pytest.raises(ValueError, match=message):
            gen.generate(target, ids, max_new_tokens=4, **kwargs)
    from neo_jax.serve.engine import Engine

    for kwargs, message in [  # the server's engine, before it allocates anything
        (dict(draft="ngram", prefill_chunk=0), "needs chunked prefill"),
        (dict(draft=short), "the draft has 6 positions, fewer than a slot's max_len 64"),
        (dict(draft=other), "the draft's vocabulary \\(330 tokens\\) differs"),
        (dict(draft="ngram", num_draft_tokens=0), "num_draft_tokens must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            Engine(target, max_batch=2, max_len=64, **kwargs)


@pytest.mark.parametrize("loading", [{"weights": "int8"}, {"dtype": "bfloat16", "param_dtype": "bfloat16"}])
def test_int8_and_bfloat16_weights_decode_the_same_tokens(models, tmp_path, loading):
    _, drafts = models
    saved(tmp_path, 0)
    target = neo_jax.from_pretrained(tmp_path, progress=False, **loading)
    ids, mask = left_padded([6, 2], target.config.vocab_size, seed=4)
    plain = gen.generate(target, ids, mask, max_new_tokens=24, pad_token_id=PAD)
    out = gen.generate(target, ids, mask, max_new_tokens=24, pad_token_id=PAD, draft=drafts["smaller"])
    np.testing.assert_array_equal(out, plain)


def test_rejected_tokens_corrupt_window_only_rings(models, monkeypatch):
    """The local layers' rings hold window + k + 1 slots; with the window alone, the tokens written for
    rejected proposals overwrite slots later queries still see, and the output goes wrong: so the identity
    above does test them."""
    target, drafts = models
    ids, mask = left_padded([5, 9, 3, 7], target.config.vocab_size)
    plain = gen.generate(target, ids, mask, max_new_tokens=40, pad_token_id=PAD)
    lengths = gen.cache.cache_lengths
    monkeypatch.setattr(gen.cache, "cache_lengths", lambda config, max_len, lookahead=0: lengths(config, max_len))
    jax.clear_caches()
    out = gen.generate(
        target, ids, mask, max_new_tokens=40, pad_token_id=PAD, draft=drafts["smaller"], num_draft_tokens=3
    )
    monkeypatch.undo()
    jax.clear_caches()
    assert (out != plain).any()


# ---- the server (``speculative.serve_round`` in the engine) ----------------------------------------------------
def speculating_on_a_cycle(engine, pattern=(True, True, False)):
    """Make the engine's off switch follow ``pattern`` (a speculative round, or a plain step after which the
    draft catches up), whatever the speeds it measures."""
    kinds = itertools.cycle(pattern)
    engine.switch.speculate = lambda: next(kinds)
    return engine


def test_server_output_is_token_identical_under_concurrency(models, tmp_path):
    """Concurrent requests (prompts around every chunk and block boundary, past the local window of 8, one
    ending on a slot's last position), greedy or seeded samples with processors, each under the base model or
    one of two LoRA adapters, which the draft does not have: the speculative engines (a smaller draft with a
    prefix cache; n-gram) give the plain engine's tokens, rounds mixed with plain steps; and the metrics count
    what was drafted."""
    from neo_jax import lora
    from neo_jax.serve.engine import Engine
    from neo_jax.serve.metrics import Metrics

    _, drafts = models
    base = saved(tmp_path, 0)
    rng = np.random.default_rng(5)
    adapters = []
    for rank, targets in ((2, ("q_proj", "v_proj")), (4, ("c_fc", "c_proj"))):
        config = lora.LoRAConfig(r=rank, alpha=rank, targets=targets)
        shapes = {"q_proj": (64, 64), "v_proj": (64, 64), "c_fc": (256, 64), "c_proj": (64, 256)}
        tensors = {
            t: (rng.normal(0, 0.3, (4, rank, shapes[t][1])), rng.normal(0, 0.3, (4, shapes[t][0], rank)))
            for t in targets
        }
        adapters.append((config, tensors))
    lora.add_many(base, adapters)
    lengths = [1, 2, 15, 16, 17, 31, 33, 47, 64, 65, 100, 200, 240]
    sampled = {"temperature": 0.8, "top_k": 20, "repetition_penalty": 1.2}
    jobs = [
        (rng.integers(1, 320, n).tolist(), min(24, 256 - n), i % 3 - 1, sampled | {"seed": i} if i % 2 else {})
        for i, n in enumerate(lengths)
    ]
    shared = rng.integers(1, 320, 40).tolist()
    jobs += [(shared, 12, adapter, {}) for adapter in (-1, 0, 1)]  # one prompt under the base and each adapter
    again = (jobs[10][0] + [7, 8], 8, jobs[10][2], {})

    def run(engine):
        engine.start()
        try:
            generate = lambda j: engine.generate(j[0], j[1], adapter=j[2], **{"temperature": 0, **j[3]})[0]
            with ThreadPoolExecutor(len(jobs)) as pool:
                results = list(pool.map(generate, jobs))
            return results + [generate(again)]  # after the others: its first 96 tokens are in any prefix cache
        finally:
            engine.stop()

    options = dict(max_batch=4, max_len=256, eos_token_id=None, prefill_chunk=32, adapters=("a", "b"))
    plain = run(Engine(base, **options))
    assert len({tuple(tokens) for tokens in plain[-4:-1]}) == 3  # each adapter changes the output
    for draft, k, extra in [(drafts["smaller"], 3, {"prefix_cache_mb": 2}), ("ngram", 2, {})]:
        metrics = Metrics()
        engine = Engine(base, **options, **extra, draft=draft, num_draft_tokens=k, metrics=metrics)
        assert run(speculating_on_a_cycle(engine)) == plain, draft
        drafted = [metric_value(getattr(metrics, f"spec_decode_{name}")) for name in ("drafts", "draft_tokens")]
        accepted = metric_value(metrics.spec_decode_accepted_tokens)
        assert drafted[1] == k * drafted[0] > 0 and 0 < accepted <= drafted[1], (draft, drafted, accepted)
        assert metric_value(metrics.prefix_cache_tokens) >= (96 if extra else 0), draft


def metric_value(counter) -> float:
    return next(iter(counter.collect())).samples[0].value


@pytest.mark.parametrize("speedup", [0.4, 2.0])
def test_the_off_switch_takes_the_faster_kind_and_probes_the_other_less_and_less(speedup):
    """Rounds that give each row ``speedup`` times a plain step's tokens per second: after one step of each, the
    switch takes the faster kind for all but the probes, 2 steps after 64, 128, 256, ... steps of it; and when
    the draft starts paying, the next probe finds it and the switch turns to it."""
    from neo_jax.serve.engine import Switch

    switch, kinds = Switch(), []
    for _ in range(2 + 66 + 130 + 258 + 100):
        kind = switch.speculate()
        kinds.append(kind)
        switch.record(kind, speedup if kind else 1.0, 1.0)
    faster = speedup > 1
    probes = [i for i, kind in enumerate(kinds[2:]) if kind != faster]
    # the first 64 steps count the second exploring one: then 128 and 256 of the faster kind
    assert probes == [63, 64, 65 + 128, 66 + 128, 67 + 128 + 256, 68 + 128 + 256], probes
    for _ in range(switch.interval + switch.probe):  # the draft now pays 3 times a plain step
        kind = switch.speculate()
        switch.record(kind, 3.0 if kind else 1.0, 1.0)
    assert switch.speculate()
