"""The continuous-batching engine (in process) and `neo-jax serve` (a real server process, driven with the
official ``openai`` client, raw HTTP and a headless browser)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import jax
import numpy as np
import openai
import psutil
import pytest
import requests
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

import neo_jax
from neo_jax.evaluate import token_logprobs
from neo_jax.generation import top_k, top_p
from neo_jax.generation.batching import clamped_chunk, top_k_rows, top_p_rows
from neo_jax.serve.app import CompletionRequest, _Choice
from neo_jax.serve.engine import Engine, Finished, Request, Token, sampling_settings
from neo_jax.serve.metrics import Metrics
from tests.conftest import SMALL, TOKENIZER_DIR, backend_compiles, save_gpt2_vocab_model

KEY = "test-key-123"
ADAPTERS = ("small", "mlp", "all")  # the adapters fixture's, in order
MAX_LEN = 256  # the fixture model's max_position_embeddings; its local window is 16
HEADER_TIMEOUT = 3  # seconds the module's server gives a client to send headers (and again a body)
MAX_CHARS = MAX_LEN * 128  # GPT-2's longest token is 128 characters: no longer prompt fits 256 tokens


# ---- the engine, in process -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(gpt2_model_dir):
    return neo_jax.from_pretrained(gpt2_model_dir, progress=False)


@pytest.fixture(scope="module")
def engine(model):
    engine = Engine(model, max_batch=4, max_len=MAX_LEN, eos_token_id=None, metrics=Metrics()).start()
    yield engine
    engine.stop()


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = rng.choice([1, 2, 15, 16, 17, 40, 63, 64, 65, 130], count)
    return [rng.integers(1, 50000, n).tolist() for n in lengths]


def run_all(engine: Engine, jobs: list[tuple[list[int], int, dict]]) -> list[tuple[list[int], str]]:
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda job: engine.generate(job[0], job[1], **job[2]), jobs))


def test_greedy_equals_generate_alone_whatever_shares_the_batch(engine, model):
    # 10 requests on 4 slots: slots are refilled while others decode; lengths cross buckets and the window.
    jobs = [(p, int(n), {"temperature": 0}) for p, n in zip(prompts(10), [30, 5, 40, 1, 22, 33, 17, 9, 40, 12])]
    jobs.append(([7] * 200, MAX_LEN - 200, {"temperature": 0}))  # fills a slot to the last position
    for (prompt, n, _), (tokens, reason) in zip(jobs, run_all(engine, jobs), strict=True):
        alone = neo_jax.generate(model, np.array(prompt), max_new_tokens=n)[0, len(prompt) :]
        assert reason == "length"
        np.testing.assert_array_equal(tokens, alone)


def test_a_seeded_sample_is_the_same_alone_and_in_a_full_batch(engine):
    prompt = prompts(1, seed=3)[0]
    settings = dict(temperature=0.8, top_p=0.9, top_k=40, min_p=0.01, repetition_penalty=1.2, seed=1234)
    alone, _ = engine.generate(prompt, 24, **settings)
    others = [(p, 30, dict(temperature=0.5 + 0.2 * i, seed=i)) for i, p in enumerate(prompts(6, seed=4))]
    jobs = [others[0], (prompt, 24, settings), *others[1:3], (prompt, 24, settings), *others[3:]]
    results = run_all(engine, jobs)
    assert results[1][0] == alone and results[4][0] == alone
    assert engine.generate(prompt, 24, **{**settings, "seed": 99})[0] != alone  # the seed matters
    assert len({tuple(r[0]) for r in results}) > 3  # and the others did sample


def test_no_request_shape_compiles_after_warm_up(engine):
    with backend_compiles() as compiles:
        rng = np.random.default_rng(5)
        jobs = []
        for i, n in enumerate([1, 3, 16, 17, 31, 33, 64, 65, 100, 128, 129, 200, 255]):
            options = [
                {"temperature": 0},
                {"temperature": 0.7, "seed": i},
                {"temperature": 1.3, "top_k": 5, "seed": i},
                {"temperature": 1.0, "top_p": 0.5, "min_p": 0.05, "repetition_penalty": 1.3, "seed": i},
            ][i % 4]
            jobs.append((rng.integers(1, 50000, n).tolist(), min(MAX_LEN - n, 1 + i), options))
        run_all(engine, jobs)
        for n in (2, 40, 129):  # the prompt's own log-probabilities too
            done = threading.Event()
            emit = lambda event, done=done: isinstance(event, Finished) and done.set()
            settings = sampling_settings(temperature=0, vocab_size=50257)
            engine.submit(Request(rng.integers(1, 50000, n).tolist(), 2, settings, emit, echo_logprobs=True))
            assert done.wait(60)
    assert compiles == []


def test_the_gauges_follow_the_engine_taking_requests(engine):
    """Six requests queued at once on four rows: at the first token the queue gauge reads two and the slot gauge
    four. (Chunked admission once left both as they were until a row was freed, so a full queue read as having
    room and the reverse, and the 429 test raced.)"""
    seen, finished = [], threading.Semaphore(0)
    gauges = lambda: (metric_value(engine.metrics.queue_length), metric_value(engine.metrics.active_slots))

    def emit(event):
        if isinstance(event, Token) and not seen:
            seen.append(gauges())
        elif isinstance(event, Finished):
            finished.release()

    settings = sampling_settings(temperature=0, vocab_size=50257)
    with engine._lock:  # the engine takes none of them until all six wait
        for prompt in prompts(6, seed=6):
            engine.submit(Request(prompt, 2, settings, emit))
        assert gauges() == (6, 0)
    assert all(finished.acquire(timeout=60) for _ in range(6))
    assert seen == [(2, 4)]
    assert wait_until(lambda: gauges() == (0, 0), 10)  # the last row is freed just after its request finishes


def test_per_row_filters_equal_the_generate_processors():
    # The engine's per-row top-k / top-p (bisection, no sort) keep exactly the tokens that generate's
    # processors (checked against transformers in test_generate) keep, row by row with each row's own value.
    logits = jax.numpy.asarray(np.random.default_rng(0).normal(0, 3, (6, 5000)).astype(np.float32))
    ks, ps = [1, 2, 7, 50, 4999, 0], [0.05, 0.3, 0.5, 0.9, 0.999, 1.0]
    ours_k = np.asarray(top_k_rows(logits, jax.numpy.array(ks)))
    ours_p = np.asarray(top_p_rows(logits, jax.numpy.array(ps)))
    for row, (k, p) in enumerate(zip(ks, ps, strict=True)):
        expected_k = np.asarray(top_k(logits[row : row + 1], k))[0] if k else np.asarray(logits[row])
        np.testing.assert_array_equal(np.isfinite(ours_k[row]), np.isfinite(expected_k))
        expected_p = np.asarray(top_p(logits[row : row + 1], p))[0]
        np.testing.assert_array_equal(np.isfinite(ours_p[row]), np.isfinite(expected_p))


def test_logprobs_match_evaluate(engine, model):
    prompt = prompts(1, seed=7)[0][:20]
    events = []
    done = threading.Event()

    def emit(event):
        events.append(event)
        if isinstance(event, Finished):
            done.set()

    settings = sampling_settings(temperature=0.9, seed=5, vocab_size=50257)
    request = engine.submit(Request(prompt, 12, settings, emit, echo_logprobs=True))
    assert done.wait(60)
    tokens = [e for e in events if isinstance(e, Token)]
    sequence = np.array([prompt + [t.id for t in tokens]])
    logits = np.asarray(model(sequence))
    expected = np.asarray(token_logprobs(logits[:, :-1], sequence[:, 1:]))[0]
    ours = [lp for lp, *_ in request.prompt_logprobs] + [t.logprob for t in tokens]
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
    log_softmax = np.asarray(jax.nn.log_softmax(logits[0, len(prompt) - 1 : -1], axis=-1))
    for token, row in zip(tokens, log_softmax, strict=True):
        top = np.argsort(-row)[:5]
        np.testing.assert_array_equal([i for i, _ in token.top], top)
        np.testing.assert_allclose([lp for _, lp in token.top], row[top], atol=1e-4)


# ---- chunked prefill, the prefix cache, many adapters ---------------------------------------------------------
def jobs_at_every_boundary(seed: int) -> list[tuple[list[int], int]]:
    """Prompts around every chunk and block boundary (16, 32, 64), the local window (16) crossed many times,
    and one that ends on the last slot of a row."""
    rng = np.random.default_rng(seed)
    lengths = [1, 2, 15, 16, 17, 31, 32, 33, 47, 48, 49, 63, 64, 65, 100, 129, 200, MAX_LEN - 12]
    return [(rng.integers(1, 50000, n).tolist(), min(12, MAX_LEN - n)) for n in lengths]


@pytest.mark.parametrize("chunk", [16, 128])
def test_chunked_prefill_is_token_identical_to_generate(model, chunk):
    """16: one lane of one block per step; 128: one, two or four lanes of 128, 64 or 32 tokens. The engine
    fixture runs the default 64 (lanes of 64, 32, 16) through every other engine test."""
    from neo_jax.cli import serve as cli
    from neo_jax.generation.batching import BLOCK, DEFAULT_PREFILL_CHUNK

    assert (cli.BLOCK, cli.DEFAULT_PREFILL_CHUNK) == (BLOCK, DEFAULT_PREFILL_CHUNK)  # the CLI's copies
    engine = Engine(model, max_batch=4, max_len=MAX_LEN, eos_token_id=None, prefill_chunk=chunk).start()
    try:
        jobs = jobs_at_every_boundary(chunk)
        results = run_all(engine, [(p, n, {"temperature": 0}) for p, n in jobs])
    finally:
        engine.stop()
    for (prompt, n), (tokens, reason) in zip(jobs, results, strict=True):
        alone = np.asarray(neo_jax.generate(model, np.array(prompt), max_new_tokens=n))[0, len(prompt) :]
        assert tokens == alone.tolist() and reason == "length", len(prompt)


def test_whole_prompt_prefill_is_still_there_and_exact(model):
    engine = Engine(model, max_batch=4, max_len=MAX_LEN, eos_token_id=None, prefill_chunk=0).start()
    try:
        jobs = jobs_at_every_boundary(3)[::3]
        results = run_all(engine, [(p, n, {"temperature": 0}) for p, n in jobs])
    finally:
        engine.stop()
    for (prompt, n), (tokens, _) in zip(jobs, results, strict=True):
        assert (
            tokens == np.asarray(neo_jax.generate(model, np.array(prompt), max_new_tokens=n))[0, len(prompt) :].tolist()
        )


def start_request(engine: Engine, prompt: list[int], echo: bool = False, **sampling):
    """Submit a request for 6 tokens (greedy unless ``sampling`` says otherwise); return it, the list its events
    go to and the event set when it finishes."""
    events, done = [], threading.Event()

    def emit(event):
        events.append(event)
        if isinstance(event, Finished):
            done.set()

    settings = sampling_settings(**{"temperature": 0, **sampling}, vocab_size=50257)
    return engine.submit(Request(prompt, 6, settings, emit, echo_logprobs=echo)), events, done


def echo_request(engine: Engine, prompt: list[int], **sampling) -> tuple[list, list[Token]]:
    request, events, done = start_request(engine, prompt, echo=True, **sampling)
    assert done.wait(60)
    return request.prompt_logprobs, [e for e in events if isinstance(e, Token)]


def test_the_prefix_cache_changes_no_output_and_keeps_echo_logprobs(model, engine):
    """Shared prefixes of many lengths, greedy and seeded sampling, echo with logprobs on hits and misses, and a
    pool of 12 blocks, so that blocks are evicted and reused while the test runs."""
    metrics = Metrics()
    budget = 12 * 2 * 2 * 16 * 64 * 4 / 2**20  # 12 blocks: 2 layers' keys and values of 16 tokens of width 64
    cached = Engine(model, max_batch=4, max_len=MAX_LEN, eos_token_id=None, prefill_chunk=32, prefix_cache_mb=budget)
    assert cached.prefix_cache.capacity == 12
    cached.metrics = cached.prefix_cache.metrics = metrics
    cached.start()
    try:
        rng = np.random.default_rng(11)
        shared = rng.integers(1, 50000, 150).tolist()
        prompts = [
            shared[:n] + rng.integers(1, 50000, k).tolist()
            for n, k in [(150, 5), (150, 40), (47, 3), (16, 1), (100, 60)]
        ]
        prompts.append(shared[:150])  # the whole prompt cached: its last token is still prefilled
        for options in ({"temperature": 0}, {"temperature": 0.9, "top_k": 20, "seed": 3}):
            for prompt in prompts + prompts:  # the second time round, every prompt's prefix is cached
                ours, theirs = cached.generate(prompt, 10, **options), engine.generate(prompt, 10, **options)
                assert ours == theirs, (len(prompt), options)
        assert (
            metric_value(metrics.prefix_cache_hits) >= len(prompts) and metric_value(metrics.prefix_cache_tokens) > 500
        )
        for prompt in prompts[:3] + prompts[:3]:  # echo: a hit returns the log-probabilities a miss computed
            (hit_logprobs, hit_tokens), (miss_logprobs, miss_tokens) = (
                echo_request(cached, prompt),
                echo_request(engine, prompt),
            )
            assert [t.id for t in hit_tokens] == [t.id for t in miss_tokens]
            assert len(hit_logprobs) == len(miss_logprobs) == len(prompt) - 1
            for (lp, ids, lps), (lp2, ids2, lps2) in zip(hit_logprobs, miss_logprobs, strict=True):
                assert ids == ids2
                np.testing.assert_allclose([lp, *lps], [lp2, *lps2], atol=2e-5)
        # Two prompts with one new prefix, queued together: while no row decodes, the longer one's earlier chunks
        # run first, and the shorter one, waiting in its row, takes the block they computed before its own chunk.
        fresh = rng.integers(1, 50000, 136).tolist()
        reused = metric_value(metrics.prefix_cache_tokens)
        with cached._lock:  # the engine takes both from the queue at once
            started = [start_request(cached, prompt) for prompt in (fresh, fresh[:32])]
        for (_, events, done), prompt in zip(started, (fresh, fresh[:32]), strict=True):
            assert done.wait(60)
            assert [e.id for e in events if isinstance(e, Token)] == engine.generate(prompt, 6, temperature=0)[0]
        assert metric_value(metrics.prefix_cache_tokens) == reused + 16
    finally:
        cached.stop()


def test_embeddings_ride_the_prefill_chunks_and_equal_encode(engine, model):
    """Embedding requests of every length around the chunk (64) and the slot (256), submitted while a stream
    decodes, each equal ``encode``'s vector for every pooling (from one set of sums), and compile nothing."""
    from neo_jax.embed import Embedder, from_sums
    from neo_jax.serve.engine import Embedded

    rng = np.random.default_rng(8)
    inputs = [rng.integers(1, 50000, n).tolist() for n in (1, 17, 63, 64, 65, 130, MAX_LEN)]
    got, finished = {}, threading.Semaphore(0)

    def emitter(i):
        def emit(event):
            if isinstance(event, Embedded):
                got[i] = event
            elif isinstance(event, Finished):
                got[("reason", i)] = event.reason
                finished.release()

        return emit

    settings = sampling_settings(temperature=0, vocab_size=50257)
    with backend_compiles() as compiles, ThreadPoolExecutor(1) as pool:
        stream = pool.submit(engine.generate, inputs[5], 40, temperature=0)
        for i, ids in enumerate(inputs):
            engine.submit(Request(ids, 1, settings, emitter(i), embedding=True))
        assert all(finished.acquire(timeout=60) for _ in inputs)
        tokens, _ = stream.result(60)
    assert compiles == []
    assert tokens == neo_jax.generate(model, np.array(inputs[5]), max_new_tokens=40)[0, 130:].tolist()
    assert [got[("reason", i)] for i in range(len(inputs))] == ["embedded"] * len(inputs)
    for pooling in ("mean", "weightedmean", "last"):
        ours = np.stack([from_sums(got[i].sums, got[i].tokens, pooling, True) for i in range(len(inputs))])
        embedder = Embedder(model, pooling=pooling, normalize=True, batch_size=4)
        np.testing.assert_allclose(ours, embedder(inputs), atol=1e-5)
    assert metric_value(engine.metrics.embedding_requests) >= len(inputs)
    with pytest.raises(ValueError, match="maximum context length is 256 tokens, but the input has 257"):
        engine.check([1] * 257, 0, embedding=True)
    whole = Engine(model, max_batch=1, max_len=32, prefill_chunk=0)  # nothing compiles before warm_up
    with pytest.raises(ValueError, match="embeddings are computed in prefill chunks"):
        whole.check([1, 2], 0, embedding=True)


