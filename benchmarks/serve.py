"""Serving load: `neo-jax serve` under 16 concurrent streaming clients, against the same requests one at a
time through `neo_jax.generate` and against transformers' `generate` in static left-padded batches.

    python benchmarks/serve.py [--requests 64] [--concurrency 16] [--max-batch 16] [--max-len 1024]
                               [--skip-baselines]

The same random 125M-shape weights (seed 0) everywhere, float32. The workload is seeded: prompt lengths
uniform in [16, 512] tokens (random ids), ``max_tokens`` uniform in [16, 256], greedy. Prints one JSON
object:

- "server": generated tokens/s over the whole run (first request sent to last token received), time to
  first token p50/p99 and inter-token latency p50/p99 as the clients saw them (gaps between streamed
  chunks), and the startup time from process start to a healthy server, compilation included;
- "one_at_a_time": the same requests in order through ``neo_jax.generate``, tokens/s with the time spent
  compiling (measured through ``jax.monitoring``) left out, so that the ratio is not flattered by it;
- "transformers_static_batches": ``GPTNeoForCausalLM.generate`` on batches of ``--concurrency`` requests,
  left-padded, each batch run to its longest request; only the tokens each request asked for count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
from common import same_weights

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


async def drive(url: str, model: str, jobs, concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    ttft, gaps, tokens = [], [], []
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600) as client:

        async def one(prompt, max_tokens):
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
        await asyncio.gather(*(one(p, n) for p, n in jobs))
        seconds = time.perf_counter() - start
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/gpt-neo-125M.json")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--skip-baselines", action="store_true", help="the server only")
    args = parser.parse_args()

    jobs = workload(args.requests)
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
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "neo_jax.cli", "serve", "--model", directory, "--port", str(port)]
        command += ["--max-batch", str(args.max_batch), "--max-len", str(args.max_len), "--compilation-cache", "none"]
        start = time.perf_counter()
        server = subprocess.Popen(command, stderr=subprocess.DEVNULL)
        try:
            while True:
                if server.poll() is not None:
                    raise SystemExit("the server exited during startup")
                try:
                    if requests.get(url + "/health", timeout=1).status_code == 200:
                        break
                except requests.ConnectionError:
                    time.sleep(0.1)
            startup = time.perf_counter() - start
            served = asyncio.run(drive(url, directory, jobs, args.concurrency))
            served["startup_s"] = round(startup, 1)
            result["server"] = served
        finally:
            server.terminate()
            server.wait(60)
    if not args.skip_baselines:
        result["one_at_a_time"] = one_at_a_time(model, jobs)
        result["transformers_static_batches"] = static_batches(reference, jobs, args.concurrency)
        tokens_per_s = result["server"]["tokens_per_s"]
        result["ratio_vs_one_at_a_time"] = round(tokens_per_s / result["one_at_a_time"]["tokens_per_s"], 2)
        result["ratio_vs_transformers"] = round(tokens_per_s / result["transformers_static_batches"]["tokens_per_s"], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
