"""``neo-jax`` command line: thin wrappers over the library functions."""

from __future__ import annotations

import _thread
import argparse
import gc
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from neo_jax.config import DTYPES, REMAT, WEIGHTS

WEIGHTS_HELP = "weight format: float32, bfloat16, or int8 weight-only (neo_jax.quantize); default: --dtype"
ATTENTION_HELP = "attention implementation: auto, dense, blockwise, splash (TPU) or cudnn (GPU); see neo_jax.attention"


def convert(args: argparse.Namespace) -> None:
    from neo_jax.checkpoints import check_destination
    from neo_jax.convert import from_pretrained, save_pretrained, trained_lora
    from neo_jax.hf import resolve
    from neo_jax.quantize import is_quantized

    start = time.perf_counter()
    source = resolve(args.src, args.revision)
    run = trained_lora(source)
    if args.merge and not (args.adapter or run):
        raise ValueError("--merge folds adapters into the weights: give them with --adapter PEFT_DIR, or a LoRA run")
    if args.adapter and not args.merge and args.to != "peft":
        raise ValueError("--adapter needs --merge: the hf and orbax formats hold plain weights")
    if args.to == "peft" and not (args.adapter or run):
        raise ValueError(f"{args.src} has no LoRA adapters to write: --to peft takes a `neo-jax train --lora-rank` run")
    if args.weights == "int8" and (args.to != "orbax" or args.adapter or run):
        raise ValueError("--weights int8 writes --to orbax, from plain weights (merge adapters in a first convert)")
    check_destination(args.dst, args.overwrite, source)  # before the weights are read
    model = from_pretrained(
        source, dtype=args.dtype, param_dtype=args.dtype, weights=args.weights, adapter=args.adapter
    )
    from neo_jax import lora

    if args.to == "peft":  # the adapters alone, from a LoRA run (or --adapter)
        base = run[1] if run else str(args.src)
        out = lora.save(model, args.dst, base_model=base, overwrite=args.overwrite)
        print(f"wrote {out} (PEFT LoRA adapter) in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        return
    if args.merge or lora.has_lora(model):
        lora.merge(model)  # W + scale * B @ A in float32, stored in --dtype
    out = save_pretrained(model, args.dst, format=args.to, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    weights = "int8" if is_quantized(model) else args.weights or args.dtype
    print(
        f"wrote {out} ({args.to}, {weights}, {model.config.num_params() / 1e6:.1f}M parameters) "
        f"in {time.perf_counter() - start:.1f}s",
        file=sys.stderr,
    )


def enable_compilation_cache(directory: str | None) -> None:
    """JAX's persistent compilation cache, so a second run skips compiling (``--compilation-cache``,
    ``$NEO_JAX_COMPILATION_CACHE``, default ``~/.cache/neo_jax/jax``; ``none`` turns it off)."""
    import jax

    directory = directory or os.environ.get("NEO_JAX_COMPILATION_CACHE") or "~/.cache/neo_jax/jax"
    if directory.lower() != "none":
        jax.config.update("jax_compilation_cache_dir", str(Path(directory).expanduser()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def sampling_options(args: argparse.Namespace) -> dict:
    """Greedy unless a sampling knob is given; validated (``SamplingParams.of``) before anything loads or
    compiles. The flags carry ``SamplingParams.of``'s keyword names."""
    from neo_jax.generation import SamplingParams, check_beams

    knobs = {name: getattr(args, name) for name in ("temperature", "top_k", "top_p", "min_p")}
    knobs = {name: value for name, value in knobs.items() if value is not None}
    if args.top_k is not None and args.top_k <= 0:
        raise ValueError(f"--top-k must be a positive number of tokens, got {args.top_k}")
    if args.num_beams > 1 and knobs:
        raise ValueError("--num-beams is beam search: it cannot be combined with --temperature/--top-k/--top-p/--min-p")
    options = {"do_sample": bool(knobs), **knobs, "repetition_penalty": args.repetition_penalty}
    check_beams(SamplingParams.of(**options), args.num_beams)
    return options | {"num_beams": args.num_beams, "seed": args.seed}


def generate(args: argparse.Namespace) -> None:
    prompt = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
    if not prompt:
        raise ValueError("empty prompt: pass --prompt TEXT or --prompt-file FILE with some text")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    options = sampling_options(args)
    from neo_jax.attention import check_implementation
    from neo_jax.generation import check_stop

    check_stop(args.stop)
    check_implementation(args.attention)
    enable_compilation_cache(args.compilation_cache)

    from neo_jax.generation import TextGenerator

    generator = TextGenerator(
        args.model,
        dtype=args.dtype,
        param_dtype=args.dtype,
        weights=args.weights,
        attention=args.attention,
        adapter=args.adapter,
    )
    beams = options.pop("num_beams")
    start = time.perf_counter()
    first, pieces = None, []
    if beams > 1:  # beam search decides at the end: nothing to stream
        pieces = generator(prompt, max_new_tokens=args.max_new_tokens, stop=args.stop, num_beams=beams, **options)
        tokens = len(generator.tokenizer(pieces[0])["input_ids"])
    else:
        continuation = generator.stream(prompt, max_new_tokens=args.max_new_tokens, stop=args.stop, **options)
        for piece in continuation:
            if INTERRUPTED.is_set():
                raise KeyboardInterrupt
            first = first or time.perf_counter() - start
            pieces.append(piece)
            if not args.json:
                print(piece, end="", flush=True)
        tokens = continuation.new_tokens
    elapsed = time.perf_counter() - start
    first = first or elapsed
    completion = "".join(pieces)
    if args.json:
        print(
            json.dumps(
                {
                    "prompt": prompt,
                    "completion": completion,
                    "new_tokens": tokens,
                    "time_to_first_token_s": round(first, 3),
                    "seconds": round(elapsed, 3),
                }
            )
        )
    else:
        print(completion if beams > 1 else "")
    print(
        f"time to first token {first:.2f}s; {tokens} tokens in {elapsed:.2f}s = {tokens / elapsed:.1f} tokens/s "
        "(a first run includes compilation)",
        file=sys.stderr,
    )


def serve(args: argparse.Namespace) -> int:
    """Checked here, before anything loads: the serve extra, the numbers, the mesh."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ImportError("neo-jax serve needs FastAPI and uvicorn: pip install 'neo_jax[serve]'") from None
    from neo_jax import sharding, validate

    validate.integer("--port", args.port, least=0, most=65535)
    validate.integer("--max-batch", args.max_batch, least=1)
    validate.integer("--max-queue", args.max_queue, least=1)
    if args.max_len is not None:
        validate.integer("--max-len", args.max_len, least=2)
    validate.real("--drain-timeout", args.drain_timeout)
    if args.drain_timeout < 0:
        raise ValueError(f"--drain-timeout must be >= 0 seconds, got {args.drain_timeout}")
    validate.real("--header-timeout", args.header_timeout)
    if args.header_timeout <= 0:
        raise ValueError(f"--header-timeout must be > 0 seconds, got {args.header_timeout}")
    validate.integer("--max-connections", args.max_connections, least=1)
    from neo_jax.serve.app import check_api_key

    if args.api_key is not None:
        api_key = check_api_key(args.api_key, "--api-key")
    else:
        api_key = check_api_key(os.environ.get("NEO_JAX_API_KEY"), "NEO_JAX_API_KEY")
    if args.mesh:
        sharding.parse_mesh(args.mesh)
    enable_compilation_cache(args.compilation_cache)
    from neo_jax.serve.server import serve as run

    return run(
        args.model,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_len=args.max_len,
        max_queue=args.max_queue,
        dtype=args.dtype,
        mesh=args.mesh,
        api_key=api_key,
        drain_timeout=args.drain_timeout,
        served_model_name=args.served_model_name,
        adapter=args.adapter,
        weights=args.weights,
        header_timeout=args.header_timeout,
        max_connections=args.max_connections,
    )


def plan(args: argparse.Namespace) -> None:
    from neo_jax import plan as planning
    from neo_jax.attention import check_implementation, compiling_for
    from neo_jax.sharding import parse_mesh

    settings = {}
    if args.config:  # a fine-tuning YAML: its model, batch, seq, accumulation, remat, dtype, mesh and slice
        from neo_jax.finetune import FinetuneConfig

        run = FinetuneConfig.load(args.config, data=["-"], output="-", model=args.model)
        settings = {
            "model": run.model,
            "batch": run.batch_size,
            "seq": run.seq_len,
            "grad_accum": run.grad_accum,
            "remat": run.remat,
            "dtype": run.dtype,
            "mesh": run.mesh,
            "topology": run.topology,
            "attention": run.attention,
            "lora_rank": run.lora_rank or None,
            "lora_targets": run.lora_targets,
            "lora_dropout": run.lora_dropout,
            "weights": run.lora_base if run.lora_base == "int8" else None,
        }
    for key, value in settings.items():  # flags given on the command line win
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.grad_accum, args.remat = args.grad_accum or 1, args.remat or "none"
    if args.weights is not None:
        if args.task == "train" and not (args.weights == "int8" and args.lora_rank):
            raise ValueError(
                "training keeps float32 weights (a LoRA base: --dtype): --weights is for --task generate, or int8 "
                "with --lora-rank for a QLoRA-style frozen base"
            )
        if args.weights != "int8" and args.dtype not in (None, args.weights):
            raise ValueError(f"--weights {args.weights} and --dtype {args.dtype} disagree: give one of them")
    args.dtype = args.dtype or (args.weights if args.weights in DTYPES else "bfloat16")
    args.attention = args.attention or "auto"
    lora = None
    if args.lora_rank:
        from neo_jax.lora import LoRAConfig

        targets = tuple(t.strip() for t in (args.lora_targets or "q_proj,v_proj").split(",") if t.strip())
        lora = LoRAConfig(r=args.lora_rank, targets=targets, dropout=args.lora_dropout or 0.0)
    with compiling_for("tpu"):  # a plan is for a TPU slice, whatever this host is
        check_implementation(args.attention)
    if args.model is None:
        raise ValueError("--model (or --config) is required")
    if args.task == "train" and (args.batch is None or args.seq is None):
        raise ValueError("--batch and --seq are required for --task train (or give --config)")
    if args.task == "generate" and args.batch is None:
        raise ValueError("--batch is required for --task generate")
    for flag, example in (("topology", "a TPU slice such as v5e-8"), ("mesh", "D,F,T")):
        if getattr(args, flag) is not None and not getattr(args, flag).strip():
            raise ValueError(f"--{flag} is empty: give {example}, or leave it out")
    if args.topology is None and args.mesh is None:
        raise ValueError("give --topology (a TPU slice such as v5e-8) or --mesh D,F,T")
    mesh = parse_mesh(args.mesh) if args.mesh else None
    if mesh is not None and args.topology is None and any(size < 1 for size in mesh.values()):
        raise ValueError(f"--mesh needs the three sizes themselves (no -1) to plan for, got {args.mesh!r}")
    if args.topology is not None and not args.no_compile:
        from neo_jax import aot

        aot.require_libtpu()
    config = _config(args.model)
    where = {"topology": args.topology, "mesh": mesh, "dtype": args.dtype, "compile": not args.no_compile}
    if args.task == "train":
        result = planning.train_report(
            config,
            batch=args.batch,
            seq=args.seq,
            remat=args.remat,
            grad_accum=args.grad_accum,
            attention=args.attention,
            lora=lora,
            int8=args.weights == "int8",
            **where,
        )
    else:
        result = planning.generate_report(
            config,
            batch=args.batch,
            max_len=args.max_len,
            prompt_len=args.prompt_len,
            int8=args.weights == "int8",
            **where,
        )
    if args.json:
        print(json.dumps({"model": args.model, "task": args.task, "topology": args.topology} | result, default=str))
        return
    data, fsdp, tensor = result["mesh"].values()
    how = "compiled by XLA:TPU" if args.topology and not args.no_compile else "estimated"
    print(
        f"{args.model} {args.task} on {args.topology or 'a mesh'} (data={data} fsdp={fsdp} tensor={tensor}), "
        f"{_describe(args, result)}; {how}"
    )
    print(planning.describe(result))


def _config(model: str):
    """A preset by size (125M) or by the released model's hub id, without the network; else the model's own."""
    from neo_jax.config import PRESETS, GPTNeoConfig
    from neo_jax.hf import resolve_config

    size = model.removeprefix("EleutherAI/gpt-neo-")
    return GPTNeoConfig.preset(size) if size in PRESETS else resolve_config(model)


def _describe(args, result) -> str:
    if args.task == "generate":
        weights = "int8" if args.weights == "int8" else args.dtype
        return (
            f"batch {args.batch}, {result['max_len']} positions ({result['prompt_len']} of prompt), {weights} weights"
        )
    from neo_jax.attention import choose

    chosen = choose(args.attention, args.seq, args.dtype, on="tpu")
    attention = chosen if args.attention == chosen else f"{args.attention} ({chosen})"
    weights = (
        f"{'int8' if args.weights == 'int8' else args.dtype} frozen weights + float32 LoRA r={args.lora_rank} "
        "adapters and their AdamW"
        if args.lora_rank
        else "float32 weights + AdamW"
    )
    return (
        f"batch {args.batch} x seq {args.seq}, grad_accum {args.grad_accum}, remat {args.remat}, "
        f"{args.dtype} compute, {weights}, {attention} attention"
    )


def add_settings(parser: argparse.ArgumentParser) -> None:
    """One flag per ``FinetuneConfig`` setting, with its type, choices and help (the default shown is the
    setting's; the flag's own default is None, so a YAML file's value is kept unless the flag is given)."""
    import dataclasses

    from neo_jax.settings import FinetuneConfig

    types = FinetuneConfig.types()
    for field in dataclasses.fields(FinetuneConfig):
        kind, meta = types[field.name], field.metadata
        default = "" if field.default is None else f" (default {field.default})"
        options = {"help": meta["help"] + default, "choices": meta["choices"]}
        if kind is bool:
            options |= {"action": argparse.BooleanOptionalAction}
        elif field.name == "data":
            options |= {"nargs": "+"}
        else:
            options |= {"type": kind if kind in (int, float) else str}
        parser.add_argument("--" + field.name.replace("_", "-"), **options)


def train(args: argparse.Namespace) -> int:
    from neo_jax.finetune import FinetuneConfig, finetune

    settings = {name: getattr(args, name, None) for name in FinetuneConfig.fields()}
    config = FinetuneConfig.load(args.config, **settings)
    result = finetune(config)
    print(json.dumps(result))
    return 130 if result["stopped"] == "sigint" else 0  # a Ctrl-C ends with the shell's status for SIGINT


def data_prepare(args: argparse.Namespace) -> None:
    from neo_jax.prepare import prepare, summary

    start = time.perf_counter()
    out = prepare(
        args.sources,
        args.output,
        args.tokenizer,
        num_proc=args.num_proc,
        shard=args.shard,
        validation_docs=args.validation_docs or 0,
        validation_fraction=args.validation_fraction or 0.0,
        text_field=args.text_field,
        split=args.split,
        overwrite=args.overwrite,
    )
    print(summary(out, time.perf_counter() - start), file=sys.stderr)


def eval_perplexity(args: argparse.Namespace) -> None:
    from neo_jax.data import expand_paths

    expand_paths(args.data)  # missing files fail before the model loads

    from neo_jax import validate
    from neo_jax.convert import from_pretrained
    from neo_jax.evaluate import corpus_tokens, perplexity, windows_of
    from neo_jax.hf import load_tokenizer, resolve, resolve_config

    directory = resolve(args.model, args.revision)
    windows_of(args.seq_len, args.stride, resolve_config(directory).max_position_embeddings)
    validate.integer("--batch-size", args.batch_size, least=1)
    tokens = corpus_tokens(args.data, load_tokenizer(directory), text_field=args.text_field, split=args.split)
    model = from_pretrained(
        directory, dtype=args.dtype, param_dtype=args.dtype, weights=args.weights, adapter=args.adapter
    )
    result = perplexity(
        model, tokens, seq_len=args.seq_len, stride=args.stride, batch_size=args.batch_size, progress=True
    )
    print(json.dumps(result))


def eval_harness(args: argparse.Namespace) -> None:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError("neo-jax eval harness needs lm-evaluation-harness: pip install 'neo_jax[eval]'") from None
    import neo_jax.lm_eval  # noqa: F401 (registers the model name "neo-jax")

    tasks = [t for t in args.tasks.split(",") if t]
    manager = TaskManager(include_path=args.include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}: check the names, or add --include-path DIR with their YAML")
    for task in tasks:  # read each task and its data before the model loads: a broken one is named
        try:
            manager.load([task])
        except Exception as e:  # noqa: BLE001 (lm-eval and datasets raise anything, StopIteration to IndexError)
            entry = manager.task_index.get(task)
            where = getattr(entry, "yaml_path", None)
            data = ((getattr(entry, "cfg", None) or {}).get("dataset_kwargs") or {}).get("data_files")
            detail = " ".join(f"{type(e).__name__} {e}".split())[:300]
            raise ValueError(
                f"task {task} ({where}{f', data {data}' if data else ''}) could not be read: {detail}; check its files"
            ) from None
    model_args = {"pretrained": args.model, "dtype": args.dtype, "batch_size": args.batch_size}
    if args.mesh:
        model_args["mesh"] = args.mesh
    if args.adapter:
        model_args["peft"] = args.adapter
    if args.weights:
        model_args["weights"] = args.weights
    results = lm_eval.simple_evaluate(
        model="neo-jax",
        model_args=model_args,
        tasks=tasks,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        task_manager=manager,
        log_samples=False,
        random_seed=args.seed,
        numpy_random_seed=args.seed,
        fewshot_random_seed=args.seed,
    )
    summary = {"model": args.model, "results": results["results"], "n-shot": results.get("n-shot", {})}
    text = json.dumps(summary, indent=1, default=str)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neo-jax", description="GPT-Neo in JAX / Flax NNX.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser(
        "convert",
        help="convert a checkpoint between Hugging Face (safetensors/.bin) and neo_jax's Orbax format",
        description="Read SRC (hub id, Hugging Face directory or neo_jax Orbax directory) and write DST.",
    )
    p.add_argument("src", help="hub id (e.g. EleutherAI/gpt-neo-125M) or local directory")
    p.add_argument("dst", help="output directory (must not exist or be empty, unless --overwrite)")
    p.add_argument(
        "--to",
        choices=("orbax", "hf", "peft"),
        default="orbax",
        help="output format (default: orbax); peft: a LoRA run's adapters alone; a LoRA run to hf/orbax is merged",
    )
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written weights")
    p.add_argument("--weights", choices=WEIGHTS, help="orbax: write int8 weights (neo_jax.quantize); default: --dtype")
    p.add_argument("--max-shard-size", default="2GB", help="hf format: split safetensors above this size")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--adapter", help="a PEFT LoRA adapter directory to fold into the weights (with --merge)")
    p.add_argument("--merge", action="store_true", help="merge --adapter into the written weights")
    p.set_defaults(run=convert)

    p = commands.add_parser(
        "generate",
        help="continue a prompt, streaming the text as it is produced",
        description="Greedy by default; --temperature/--top-k/--top-p/--min-p switch to sampling, "
        "--num-beams > 1 to beam search. Time to first token and tokens/s go to stderr.",
    )
    p.add_argument("--model", required=True, help="hub id, Hugging Face directory or neo_jax Orbax directory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, help="sampling temperature (> 0 samples, 0 is greedy)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="nucleus sampling: smallest set reaching this probability")
    p.add_argument("--min-p", type=float, help="drop tokens below this fraction of the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", help="stop before this string (repeatable)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="compute and weight dtype")
    p.add_argument("--weights", choices=WEIGHTS, help=WEIGHTS_HELP)
    p.add_argument("--attention", default="auto", help=ATTENTION_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    p.add_argument("--adapter", help="a PEFT LoRA adapter directory to apply (unmerged)")
    p.add_argument("--compilation-cache", help="JAX compilation cache directory ('none' to disable)")
    p.set_defaults(run=generate)

    p = commands.add_parser(
        "serve",
        help="an OpenAI-compatible completions server with continuous batching",
        description="Serve /v1/completions (OpenAI's API), /v1/models, /health, /metrics and a playground at /.",
    )
    p.add_argument("--model", required=True, help="hub id, Hugging Face directory or neo_jax Orbax directory")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="slots: sequences generated at once")
    p.add_argument("--max-len", type=int, help="tokens per slot, prompt + completion (default: the model's maximum)")
    p.add_argument("--max-queue", type=int, default=256, help="requests that may wait for a slot (then 429)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="compute and weight dtype")
    p.add_argument("--weights", choices=WEIGHTS, help=WEIGHTS_HELP)
    p.add_argument("--mesh", help="D,F,T: shard the model and the slots over a device mesh")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ (or set NEO_JAX_API_KEY)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="SIGTERM: seconds to finish requests in flight")
    p.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a client may take to send a request's headers, and again its body (then 408)",
    )
    p.add_argument("--max-connections", type=int, default=2048, help="open connections served at once (past them: 503)")
    p.add_argument("--served-model-name", help="the model name clients send (default: --model as given)")
    p.add_argument("--adapter", help="a PEFT LoRA adapter directory to apply (unmerged)")
    p.add_argument("--compilation-cache", help="JAX compilation cache directory ('none' to disable)")
    p.set_defaults(run=serve)

    p = commands.add_parser(
        "plan",
        help="per-chip memory, FLOPs and a roofline of fine-tuning or generation, before launching",
        description="With --topology (a TPU slice such as v5e-8, v4-8, v5e-256) the programs of neo-jax train or "
        "neo-jax generate are compiled for that slice by XLA:TPU on this machine (needs libtpu: pip install "
        "'neo_jax[tpu]'), and its memory figures are printed; --no-compile (or --mesh alone) gives the estimate. "
        "Parameters, AdamW state, gradients and the KV cache are exact for the mesh and sharding rules.",
    )
    p.add_argument("--model", help="125M, 1.3B, 2.7B, or anything from_pretrained reads")
    p.add_argument("--config", help="a fine-tuning YAML (configs/finetune-*.yaml): its settings, flags override")
    p.add_argument("--topology", help="TPU slice to compile for: v5e-1, v5e-8, v4-8, v5p-8, v6e-8, v5e-256, ...")
    p.add_argument("--mesh", help="D,F,T: data, fsdp and tensor sizes (default with --topology: every chip on fsdp)")
    p.add_argument("--task", choices=("train", "generate"), default="train")
    p.add_argument("--batch", type=int, help="global batch size (sequences)")
    p.add_argument("--seq", type=int, help="train: sequence length")
    p.add_argument("--grad-accum", type=int, help="train: micro-batches per step (default 1)")
    p.add_argument("--remat", choices=REMAT, help="train: recompute activations (default none)")
    p.add_argument("--max-len", type=int, help="generate: positions in all (default: the model's maximum)")
    p.add_argument("--prompt-len", type=int, help="generate: prompt tokens (default: half of --max-len)")
    p.add_argument("--dtype", choices=DTYPES, help="train: compute dtype (weights float32); generate: weights")
    p.add_argument("--attention", help=ATTENTION_HELP + " (default auto)")
    p.add_argument("--lora-rank", type=int, help="train: LoRA adapters of this rank only (the base frozen in --dtype)")
    p.add_argument("--lora-targets", help="train: layers LoRA adapts (default q_proj,v_proj)")
    p.add_argument("--lora-dropout", type=float, help="train: LoRA dropout (its masks' memory; default 0)")
    p.add_argument(
        "--weights",
        choices=WEIGHTS,
        help="generate: weight format (default: --dtype); train: int8 with --lora-rank for a frozen int8 base",
    )
    p.add_argument("--no-compile", action="store_true", help="the estimate, without compiling")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=plan)

    p = commands.add_parser(
        "train",
        help="fine-tune or pretrain on your text: resumable, with Orbax checkpoints and metrics",
        description="Settings come from --config (a YAML file such as configs/finetune-125M.yaml), then the "
        "flags. Running the same command again resumes from the latest checkpoint in --output; SIGTERM saves "
        "and exits 0. Writes OUTPUT/metrics.jsonl, OUTPUT/loss.png and OUTPUT/checkpoints/; prints the last "
        "step's metrics as JSON.",
    )
    p.add_argument("--config", help="YAML file of settings (the flags override it)")
    add_settings(p)
    p.set_defaults(run=train)

    p = commands.add_parser("data", help="prepare training data: tokenize a corpus once into token shards")
    which = p.add_subparsers(dest="action", required=True)
    d = which.add_parser(
        "prepare",
        help="tokenize text files, JSONL, saved datasets or hf:NAME once into flat token shards and a manifest",
        description="Streams the documents, encodes them in --num-proc processes, joins them with EOS and writes "
        "uint16 (or uint32) shards and DIR/manifest.json, with the tokenizer's files: DIR alone is enough to "
        "`neo-jax train --data DIR`. The validation split is made of whole documents. Running the same command "
        "again continues an interrupted prepare from its last complete shard.",
    )
    d.add_argument("sources", nargs="+", help="text files, globs, .jsonl, saved datasets, hf:NAME[:CONFIG]")
    d.add_argument("--output", required=True, help="the directory to write (new or empty, unless --overwrite)")
    d.add_argument("--tokenizer", required=True, help="hub id or directory with the tokenizer files (e.g. the model)")
    d.add_argument("--num-proc", type=int, help="encoding processes (default: every core)")
    d.add_argument("--shard", help="I/N: prepare part I (from 0) of N, every N-th document; DIR can hold all parts")
    held_out = d.add_mutually_exclusive_group()
    held_out.add_argument(
        "--validation-docs", type=int, help="hold out the first K documents (of each --shard part) for validation"
    )
    held_out.add_argument(
        "--validation-fraction", type=float, help="hold out this share of documents, spread evenly (default: none)"
    )
    d.add_argument("--text-field", default="text", help="JSONL/dataset field holding the text")
    d.add_argument("--split", default="train", help="dataset split")
    d.add_argument("--overwrite", action="store_true", help="replace what DIR holds (with --shard: this part's files)")
    d.set_defaults(run=data_prepare, command="data prepare")

    p = commands.add_parser("eval", help="perplexity, or lm-evaluation-harness tasks")
    which = p.add_subparsers(dest="evaluation", required=True)
    e = which.add_parser(
        "perplexity",
        help="strided sliding-window perplexity of text files",
        description="Documents are tokenized and joined with EOS; windows of --seq-len tokens start every "
        "--stride tokens and each scores only its new tokens, so every token is scored once with up to "
        "--seq-len tokens of context. Prints JSON {perplexity, nll, tokens}.",
    )
    e.add_argument("--model", required=True, help="hub id, Hugging Face directory, Orbax directory or train output")
    e.add_argument("--data", nargs="+", required=True, help="text files, globs, .jsonl, saved datasets, hf:NAME")
    e.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's maximum)")
    e.add_argument("--stride", type=int, default=None, help="tokens between window starts (default 512)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--dtype", choices=DTYPES, default="float32")
    e.add_argument("--weights", choices=WEIGHTS, help=WEIGHTS_HELP)
    e.add_argument("--text-field", default="text")
    e.add_argument("--split", default="train")
    e.add_argument("--revision", default=None)
    e.add_argument("--adapter", help="a PEFT LoRA adapter directory to apply (unmerged)")
    e.set_defaults(run=eval_perplexity, command="eval perplexity")
    e = which.add_parser(
        "harness",
        help="run lm-evaluation-harness tasks through the neo-jax model adapter",
        description="lm_eval.simple_evaluate with model neo-jax; prints (and with --output writes) the results.",
    )
    e.add_argument("--model", required=True, help="hub id, Hugging Face directory, Orbax directory or train output")
    e.add_argument("--tasks", required=True, help="comma-separated task names")
    e.add_argument("--num-fewshot", type=int, default=None)
    e.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if below 1)")
    e.add_argument("--include-path", default=None, help="directory of extra task YAML files")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--dtype", choices=DTYPES, default="float32")
    e.add_argument("--weights", choices=WEIGHTS, help=WEIGHTS_HELP)
    e.add_argument("--mesh", default=None, help="D,F,T: shard the model over a device mesh")
    e.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed (lm-eval's default)")
    e.add_argument("--adapter", help="a PEFT LoRA adapter directory to apply (unmerged)")
    e.add_argument("--output", default=None, help="also write the results JSON here")
    e.set_defaults(run=eval_harness, command="eval harness")
    return parser


INTERRUPTED = threading.Event()  # set by Ctrl-C, even where a library would swallow the KeyboardInterrupt


def _in_finalizer(frame) -> bool:
    """Whether ``frame`` runs a ``__del__`` or a garbage-collection callback (JAX has one), where Python
    prints an exception and drops it."""
    callbacks = {getattr(callback, "__code__", None) for callback in gc.callbacks}
    return frame is not None and (frame.f_code.co_name == "__del__" or frame.f_code in callbacks)


def _on_ctrl_c(signum, frame) -> None:
    """SIGINT: remember it, then raise KeyboardInterrupt as Python's own handler does, except inside a
    finalizer, where Python would print and drop it: there the signal is sent again a moment later, to land
    in ordinary code. Being a handler of our own, it also keeps asyncio.run (inside Orbax and others) from
    installing one that only cancels a task, which a library may catch and carry on."""
    INTERRUPTED.set()
    if _in_finalizer(frame):
        threading.Timer(0.01, _thread.interrupt_main, (signal.SIGINT,)).start()
        return
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_mesh_values_attached(sys.argv[1:] if argv is None else argv))
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, _on_ctrl_c)
    try:
        if os.environ.get("NEO_JAX_DISTRIBUTED") == "1":  # set by tpu_scripts/run.sh on every worker
            from neo_jax import distributed

            distributed.initialize()
            if not distributed.is_main_process():  # results are printed once, by process 0
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
        status = args.run(args) or 0
        if INTERRUPTED.is_set():  # a Ctrl-C that something swallowed still stops with 130
            raise KeyboardInterrupt
        return status
    except (ValueError, OSError, ImportError, FloatingPointError) as e:
        print(f"neo-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"neo-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)
            INTERRUPTED.clear()


def _mesh_values_attached(argv: list[str]) -> list[str]:
    """``--mesh -1,1,1`` as ``--mesh=-1,1,1``: argparse would take a value starting with '-' for an option."""
    out = []
    for arg in argv:
        if out and out[-1] == "--mesh" and arg.startswith("-"):
            out[-1] = f"--mesh={arg}"
        else:
            out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(main())