def metric_value(counter) -> float:
    return next(iter(counter.collect())).samples[0].value


@pytest.fixture(scope="module")
def adapters(gpt2_model_dir, tmp_path_factory) -> dict:
    """Three PEFT adapters of different ranks and targets, with weights big enough to change greedy output."""
    from neo_jax import lora, peft

    specs = {"small": (2, ("q_proj", "v_proj")), "mlp": (8, ("c_fc", "c_proj")), "all": (4, tuple(lora.TARGETS))}
    assert tuple(specs) == ADAPTERS
    directories = {}
    for seed, (name, (rank, targets)) in enumerate(specs.items()):
        model = neo_jax.from_pretrained(gpt2_model_dir, progress=False)
        lora.add(model, lora.LoRAConfig(r=rank, alpha=2 * rank, targets=targets), seed=seed)
        for i, (_, dense) in enumerate(lora.adapted_layers(model)):
            if dense.lora is not None:
                b = dense.lora.b
                b.set_value(0.3 * jax.random.normal(jax.random.key(100 * seed + i), b.shape))
        directories[name] = peft.save(model, tmp_path_factory.mktemp(name), base_model=str(gpt2_model_dir))
    return directories


def test_many_adapters_share_a_batch_and_each_row_equals_its_merged_model(gpt2_model_dir, adapters, model):
    from neo_jax import lora, peft

    base = neo_jax.from_pretrained(gpt2_model_dir, progress=False)
    checked = [peft.check_adapter(d, base.config) for d in adapters.values()]
    lora.add_many(base, [(c[0], peft.by_target(base.config, c)) for c in checked])
    engine = Engine(base, max_batch=4, max_len=MAX_LEN, eos_token_id=None, prefill_chunk=32, adapters=tuple(adapters))
    engine.start()
    try:
        rng = np.random.default_rng(4)
        jobs = [(rng.integers(1, 50000, n).tolist(), a) for n in (5, 40, 70) for a in (-1, 0, 1, 2)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(lambda job: engine.generate(job[0], 10, adapter=job[1], temperature=0)[0], jobs))
    finally:
        engine.stop()
    merged = [model] + [
        lora.merge(neo_jax.from_pretrained(gpt2_model_dir, adapter=d, progress=False)) for d in adapters.values()
    ]
    for (prompt, a), tokens in zip(jobs, results, strict=True):
        expected = np.asarray(neo_jax.generate(merged[a + 1], np.array(prompt), max_new_tokens=10))[0, len(prompt) :]
        assert tokens == expected.tolist(), (len(prompt), a)
    by_adapter = [tuple(tokens) for tokens in results[:4]]  # one prompt under the base and each adapter
    assert len(set(by_adapter)) == 4  # each adapter changes the output: the test can tell them apart


