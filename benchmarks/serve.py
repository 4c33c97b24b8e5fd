"""Serving load: `neo-jax serve` under concurrent streaming clients, in three workloads, each side by side in
one run on the same random 125M-shape weights (seed 0), float32.

    python benchmarks/serve.py [--workloads burst,prefix,adapters,embeddings] [--requests 64] [--concurrency 16]
                               [--max-batch 16] [--max-len 1024] [--prefill-chunk 64] [--skip-baselines]

- "burst": prompt lengths uniform in [16, 512] tokens (random ids), ``max_tokens`` uniform in [16, 256],
  greedy, all sent at once by ``--concurrency`` clients; the server with whole-prompt prefill
  (``--prefill-chunk 0``, the scheduling before chunking) against chunked prefill. Per server: generated
  tokens/s over the whole run (first request sent to last token received), time to first token p50/p99
  and inter-token latency p50/p99 as the clients saw them (gaps between streamed chunks), and the startup
  time, compilation included. Unless ``--skip-baselines``, also the same requests one at a time through
  ``neo_jax.generate`` (compile time left out) and transformers' ``generate`` in static left-padded batches.
- "prefix": lm-eval's own ``local-completions`` model running a multiple-choice task (a shared few-shot
  text of ~400 tokens before each question, four choices: lm-eval sends one echo request per choice)
  through the server, without and with ``--prefix-cache-mb``; wall time and the cache's hit metrics.
- "adapters": requests spread over four rank-16 LoRA adapters (q, v, c_fc) served as ``--adapter NAME=DIR``
  by one server, against the base model alone on the same requests, and against four servers of the
  adapters merged into the base, ``--max-batch / 4`` slots each (the same total), each request sent to its
  adapter's server.
- "embeddings": 8 completion streams alone, then beside 16 clients sending embedding requests back to back; the
  streams' inter-token latency p50/p99 in both and their ratio (`/v1/embeddings` prefills inside the decode
  step's budget, so the ratio should stay near 1).
- "speculative" (``--pair TARGET DRAFT --corpus FILES``, the pair ``benchmarks/generate.py --pair`` takes):
  the target served plain, with ``--draft DRAFT``, with ``--draft ngram``, and with a poor draft (the draft's
  shape, untrained: almost nothing it proposes is accepted, so the off switch must keep it near plain);
  greedy requests of 64 tokens on prompts cut from the corpus ("open-ended") and on prompts that end by
  starting to repeat a passage they hold ("grounded"), at 1 and 4 concurrent streams: tokens/s, the ratio to
  plain, and the acceptance rate from ``/metrics``.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import openai
import requests
import torch
import transformers
from common import WORDS, same_weights

import neo_jax

TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "gpt2-tokenizer"


def workload(count: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(1, 50000, int(rng.integers(16, 513))).tolist(), int(rng.integers(16, 257))) for _ in range(count)
    ]


def percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 4) if values else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def drive(urls, jobs, concurrency: int) -> dict:
    """``jobs``: (prompt, max_tokens, model name, index into ``urls``)."""
    gate = asyncio.Semaphore(concurrency)
    ttft, gaps, tokens = [], [], []
    clients = [openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600) for url in urls]
    try:

        async def one(prompt, max_tokens, model, server):
            client = clients[server]
            async with gate:
                start = time.perf_counter()
                stream = await client.completions.create(
                    model=model,
                    prompt=prompt,
                    max_tokens=max_tokens,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                last = None
                async for chunk in stream:
                    now = time.perf_counter()
                    if chunk.usage is not None:
                        tokens.append(chunk.usage.completion_tokens)
                    if chunk.choices and chunk.choices[0].text:
                        if last is None:
                            ttft.append(now - start)
                        else:
                            gaps.append(now - last)
                        last = now

        start = time.perf_counter()
        await asyncio.gather(*(one(*job) for job in jobs))
        seconds = time.perf_counter() - start
    finally:
        for client in clients:
            await client.close()
    return {
        "generated_tokens": sum(tokens),
        "seconds": round(seconds, 2),
        "tokens_per_s": round(sum(tokens) / seconds, 1),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "inter_token_p50_s": percentile(gaps, 50),
        "inter_token_p99_s": percentile(gaps, 99),
    }


def one_at_a_time(model, jobs) -> dict:
    compiling = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiling.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    start = time.perf_counter()
    for prompt, max_tokens in jobs:
        neo_jax.generate(model, np.array(prompt), max_new_tokens=max_tokens)
    seconds = time.perf_counter() - start
    jax.monitoring.unregister_event_duration_listener(listener)
    tokens = sum(n for _, n in jobs)
    net = seconds - sum(compiling)
    return {
        "generated_tokens": tokens,
        "seconds": round(seconds, 2),
        "compile_seconds": round(sum(compiling), 2),
        "tokens_per_s": round(tokens / net, 1),
    }


def static_batches(reference, jobs, batch: int) -> dict:
    start = time.perf_counter()
    for i in range(0, len(jobs), batch):
        group = jobs[i : i + batch]
        width = max(len(p) for p, _ in group)
        ids = torch.zeros((len(group), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (prompt, _) in enumerate(group):
            ids[row, width - len(prompt) :] = torch.as_tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        longest = max(n for _, n in group)
        with torch.no_grad():
            reference.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=longest,
                min_new_tokens=longest,
                do_sample=False,
                pad_token_id=0,
            )
    seconds = time.perf_counter() - start
    tokens = sum(n for _, n in jobs)
    return {"generated_tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


@contextlib.contextmanager
def server(directory, *extra: str):
    """A ``neo-jax serve`` process on ``directory``; yields its URL and startup seconds (to healthy)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "neo_jax.cli", "serve", "--model", str(directory), "--port", str(port)]
    command += ["--compilation-cache", "none", *extra]
    start = time.perf_counter()
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    try:
        while True:
            if process.poll() is not None:
                raise SystemExit(f"the server exited during startup: {' '.join(command)}")
            try:
                if requests.get(url + "/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        yield url, round(time.perf_counter() - start, 1)
    finally:
        process.terminate()
        process.wait(60)


def metrics(url: str, *names: str) -> dict:
    lines = requests.get(url + "/metrics", timeout=10).text.splitlines()
    return {n: float(line.rsplit(" ", 1)[1]) for n in names for line in lines if line.startswith(n + " ")}


def burst(directory, args) -> dict:
    jobs = [(p, n, "neo", 0) for p, n in workload(args.requests)]
    flags = ["--served-model-name", "neo", "--max-batch", str(args.max_batch), "--max-len", str(args.max_len)]
    result = {}
    for name, chunk in (("whole_prompt_prefill", 0), ("chunked_prefill", args.prefill_chunk)):
        with server(directory, *flags, "--prefill-chunk", str(chunk)) as (url, startup):
            result[name] = asyncio.run(drive([url], jobs, args.concurrency)) | {
                "prefill_chunk": chunk,
                "startup_s": startup,
            }
    before, after = result["whole_prompt_prefill"], result["chunked_prefill"]
    result["ratios"] = {
        key: round(after[key] / before[key], 2)
        for key in ("tokens_per_s", "ttft_p50_s", "ttft_p99_s", "inter_token_p50_s", "inter_token_p99_s")
    }
    return result


def prefix(directory, args) -> dict:
    """lm-eval's local-completions model on a multiple-choice task with a long shared few-shot text."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    rng = random.Random(0)
    sentence = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))
    shots = sentence(380)
    with tempfile.TemporaryDirectory() as tasks:
        rows = [
            {
                "question": sentence(rng.randint(5, 20)),
                "choices": [sentence(rng.randint(1, 4)) for _ in range(4)],
                "label": i % 4,
            }
            for i in range(args.prefix_docs)
        ]
        Path(tasks, "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        Path(tasks, "shared_prefix_mc.yaml").write_text(
            "task: shared_prefix_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {Path(tasks, 'mc.jsonl')}\ntest_split: test\noutput_type: multiple_choice\n"
            f'doc_to_text: "{shots}\\nQuestion: {{{{question}}}}\\nAnswer:"\n'
            'doc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n'
        )
        flags = ["--served-model-name", "neo", "--max-batch", str(args.max_batch), "--max-len", "512"]
        result = {}
        for name, budget in (("no_prefix_cache", 0), ("prefix_cache", 256)):
            with server(directory, *flags, "--prefix-cache-mb", str(budget)) as (url, startup):
                start = time.perf_counter()
                out = lm_eval.simple_evaluate(
                    model="local-completions",
                    model_args={
                        "model": "neo",
                        "base_url": url + "/v1/completions",
                        "tokenizer": str(directory),
                        "tokenizer_backend": "huggingface",
                        "num_concurrent": args.concurrency,
                        "max_retries": 1,
                    },
                    tasks=["shared_prefix_mc"],
                    task_manager=TaskManager(include_path=tasks),
                )
                seconds = time.perf_counter() - start
                names = (
                    "neo_jax_prefix_cache_hits_total",
                    "neo_jax_prefix_cache_misses_total",
                    "neo_jax_prefix_cache_tokens_total",
                    "neo_jax_prompt_tokens_total",
                )
                result[name] = {
                    "seconds": round(seconds, 2),
                    "acc": out["results"]["shared_prefix_mc"]["acc,none"],
                    "startup_s": startup,
                } | metrics(url, *names)
    result["speedup"] = round(result["no_prefix_cache"]["seconds"] / result["prefix_cache"]["seconds"], 2)
    result["same_accuracy"] = result["no_prefix_cache"]["acc"] == result["prefix_cache"]["acc"]
    result["requests"] = 4 * args.prefix_docs
    return result


def make_adapters(directory, root: Path, count: int) -> tuple[list[Path], list[Path]]:
    """``count`` random rank-16 PEFT adapters of the base in ``directory``, and each merged into the base."""
    import jax

    from neo_jax import lora, peft

    adapters, merged = [], []
    for i in range(count):
        model = neo_jax.from_pretrained(directory, progress=False)
        lora.add(model, lora.LoRAConfig(r=16, alpha=32, targets=("q_proj", "v_proj", "c_fc")), seed=i)
        for j, (_, dense) in enumerate(lora.adapted_layers(model)):
            if dense.lora is not None:
                dense.lora.b.set_value(0.02 * jax.random.normal(jax.random.key(100 * i + j), dense.lora.b.shape))
        adapters.append(peft.save(model, root / f"adapter-{i}", base_model=str(directory)))
        neo_jax.save_pretrained(lora.merge(model), root / f"merged-{i}", progress=False)
        transformers.GPT2TokenizerFast.from_pretrained(TOKENIZER).save_pretrained(root / f"merged-{i}")
        merged.append(root / f"merged-{i}")
    return adapters, merged


def mixed_adapters(directory, args) -> dict:
    count = 4
    rng = np.random.default_rng(1)
    prompts = [
        (rng.integers(1, 50000, int(rng.integers(16, 129))).tolist(), int(rng.integers(32, 97)))
        for _ in range(args.requests)
    ]
    base = ["--max-batch", str(args.max_batch), "--max-len", "512", "--served-model-name", "neo"]
    result = {}
    with tempfile.TemporaryDirectory() as root:
        adapters, merged = make_adapters(directory, Path(root), count)
        with server(directory, *base) as (url, startup):
            result["base_alone"] = asyncio.run(drive([url], [(p, n, "neo", 0) for p, n in prompts], args.concurrency))
        named = [flag for i, a in enumerate(adapters) for flag in ("--adapter", f"a{i}={a}")]
        with server(directory, *base, *named) as (url, startup):
            jobs = [(p, n, f"a{i % count}", 0) for i, (p, n) in enumerate(prompts)]
            result["four_adapters_one_server"] = asyncio.run(drive([url], jobs, args.concurrency)) | {
                "startup_s": startup
            }
        with contextlib.ExitStack() as stack:
            slots = [
                "--max-batch",
                str(max(1, args.max_batch // count)),
                "--max-len",
                "512",
                "--served-model-name",
                "neo",
            ]
            urls = [stack.enter_context(server(m, *slots))[0] for m in merged]
            jobs = [(p, n, "neo", i % count) for i, (p, n) in enumerate(prompts)]
            result["four_merged_servers"] = asyncio.run(drive(urls, jobs, args.concurrency))
    tokens = lambda name: result[name]["tokens_per_s"]
    result["ratio_adapters_vs_base"] = round(tokens("four_adapters_one_server") / tokens("base_alone"), 2)
    result["ratio_adapters_vs_merged_servers"] = round(
        tokens("four_adapters_one_server") / tokens("four_merged_servers"), 2
    )
    return result


def embeddings_load(directory, args) -> dict:
    """8 completion streams (prompts of 16-512 tokens, 128 new tokens each) alone, then while 16 clients send
    embedding requests (one input of 16-512 token ids each) back to back; the streams' inter-token latency in
    both, and how many inputs were embedded meanwhile."""
    jobs = [(prompt, 128, "neo", 0) for prompt, _ in workload(8, seed=3)]
    flags = ["--served-model-name", "neo", "--max-batch", str(args.max_batch), "--max-len", str(args.max_len)]
    with server(directory, *flags, "--prefill-chunk", str(args.prefill_chunk)) as (url, startup):
        alone = asyncio.run(drive([url], jobs, len(jobs)))
        loaded = asyncio.run(beside_embedders(url, jobs, 16))
    return {
        "streams": len(jobs),
        "alone": alone,
        "with_16_embedding_clients": loaded,
        "inter_token_p99_ratio": round(loaded["inter_token_p99_s"] / alone["inter_token_p99_s"], 2),
        "inter_token_p50_ratio": round(loaded["inter_token_p50_s"] / alone["inter_token_p50_s"], 2),
        "startup_s": startup,
    }


async def beside_embedders(url: str, jobs, clients: int) -> dict:
    stop, embedded = asyncio.Event(), []
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)

    async def embedder(seed: int) -> None:
        rng, count = random.Random(seed), 0
        while not stop.is_set():
            ids = [rng.randint(1, 50000) for _ in range(rng.randint(16, 512))]
            await client.embeddings.create(model="neo", input=[ids])  # base64, as the client asks by default
            count += 1
        embedded.append(count)

    running = [asyncio.create_task(embedder(i)) for i in range(clients)]
    await asyncio.sleep(2)  # the embedding load is on before the streams start
    result = await drive([url], jobs, len(jobs))
    stop.set()
    await asyncio.gather(*running)
    await client.close()
    return result | {"inputs_embedded": sum(embedded)}


def speculative(directory, args) -> dict:
    """The "speculative" workload (``directory`` is not used: the pair brings its own weights)."""
    target, draft = args.pair
    tokenizer = transformers.AutoTokenizer.from_pretrained(target)
    corpus = np.array(tokenizer(" ".join(Path(f).read_text() for f in args.corpus))["input_ids"])
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(corpus) - 200, 16)
    prompts = {
        "open-ended": [corpus[s : s + 64].tolist() for s in starts],
        "grounded": [np.concatenate([corpus[s : s + 96], corpus[s : s + 8]]).tolist() for s in starts],
    }
    names = ("drafts", "draft_tokens", "accepted_tokens")
    counters = [f"neo_jax_spec_decode_{name}_total" for name in names]
    flags = ["--served-model-name", "neo", "--max-batch", "4", "--max-len", "512", "--draft-tokens", str(args.k)]
    result = {"pair": args.pair, "draft_tokens": args.k}
    with tempfile.TemporaryDirectory() as poor:
        config = transformers.AutoConfig.from_pretrained(draft)
        torch.manual_seed(0)
        transformers.GPTNeoForCausalLM(config).save_pretrained(poor)
        tokenizer.save_pretrained(poor)
        for name, extra in (("plain", []), ("draft", ["--draft", draft]), ("ngram", ["--draft", "ngram"]),
                            ("poor_draft", ["--draft", poor])):  # fmt: skip
            with server(target, *flags, *extra) as (url, startup):
                runs = {"startup_s": startup}
                for kind, ids in prompts.items():
                    for streams in (1, 4):
                        before = metrics(url, *counters)
                        jobs = [(p, 64, "neo", 0) for p in ids[: 4 * streams]]
                        run = asyncio.run(drive([url], jobs, streams))
                        after = metrics(url, *counters)
                        drafted = after.get(counters[1], 0) - before.get(counters[1], 0)
                        accepted = after.get(counters[2], 0) - before.get(counters[2], 0)
                        runs[f"{kind}_{streams}"] = {
                            "tokens_per_s": run["tokens_per_s"],
                            "acceptance": round(accepted / drafted, 3) if drafted else None,
                        }
                result[name] = runs
            print(json.dumps({name: result[name]}), file=sys.stderr, flush=True)
    for name in ("draft", "ngram", "poor_draft"):
        for run, figures in result[name].items():
            if run != "startup_s":
                figures["vs_plain"] = round(figures["tokens_per_s"] / result["plain"][run]["tokens_per_s"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/gpt-neo-125M.json")
    parser.add_argument("--workloads", default="burst,prefix,adapters,embeddings")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--prefill-chunk", type=int, default=64)
    parser.add_argument("--prefix-docs", type=int, default=16, help="documents of the prefix workload's task")
    parser.add_argument("--skip-baselines", action="store_true", help="no one-at-a-time or transformers runs")
    parser.add_argument("--pair", nargs=2, metavar=("TARGET", "DRAFT"), help="the speculative workload's models")
    parser.add_argument("--corpus", nargs="+", help="the speculative workload's text (the pair's training text)")
    parser.add_argument("--draft-tokens", dest="k", type=int, default=4)
    args = parser.parse_args()
    if "speculative" in args.workloads.split(",") and not (args.pair and args.corpus):
        parser.error("the speculative workload needs --pair TARGET DRAFT and --corpus FILES")

    workloads = args.workloads.split(",")
    reference, model = same_weights(args.config)
    result = {
        "benchmark": "serve",
        "config": args.config,
        "dtype": "float32",
        "device": str(jax.devices()[0]),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_batch": args.max_batch,
    }
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        transformers.GPT2TokenizerFast.from_pretrained(TOKENIZER).save_pretrained(directory)
        runs = {"burst": burst, "prefix": prefix, "adapters": mixed_adapters, "embeddings": embeddings_load}
        runs["speculative"] = speculative
        for name in workloads:
            result[name] = runs[name](directory, args)
            print(json.dumps({name: result[name]}), file=sys.stderr, flush=True)
    if "burst" in workloads and not args.skip_baselines:
        jobs = workload(args.requests)
        result["one_at_a_time"] = one_at_a_time(model, jobs)
        result["transformers_static_batches"] = static_batches(reference, jobs, args.concurrency)
        tokens_per_s = result["burst"]["chunked_prefill"]["tokens_per_s"]
        result["ratio_vs_one_at_a_time"] = round(tokens_per_s / result["one_at_a_time"]["tokens_per_s"], 2)
        result["ratio_vs_transformers"] = round(tokens_per_s / result["transformers_static_batches"]["tokens_per_s"], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
