"""The data path: prepare throughput, loader throughput, and what a run's start costs as the corpus grows.

    python benchmarks/data.py [--tokens 2000000] [--scale 10] [--old-commit REV] [--skip-125m]

Prints one JSON object:
- ``prepare``: tokens/s of ``neo_jax.prepare.prepare`` (JSONL -> uint16 shards) with 1 and 2 processes, against
  Hugging Face ``datasets``: ``load_dataset("json")`` then ``.map(tokenizer, batched=True, num_proc=N)``
  (both alone and together), on the larger corpus, the same GPT-2 tokenizer, single-threaded in each
  process (``TOKENIZERS_PARALLELISM=false``) so that N processes mean N cores;
- ``formats``: tokens/s of preparing the smaller corpus as plain ``.jsonl``, as ``.jsonl.zst`` and as Parquet
  (two processes each), and each compressed form's ratio to the plain file;
- ``loader``: tokens/s of reading random 125M-sized batches (16 x 2048) through ``Batches`` and placing them
  with ``Loader``, against the tokens/s one 125M train step consumes on this machine (float32, 4 x 512);
- ``start``: for the two corpora (``--tokens`` and ``--scale`` times as many), the peak RSS, the time from launch
  to the first step's metrics, and the loader's wait over the step time, of ``neo-jax train`` on a prepared
  directory (a 2-layer GPT-Neo of GPT-2's vocabulary from its config: the model is not the point); with
  ``--old-commit`` the same runs on raw text through that commit's in-memory data path, for contrast.

The corpora are made of the English fixture's paragraphs, shuffled and numbered, one JSONL document each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # each process one core, on both sides
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

ROOT = Path(__file__).parents[1]
SMALL_MODEL = dict(
    vocab_size=50257, hidden_size=256, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]]
)


def make_corpus(path: Path, tokens: int) -> None:
    """About ``tokens`` GPT-2 tokens of English, as JSONL documents of 1-6 shuffled fixture paragraphs."""
    paragraphs = [
        p.strip()
        for f in sorted((ROOT / "tests/fixtures/english").glob("*.txt"))
        for p in f.read_text().split("\n\n")
        if p.strip()
    ]
    rng = np.random.default_rng(0)
    chars, target = 0, tokens * 4.6  # ~4.6 characters per GPT-2 token on this text
    with path.open("w") as f:
        number = 0
        while chars < target:
            picked = [paragraphs[i] for i in rng.integers(0, len(paragraphs), rng.integers(1, 7))]
            text = f"Document {number}.\n\n" + "\n\n".join(picked)
            f.write(json.dumps({"text": text}) + "\n")
            chars += len(text)
            number += 1


def timed(fn):
    began = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - began


def prepare_throughput(corpus: Path, tokenizer: Path, work: Path) -> dict:
    from neo_jax import prepare
    from neo_jax.data import TokenData

    out = {}
    for procs in (1, 2):
        target = work / f"prepared-{procs}"
        began = time.perf_counter()
        prepare.prepare([str(corpus)], target, tokenizer, num_proc=procs, progress=False)
        seconds = time.perf_counter() - began
        tokens = TokenData(target).train.tokens
        out[f"neo_jax_{procs}_proc_tokens_per_s"] = round(tokens / seconds)
        out["tokens"] = tokens
        shutil.rmtree(target)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer)
    for procs in (1, 2):
        cache = work / f"hf-cache-{procs}"
        began = time.perf_counter()
        loaded = datasets.load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(cache))
        load_s, began = time.perf_counter() - began, time.perf_counter()
        mapped = loaded.map(
            lambda batch: {"input_ids": hf(batch["text"])["input_ids"]},
            batched=True,
            num_proc=procs if procs > 1 else None,
            remove_columns=["text"],
            load_from_cache_file=False,
        )
        map_s = time.perf_counter() - began
        tokens = sum(len(ids) for ids in mapped["input_ids"])
        out[f"datasets_map_{procs}_proc_tokens_per_s"] = round(tokens / map_s)
        out[f"datasets_load_and_map_{procs}_proc_tokens_per_s"] = round(tokens / (load_s + map_s))
        shutil.rmtree(cache)
    out["neo_jax_scaling_1_to_2"] = round(out["neo_jax_2_proc_tokens_per_s"] / out["neo_jax_1_proc_tokens_per_s"], 2)
    out["vs_datasets_map_2_proc"] = round(
        out["neo_jax_2_proc_tokens_per_s"] / out["datasets_map_2_proc_tokens_per_s"], 2
    )
    return out


def formats_throughput(corpus: Path, tokenizer: Path, work: Path, repeats: int = 3) -> dict:
    """tokens/s of preparing the same documents as plain .jsonl, .jsonl.zst (zstd level 3, as the Pile ships) and
    Parquet (1 MiB row groups), two processes each, medians of ``repeats`` runs taken in turn."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    from neo_jax import prepare
    from neo_jax.data import TokenData

    texts = [json.loads(line)["text"] for line in corpus.open()]
    files = {"jsonl": corpus, "jsonl.zst": work / "corpus.jsonl.zst", "parquet": work / "corpus.parquet"}
    files["jsonl.zst"].write_bytes(zstandard.ZstdCompressor(level=3).compress(corpus.read_bytes()))
    pq.write_table(pa.table({"text": texts}), files["parquet"], row_group_size=max(1, len(texts) // 64))
    seconds: dict[str, list[float]] = {name: [] for name in files}
    tokens = 0
    for _ in range(repeats):
        for name, path in files.items():
            target = work / f"prepared-{name}"
            began = time.perf_counter()
            prepare.prepare([str(path)], target, tokenizer, num_proc=2, progress=False)
            seconds[name].append(time.perf_counter() - began)
            tokens = TokenData(target).train.tokens
            shutil.rmtree(target)
    rate = {name: round(tokens / statistics.median(times)) for name, times in seconds.items()}
    out = {f"{name}_tokens_per_s": value for name, value in rate.items()}
    out |= {f"{name}_vs_jsonl": round(rate[name] / rate["jsonl"], 2) for name in ("jsonl.zst", "parquet")}
    return out | {"mb": {name: round(path.stat().st_size / 2**20, 1) for name, path in files.items()}}


def loader_throughput(directory: Path, skip_125m: bool) -> dict:
    import jax

    from neo_jax.data import Batches, Loader, TokenData

    batches = Batches(TokenData(directory), seq_len=2048, batch_size=16, seed=0)
    steps = 50
    _, read_s = timed(lambda: [batches.batch(k) for k in range(steps)])
    loader = Loader(batches, start=0)
    _, placed_s = timed(lambda: [jax.block_until_ready(loader.next()[0]) for _ in range(steps)])
    loader.close()
    tokens = steps * 16 * 2048
    out = {"read_tokens_per_s": round(tokens / read_s), "loader_tokens_per_s": round(tokens / placed_s)}
    if not skip_125m:
        import jax.numpy as jnp

        from neo_jax.config import GPTNeoConfig
        from neo_jax.model import init_model
        from neo_jax.train import make_optimizer, train_step

        model = init_model(GPTNeoConfig.preset("125M"))
        optimizer = make_optimizer(model)
        ids = jnp.asarray(batches.batch(0)[:4, :512])
        jax.block_until_ready(train_step(model, optimizer, ids))
        times = [timed(lambda: jax.block_until_ready(train_step(model, optimizer, ids)))[1] for _ in range(3)]
        consumed = 4 * 512 / statistics.median(times)
        out |= {
            "step_125m_tokens_per_s": round(consumed, 1),
            "loader_over_step": round(out["loader_tokens_per_s"] / consumed),
        }
    return out


def run_start(command: list[str], output: Path, env: dict, cwd: Path = ROOT) -> dict:
    """Peak RSS, time to the first step's metrics line, and the loader's wait over step time, of one run
    (``python -m neo_jax.cli`` imports the package of ``cwd``)."""
    probe = (
        "import resource, subprocess, sys, time, pathlib, json\n"
        "began = time.perf_counter(); p = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "m = pathlib.Path(sys.argv[1]) / 'metrics.jsonl'; first = None\n"
        "while p.poll() is None:\n"
        "    if first is None and m.exists() and m.read_text().strip(): first = time.perf_counter() - began\n"
        "    time.sleep(0.02)\n"
        "first = first or time.perf_counter() - began\n"
        "print(json.dumps({'rc': p.returncode, 'first_step_s': first, 'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(output), *command],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        check=False,
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    if measured["rc"] != 0:
        raise RuntimeError(f"{command} failed")
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    waits = [r["data_wait_s"] / r["seconds"] for r in records[1:] if "data_wait_s" in r]
    return {
        "peak_rss_mb": round(measured["peak_rss_mb"], 1),
        "first_step_s": round(measured["first_step_s"], 2),
        "wait_over_step": round(statistics.median(waits), 5) if waits else None,
    }


def train_command(model: Path, data: Path, output: Path) -> list[str]:
    """A short ``neo-jax train`` run: 6 steps of 8 x 512 tokens, float32, no checkpoint until the end."""
    settings = ["--steps", "6", "--batch-size", "8", "--seq-len", "512", "--dtype", "float32", "--save-every", "1000"]
    command = ["train", "--model", str(model), "--data", str(data), "--output", str(output), *settings]
    return [sys.executable, "-m", "neo_jax.cli", *command]


def start_costs(corpora: dict, tokenizer: Path, work: Path, old_commit: str | None) -> dict:
    from neo_jax import prepare

    config = work / "small.json"
    config.write_text(json.dumps(SMALL_MODEL))
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    out = {}
    for name, corpus in corpora.items():
        prepared = work / f"prepared-{name}"
        prepare.prepare([str(corpus)], prepared, tokenizer, num_proc=2, progress=False)
        output = work / f"run-{name}"
        command = train_command(config, prepared, output)
        out[f"prepared_{name}"] = run_start(command, output, env)
    if old_commit:
        import torch
        import transformers

        old = work / "old"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "-f", "--detach", str(old), old_commit],
            check=True,
            capture_output=True,
        )
        model = work / "old-model"
        torch.manual_seed(0)
        transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(**SMALL_MODEL)).save_pretrained(model)
        for f in tokenizer.iterdir():
            shutil.copy(f, model / f.name)
        try:
            for name, corpus in corpora.items():
                output = work / f"old-run-{name}"
                command = [*train_command(model, corpus, output), "--validation-fraction", "0"]
                out[f"old_raw_{name}"] = run_start(command, output, os.environ | {"PYTHONPATH": str(old)}, cwd=old)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    small, large = out["prepared_small"], out["prepared_large"]
    out["prepared_rss_growth_mb"] = round(large["peak_rss_mb"] - small["peak_rss_mb"], 1)
    out["prepared_first_step_growth_s"] = round(large["first_step_s"] - small["first_step_s"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, default=2e6, help="tokens of the smaller corpus")
    parser.add_argument("--scale", type=int, default=10, help="the larger corpus is this many times bigger")
    parser.add_argument("--old-commit", help="also time that commit's in-memory data path on raw text")
    parser.add_argument("--skip-125m", action="store_true", help="leave out the 125M train step")
    args = parser.parse_args()
    import transformers

    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        tokenizer = work / "tokenizer"
        transformers.GPT2TokenizerFast.from_pretrained(ROOT / "tests/fixtures/gpt2-tokenizer").save_pretrained(
            tokenizer
        )
        corpora = {"small": work / "small.jsonl", "large": work / "large.jsonl"}
        make_corpus(corpora["small"], int(args.tokens))
        make_corpus(corpora["large"], int(args.tokens * args.scale))
        result = {"benchmark": "data", "cpus": os.cpu_count()}
        result["prepare"] = prepare_throughput(corpora["large"], tokenizer, work)
        result["formats"] = formats_throughput(corpora["small"], tokenizer, work)
        start = start_costs(corpora, tokenizer, work, args.old_commit)
        result["loader"] = loader_throughput(work / "prepared-large", args.skip_125m)
        result["start"] = start
        result["corpus_mb"] = {k: round(v.stat().st_size / 2**20, 1) for k, v in corpora.items()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