def test_prefill_and_prefix_cache_settings_are_checked(model):
    for options, message in [
        ({"prefill_chunk": 24}, "multiple of 16"),
        ({"prefill_chunk": -16}, "prefill_chunk"),
        ({"prefix_cache_mb": 0.01}, "holds no block"),
        ({"prefix_cache_mb": 1, "prefill_chunk": 0}, "needs chunked prefill"),
        ({"prefix_cache_mb": -1}, "prefix_cache_mb must be >= 0"),
        ({"prefix_cache_mb": 1e12}, "prefix_cache_mb 1e\\+12 needs .* GiB on a device, more than its"),
        ({"prefill_chunk": 1_000_000_000}, "prefill_chunk 1000000000 is longer than slots of max_len 64 can use"),
        ({"max_len": 10**6}, "exceeds the model's max_position_embeddings"),
        ({"adapters": ("a",)}, "adapter names"),
    ]:
        with pytest.raises(ValueError, match=message):
            Engine(model, **{"max_batch": 2, "max_len": 64} | options)
    assert clamped_chunk(1_000_000_000, 100) == 112 and clamped_chunk(64, 100) == 64  # what serve and plan use


def test_stop_strings_cut_as_openai_documents():
    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(TOKENIZER_DIR)
    ids = tokenizer("Hello world. The end\n\nmore text")["input_ids"]
    choice = _Choice(0, tokenizer, ["\n\n", "zzz"], None)
    streamed = []
    for i in ids:
        stopped = choice.add(Token(i, 0.0, []))
        streamed.append(choice.ready())
        if stopped:
            choice.finish_reason = "stop"
            break
    streamed.append(choice.ready())
    assert choice.text == "Hello world. The end"  # the stop string itself is not returned
    assert "".join(streamed) == "Hello world. The end"  # and no piece of it was ever streamed
    choice = _Choice(0, tokenizer, ["world", "Hello"], None)
    choice.add(Token(ids[0], 0.0, []))
    assert choice.text == ""  # the earliest stop wins, even at the very start


# ---- the server -------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir, *extra) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "neo_jax.cli", "serve", "--model", str(model_dir), "--port", str(port), *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stdout.read()}")
        try:
            if requests.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except requests.ConnectionError:
            time.sleep(0.2)
    process.kill()
    raise TimeoutError("the server did not start within 120 s")


@pytest.fixture(scope="module")
def server(gpt2_model_dir, adapters):
    """The module's server: the base as "neo" beside three adapters, with a prefix cache and n-gram speculative
    decoding, so that every server test also runs through them."""
    process, url = start_server(
        gpt2_model_dir,
        *("--max-batch", "4", "--max-len", str(MAX_LEN), "--api-key", KEY, "--served-model-name", "neo"),
        *("--header-timeout", str(HEADER_TIMEOUT), "--prefix-cache-mb", "2", "--prefill-chunk", "64"),
        *(flag for name, directory in adapters.items() for flag in ("--adapter", f"{name}={directory}")),
        *("--draft", "ngram", "--draft-tokens", "3"),
    )
    yield url, process
    process.terminate()
    process.wait(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def wait_until(condition, seconds: float) -> bool:
    """Poll ``condition`` every 10 ms until it holds (True) or ``seconds`` pass (False)."""
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.01)
    return True


def metric(url: str, name: str) -> float:
    for line in requests.get(url + "/metrics").text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_models_health_and_metrics(server, client):
    url, _ = server
    assert [(m.id, m.parent) for m in client.models.list()] == [("neo", None)] + [(a, "neo") for a in ADAPTERS]
    assert requests.get(url + "/health").json()["status"] == "ok"
    for name in ("neo_jax_queue_length", "neo_jax_active_slots", "neo_jax_generated_tokens_total"):
        metric(url, name)
    text = requests.get(url + "/metrics").text
    assert "neo_jax_time_to_first_token_seconds_bucket" in text and "neo_jax_inter_token_latency_seconds_bucket" in text


def test_greedy_through_the_server_equals_generate(server, client, model, gpt2_model_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(gpt2_model_dir)
    texts = ["The quick brown fox", "In a distant land, long ago,", "1 2 3"]
    response = client.completions.create(model="neo", prompt=texts, max_tokens=20, temperature=0)
    assert response.usage.completion_tokens == 60 and response.usage.prompt_tokens == sum(
        len(tokenizer(t)["input_ids"]) for t in texts
    )
    for text, choice in zip(texts, sorted(response.choices, key=lambda c: c.index), strict=True):
        ids = tokenizer(text)["input_ids"]
        expected = neo_jax.generate(model, np.array(ids), max_new_tokens=20)[0, len(ids) :]
        assert choice.text == tokenizer.decode(expected)
        assert choice.finish_reason == "length"
    streamed = client.completions.create(model="neo", prompt=texts[0], max_tokens=20, temperature=0, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == response.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    ids = tokenizer(texts[1])["input_ids"]  # token ids in, echo: the prompt's text comes back first
    echoed = client.completions.create(model="neo", prompt=ids, max_tokens=20, temperature=0, echo=True)
    assert echoed.choices[0].text == texts[1] + sorted(response.choices, key=lambda c: c.index)[1].text
    url, _ = server  # the first decode step of a speculating server is a round: the counters have counted
    drafts, drafted = (metric(url, f"neo_jax_spec_decode_{name}_total") for name in ("drafts", "draft_tokens"))
    assert drafted == 3 * drafts > 0 and 0 <= metric(url, "neo_jax_spec_decode_accepted_tokens_total") <= drafted


def test_min_tokens_and_logit_bias_through_the_server_equal_generate(client, model, gpt2_model_dir):
    """EOS pushed up by logit_bias and held back by min_tokens: each completion is exactly the min_tokens
    tokens of generate with the same settings; logit_bias alone stops at once."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(gpt2_model_dir)
    text = "Once upon a time"
    ids = tokenizer(text)["input_ids"]
    settings = dict(min_tokens=5, logit_bias={"50256": 100})
    response = client.completions.create(
        model="neo", prompt=[text, "1 2"], max_tokens=12, temperature=0, extra_body=settings
    )
    held = min(response.choices, key=lambda c: c.index)
    expected = neo_jax.generate(
        model, np.array(ids), max_new_tokens=12, min_new_tokens=5, logit_bias={50256: 100}, eos_token_id=50256
    )[0, len(ids) :]
    assert expected[5] == 50256 and held.finish_reason == "stop"
    assert held.text == tokenizer.decode(expected[:5])
    assert all(choice.finish_reason == "stop" for choice in response.choices)
    biased = client.completions.create(model="neo", prompt=text, max_tokens=4, temperature=0, logit_bias={"50256": 100})
    assert biased.choices[0].text == "" and biased.choices[0].finish_reason == "stop"
    # banned sequences, one of them reaching back into the prompt, each row its own, in one batch
    free = neo_jax.generate(model, np.array(ids), max_new_tokens=10)[0, len(ids) :].tolist()
    bans = [[[free[0]]], [[free[1], free[2]]], [[ids[-1], free[0]], [free[3]]]]
    requests_ = [dict(prompt=ids, max_tokens=10, temperature=0, extra_body={"bad_words_ids": ban}) for ban in bans]
    with ThreadPoolExecutor(len(bans)) as pool:
        answers = list(pool.map(lambda kwargs: client.completions.create(model="neo", **kwargs), requests_))
    for ban, answer in zip(bans, answers, strict=True):
        expected = neo_jax.generate(model, np.array(ids), max_new_tokens=10, bad_words_ids=ban, eos_token_id=50256)
        assert answer.choices[0].text == tokenizer.decode(expected[0, len(ids) :]), ban
        assert answer.choices[0].text != tokenizer.decode(free)


def test_each_adapter_through_the_server_equals_its_merged_model(server, client, gpt2_model_dir, adapters):
    from neo_jax import lora

    prompt = list(range(100, 140))
    for name, directory in adapters.items():
        merged = lora.merge(neo_jax.from_pretrained(gpt2_model_dir, adapter=directory, progress=False))
        expected = neo_jax.generate(merged, np.array(prompt), max_new_tokens=12)[0, len(prompt) :]
        response = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0)
        assert response.model == name and response.choices[0].text == merged_text(gpt2_model_dir, expected)
    r = requests.post(
        server[0] + "/v1/completions",
        json={"model": "nope", "prompt": "hi"},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=10,
    )
    error = r.json()["error"]
    assert r.status_code == 404 and error["param"] == "model" and all(name in error["message"] for name in adapters)


def merged_text(model_dir, ids) -> str:
    return transformers.AutoTokenizer.from_pretrained(model_dir).decode(ids)


def test_lm_eval_local_completions_equals_the_hf_backend(server, gpt2_model_dir, tmp_path, monkeypatch):
    """lm-eval's own API client (``local-completions``: echo, logprobs, token ids) on a multiple-choice task
    with a shared few-shot text (which the server's prefix cache serves), against lm-eval's ``hf`` backend."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    rng = random.Random(0)
    words = [
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
    ]
    sentence = lambda n: " ".join(rng.choice(words) for _ in range(n))
    shots = sentence(60)
    rows = [
        {
            "question": sentence(rng.randint(2, 12)),
            "choices": [sentence(rng.randint(1, 5)) for _ in range(4)],
            "label": i % 4,
        }
        for i in range(8)
    ]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "shared_mc.yaml").write_text(
        f"task: shared_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'mc.jsonl'}\n"
        f'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{shots}\\nQ: {{{{question}}}}\\nA:"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n'
    )
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    run = lambda model, model_args, **kw: lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["shared_mc"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
        **kw,
    )
    hits = metric(server[0], "neo_jax_prefix_cache_hits_total")
    ours = run(
        "local-completions",
        {
            "model": "neo",
            "base_url": server[0] + "/v1/completions",
            "tokenizer": str(gpt2_model_dir),
            "tokenizer_backend": "huggingface",
            "num_concurrent": 4,
            "max_length": MAX_LEN,
        },
    )
    theirs = run("hf", {"pretrained": str(gpt2_model_dir), "dtype": "float32"}, batch_size=4, device="cpu")
    assert metric(server[0], "neo_jax_prefix_cache_hits_total") > hits  # the shared text came from the cache
    compared = 0
    for a, b in zip(theirs["samples"]["shared_mc"], ours["samples"]["shared_mc"], strict=True):
        assert a["doc_id"] == b["doc_id"]
        for reference, mine in zip(a["resps"], b["resps"], strict=True):  # per choice: [(loglikelihood, greedy)]
            ((loglikelihood, greedy),), ((ours, ours_greedy),) = reference, mine
            assert abs(ours - loglikelihood) <= 1e-4 and ours_greedy == greedy
            compared += 1
    assert compared == 4 * len(rows)


def test_async_clients_stream_concurrently(server):
    async def main():
        async with openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0) as client:

            async def one(i: int):
                prompt = f"Story number {i}:"
                plain = await client.completions.create(model="neo", prompt=prompt, max_tokens=12, temperature=0)
                stream = await client.completions.create(
                    model="neo",
                    prompt=prompt,
                    max_tokens=12,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                chunks = [c async for c in stream]
                assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []
                return plain.choices[0].text, "".join(c.choices[0].text for c in chunks if c.choices)

            return await asyncio.gather(*(one(i) for i in range(8)))

    for plain, streamed in asyncio.run(main()):
        assert plain == streamed and plain


def test_sampled_requests_are_reproducible_with_a_seed(client):
    options = dict(model="neo", prompt="Once upon a time", max_tokens=16, temperature=0.9, top_p=0.95, seed=42)
    first = client.completions.create(**options, extra_body={"top_k": 50, "min_p": 0.01})
    again = client.completions.create(**options, extra_body={"top_k": 50, "min_p": 0.01})
    assert first.choices[0].text == again.choices[0].text
    two = client.completions.create(**options, n=2)
    assert two.choices[0].text != two.choices[1].text  # n choices are different samples


def test_stop_and_logprobs_through_the_server(client):
    plain = client.completions.create(model="neo", prompt="A B C", max_tokens=20, temperature=0, logprobs=3)
    text = plain.choices[0].text
    assert len(plain.choices[0].logprobs.tokens) == 20 and all(
        len(t) <= 3 for t in plain.choices[0].logprobs.top_logprobs
    )
    echoed = client.completions.create(model="neo", prompt="A B C", max_tokens=20, temperature=0, logprobs=3, echo=True)
    logprobs = echoed.choices[0].logprobs
    assert echoed.choices[0].text == "A B C" + text and len(logprobs.tokens) == 3 + 20
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[3:] == plain.choices[0].logprobs.token_logprobs
    assert "".join(logprobs.tokens) == echoed.choices[0].text and logprobs.text_offset[3] == len("A B C")
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = client.completions.create(model="neo", prompt="A B C", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="neo", prompt="A B C", max_tokens=20, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


BAD_BODIES = [  # (body or raw text, status, param)
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "hi " * 300, "max_tokens": 10}, 400, "prompt"),
    ({"prompt": [5] * 250, "max_tokens": 6}, 200, None),  # exactly the context
    ({"prompt": [5] * 250, "max_tokens": 7}, 400, "prompt"),
    ({"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "hi", "min_p": 2}, 400, "min_p"),
    ({"prompt": "hi", "top_k": -5}, 400, "top_k"),
    ({"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"prompt": "hi", "logprobs": 9}, 400, "logprobs"),
    ({"prompt": "hi", "n": 0}, 400, "n"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "hi", "seed": -1}, 400, "seed"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, 2, 99999999]}, 400, "prompt"),
    ({"prompt": [[1, 2], "x"]}, 400, "prompt"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "hi", "best_of": 3}, 400, "best_of"),
    ({"prompt": "hi", "suffix": "end"}, 400, "suffix"),
    ({"prompt": "hi", "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"prompt": "hi", "logit_bias": {"50256": -101}}, 400, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"50257": 1}}, 400, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"5": "a"}}, 400, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}}, 400, "logit_bias"),
    ({"prompt": "hi", "min_tokens": -1}, 400, "min_tokens"),
    ({"prompt": "hi", "bad_words_ids": [1, 2]}, 400, "bad_words_ids"),
    ({"prompt": "hi", "bad_words_ids": [[]]}, 400, "bad_words_ids"),
    ({"prompt": "hi", "bad_words_ids": [[50257]]}, 400, "bad_words_ids"),
    ({"prompt": "hi", "bad_words_ids": [[5]] * 17}, 400, "bad_words_ids"),
    ({"prompt": "hi", "bad_words_ids": [[5] * 9]}, 400, "bad_words_ids"),
    ({"prompt": "hi", "min_tokens": 17}, 400, "min_tokens"),  # more than max_tokens (16)
    ({"max_tokens": 3}, 400, "prompt"),
    ('{"model": "neo", "prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ('{"model": "neo", "prompt": "hi", "top_p": Infinity}', 400, "top_p"),
    ('{"model": "neo", "prompt": ', 400, None),
    ("[1, 2]", 400, None),
    # hostile values: a lone surrogate, ids past int64, strings and booleans for integers, seeds past the range
    ({"prompt": "a\ud800b"}, 400, "prompt"),
    ({"prompt": "hi", "model": "neo\ud800"}, 404, "model"),
    ({"prompt": [10**30]}, 400, "prompt"),
    ({"prompt": [[1, 10**30]]}, 400, "prompt"),
    ({"prompt": "hi", "max_tokens": "4"}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
    ({"prompt": "hi", "n": "2"}, 400, "n"),
    ({"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ({"prompt": "hi", "seed": 2**64}, 400, "seed"),
    ({"prompt": "hi", "seed": 2**63}, 400, "seed"),
    ({"prompt": "hi", "temperature": "0.5"}, 400, "temperature"),
    ({"prompt": ["hi"] * 17, "n": 16}, 400, "n"),  # 272 completions: more than the queue (256) ever holds
    ({"prompt": "x" * (MAX_CHARS + 1)}, 400, "prompt"),  # refused by length before it is tokenized
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    url, _ = server
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body, status, param in BAD_BODIES:
        data = body if isinstance(body, str) else json.dumps({"model": "neo", **body})
        r = requests.post(url + "/v1/completions", data=data, headers=headers)
        assert r.status_code == status, (body, r.text)
        if status != 200:
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], (body, error)
            assert error["param"] == param, (body, error)
    big = json.dumps({"model": "neo", "prompt": "x" * (5 << 20)})
    assert requests.post(url + "/v1/completions", data=big, headers=headers).status_code == 413
    r = requests.post(url + "/v1/chat/completions", json={"model": "neo", "messages": []}, headers=headers, timeout=10)
    assert r.status_code == 400 and "base language model" in r.json()["error"]["message"]
    for wrong in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}, {"Authorization": "Bearer "}):
        r = requests.post(url + "/v1/completions", json={"model": "neo", "prompt": "hi"}, headers=wrong)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(url + "/v1/models").status_code == 401
    r = requests.get(url + "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert client.completions.create(model="neo", prompt="still", max_tokens=3).usage.completion_tokens == 3


def test_any_accepted_temperature_or_seed_gives_a_sound_sample(client):
    """Tiny temperatures give the greedy text (not token 0 from inf - inf), a tiny repetition penalty stays
    finite, and every bit of a seed counts."""
    options = dict(model="neo", prompt="Once upon a time", max_tokens=12)
    greedy = client.completions.create(**options, temperature=0).choices[0].text
    for temperature in (1e-30, 1e-38, 1e-45, 1e-300):
        assert client.completions.create(**options, temperature=temperature, seed=1).choices[0].text == greedy
    penalized = client.completions.create(**options, temperature=1e-38, extra_body={"repetition_penalty": 1e-38})
    assert penalized.choices[0].finish_reason == "length" and "!!!!" not in penalized.choices[0].text
    sampled = {s: client.completions.create(**options, temperature=1.0, seed=s).choices[0].text for s in (5, 2**32 + 5)}
    assert sampled[5] != sampled[2**32 + 5]


def test_tokenizing_does_not_stall_the_server(server):
    """Eighty prompts of the longest length allowed take a while to tokenize, in a worker thread: meanwhile
    /health answers at once."""
    url, _ = server
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "neo", "prompt": ["lorem ipsum " * (MAX_CHARS // 12)] * 80, "max_tokens": 1}
    with ThreadPoolExecutor(1) as pool:
        big = pool.submit(requests.post, url + "/v1/completions", json=body, headers=headers, timeout=120)
        latencies = []
        while not big.done():
            start = time.perf_counter()
            assert requests.get(url + "/health", timeout=30).status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.05)
        response = big.result()
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert len(latencies) >= 5 and max(latencies) < 0.5, latencies


def test_half_open_connections_time_out_and_do_not_block_others(server, client):
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    stalled = []
    for _ in range(300):  # headers begun and never finished
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        stalled.append(s)
    body = socket.create_connection(("127.0.0.1", port))  # headers complete, the body never arrives
    body.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n".encode())
    body.sendall(b"Content-Length: 100\r\n\r\n{")
    try:
        assert client.completions.create(model="neo", prompt="still here", max_tokens=3).usage.completion_tokens == 3
        time.sleep(HEADER_TIMEOUT + 1)
        for s in stalled:
            s.settimeout(5)
            assert s.recv(1) == b""  # closed by the server
        body.settimeout(HEADER_TIMEOUT * 2)
        assert b"408" in body.recv(1000).split(b"\r\n", 1)[0]
    finally:
        for s in [*stalled, body]:
            s.close()
    assert client.completions.create(model="neo", prompt="still here", max_tokens=3).usage.completion_tokens == 3


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["\ud800", "neo\udfff"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
FIELDS = [*CompletionRequest.model_fields, "junk"]


def test_random_bodies_get_a_completion_or_an_openai_4xx(server, client):
    url, _ = server
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    small = st.fixed_dictionaries({"max_tokens": st.integers(1, 4)})  # keep the valid ones quick

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6), small, st.booleans())
    def check(fields, quick, named):
        body = quick | fields | ({"model": "neo"} if named else {})
        r = requests.post(url + "/v1/completions", data=json.dumps(body), headers=headers, timeout=60)
        assert r.status_code == 200 or 400 <= r.status_code < 500, (body, r.status_code, r.text)
        if r.status_code != 200:
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], (body, error)

    check()
    assert client.completions.create(model="neo", prompt="still", max_tokens=3).usage.completion_tokens == 3


def test_an_unexpected_failure_is_a_logged_500_in_openai_s_shape(gpt2_model_dir, caplog):
    from fastapi.testclient import TestClient

    from neo_jax.serve.app import create_app

    class Broken:
        model = type("M", (), {"config": SimpleNamespace(vocab_size=50257)})
        metrics, max_len, max_queue, adapters = Metrics(), 64, 8, ()

        def check(self, prompt, max_tokens):
            raise RuntimeError("a bug deep inside")

    tokenizer = transformers.AutoTokenizer.from_pretrained(gpt2_model_dir)
    with TestClient(create_app(Broken(), tokenizer, model_name="neo"), raise_server_exceptions=False) as http:
        r = http.post("/v1/completions", json={"model": "neo", "prompt": "hi"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "Traceback" not in r.text and "a bug deep inside" not in r.text
    assert "a bug deep inside" in caplog.text


def test_a_client_that_disconnects_frees_its_slot(server):
    url, _ = server
    before = (
        metric(url, 'neo_jax_requests_total{finish_reason="cancelled"}')
        if "cancelled" in requests.get(url + "/metrics").text
        else 0
    )
    body = {"model": "neo", "prompt": "Go on and on", "max_tokens": 240, "stream": True}
    r = requests.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, stream=True)
    lines = r.iter_lines()
    for _ in range(6):
        next(lines)
    assert metric(url, "neo_jax_active_slots") == 1
    r.close()
    assert wait_until(lambda: metric(url, "neo_jax_active_slots") == 0, 5)
    assert metric(url, 'neo_jax_requests_total{finish_reason="cancelled"}') == before + 1


def test_soak_with_cancellations(server):
    url, process = server
    headers = {"Authorization": f"Bearer {KEY}"}
    rss = lambda: psutil.Process(process.pid).memory_info().rss
    for _ in range(16):  # warm-up: every allocator pool in use once
        requests.post(
            url + "/v1/completions", json={"model": "neo", "prompt": "warm", "max_tokens": 8}, headers=headers
        )
    baseline = rss()
    statuses, malformed = [], []

    def one(i: int):
        rng = random.Random(i)
        body = {
            "model": "neo",
            "prompt": " ".join(["word"] * rng.randint(1, 60)),
            "max_tokens": rng.randint(1, 24),
            "temperature": rng.choice([0, 0.8]),
            "stream": rng.random() < 0.5,
        }
        try:
            r = requests.post(url + "/v1/completions", json=body, headers=headers, stream=body["stream"], timeout=60)
            statuses.append(r.status_code)
            if body["stream"]:
                lines = [line for line in r.iter_lines() if line]
                if rng.random() < 0.3:  # cancel partway
                    r.close()
                    return
                assert lines[-1] == b"data: [DONE]"
                chunks = [json.loads(line[6:]) for line in lines[:-1]]
                assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
            else:
                choice = r.json()["choices"][0]
                assert isinstance(choice["text"], str) and choice["finish_reason"] in ("stop", "length")
        except AssertionError as error:
            malformed.append((i, error))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(300)))
    assert len(statuses) == 300 and all(s == 200 for s in statuses), sorted(set(statuses))
    assert malformed == []
    assert rss() < 1.10 * baseline
    assert requests.get(url + "/health").json()["active_slots"] == 0


def test_playground_streams_the_greedy_completion_in_a_browser(server, client):
    """The base model, then an adapter picked from the page's model list: each the greedy completion the API
    gives for that model."""
    url, _ = server
    expected = {
        name: client.completions.create(model=name, prompt="The playground", max_tokens=24, temperature=0)
        for name in ("neo", "mlp")
    }
    assert expected["neo"].choices[0].text != expected["mlp"].choices[0].text
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService("/usr/bin/chromedriver"))
    try:
        driver.get(url + "/")
        driver.find_element(By.ID, "api_key").send_keys(KEY)
        box = driver.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys("The playground")
        for name, value in (("max_tokens", "24"), ("temperature", "0")):
            field = driver.find_element(By.ID, name)
            field.clear()
            field.send_keys(value)  # leaving the key's field fires its change: the model list loads with the key
        picker = Select(driver.find_element(By.ID, "model"))
        WebDriverWait(driver, 30).until(lambda d: len(picker.options) == 1 + len(ADAPTERS))
        assert [o.get_attribute("value") for o in picker.options] == ["neo", *ADAPTERS]
        for name in ("neo", "mlp"):
            picker.select_by_value(name)
            driver.execute_script("document.getElementById('status').dataset.done = ''")
            driver.find_element(By.ID, "generate").click()
            done = lambda d: d.find_element(By.ID, "status").get_attribute("data-done") == "1"
            WebDriverWait(driver, 60).until(done)
            assert driver.find_element(By.ID, "error").text == ""
            completion = driver.execute_script("return document.getElementById('completion').textContent")
            assert completion == expected[name].choices[0].text, name
            assert "tokens/s" in driver.find_element(By.ID, "status").text
    finally:
        driver.quit()


def test_full_queue_is_429_and_sigterm_drains(gpt2_model_dir):
    """Also: a prefill chunk of a billion tokens (OOM-killed after 'ready', before) is clamped to the slots, and
    the log says so."""
    process, url = start_server(
        gpt2_model_dir, "--max-batch", "1", "--max-queue", "2", "--max-len", "256", "--prefill-chunk", "1000000000"
    )
    try:
        body = {"model": str(gpt2_model_dir), "prompt": "long", "max_tokens": 200, "temperature": 0}
        post = lambda: requests.post(url + "/v1/completions", json=body)
        with ThreadPoolExecutor(3) as pool:
            # One at a time: three sent together can all be waiting before the engine takes the first (~1 s of
            # decoding once it runs), and the third is then the one refused.
            busy = [pool.submit(post)]
            assert wait_until(lambda: metric(url, "neo_jax_active_slots") == 1, 30)
            busy += [pool.submit(post) for _ in range(2)]
            assert wait_until(lambda: metric(url, "neo_jax_queue_length") == 2, 30)
            r = post()
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
            process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            r = post()
            assert r.status_code == 503
            results = [f.result(timeout=120) for f in busy]
        assert [r.status_code for r in results] == [200, 200, 200]
        assert all(r.json()["choices"][0]["finish_reason"] == "length" for r in results)
        assert process.wait(60) == 0
        assert "--prefill-chunk is longer than a slot of 256 positions can use: prefilling 256" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()


def test_a_model_without_tokenizer_files_is_refused_before_loading(tmp_path):
    from neo_jax.hf import load_tokenizer

    transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(**SMALL)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


def test_serve_flags_are_checked_before_loading(tmp_path, gpt2_model_dir):
    """Flags, then what needs the model's config (an adapter of another base, a prefix cache too small for one
    block): each a one-line error and exit 2 before any weights load (the port stays free, nothing is written)."""
    from neo_jax import lora, peft

    other = neo_jax.from_pretrained(save_gpt2_vocab_model(tmp_path / "other", hidden_size=32), progress=False)
    other_adapter = peft.save(lora.add(other, lora.LoRAConfig(r=2)), tmp_path / "other-adapter")
    missing, model = str(tmp_path / "missing"), str(gpt2_model_dir)
    cases = [
        (missing, ["--max-batch", "0"], "--max-batch"),
        (missing, ["--port", "70000"], "--port"),
        (missing, ["--drain-timeout", "nan"], "--drain-timeout"),
        (missing, ["--api-key", ""], "--api-key"),
        (missing, ["--mesh", "2,x,1"], "mesh"),
        (missing, ["--prefill-chunk", "24"], "--prefill-chunk must be a multiple of 16"),
        (missing, ["--prefix-cache-mb", "-1"], "--prefix-cache-mb must be >= 0"),
        (missing, ["--prefix-cache-mb", "8", "--prefill-chunk", "0"], "--prefix-cache-mb"),
        (missing, ["--adapter", "a=x", "--adapter", "y"], "--adapter"),
        (missing, ["--adapter", "=x"], "--adapter"),
        (model, ["--adapter", f"x={other_adapter}"], f"--adapter x={other_adapter}: "),
        (model, ["--adapter", f"x={tmp_path / 'nothing'}"], "--adapter x="),
        (model, ["--adapter", f"neo={other_adapter}", "--served-model-name", "neo"], "already taken"),
        (model, ["--prefix-cache-mb", "0.001"], "holds no block"),
    ]
    code = (
        "import sys, contextlib, io\n"
        "from neo_jax.cli import main\n"
        "for model, extra in __import__('json').loads(sys.argv[1]):\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        status = main(['serve', '--model', model, '--port', '0', *extra])\n"
        "    print(status, err.getvalue().strip().replace('\\n', ' | '))\n"
    )
    args = json.dumps([(model, extra) for model, extra, _ in cases])
    out = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.strip().splitlines() if line[:2] in ("0 ", "1 ", "2 ")]
    assert len(lines) == len(cases), out.stdout + out.stderr
    for line, (_, _, name) in zip(lines, cases, strict=True):
        assert line.startswith("2 neo-jax serve: error:") and name in line and "|" not in line, line
    assert not os.path.exists(missing)
