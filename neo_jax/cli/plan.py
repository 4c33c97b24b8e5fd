"""``neo-jax plan``: per-chip memory, FLOPs and a roofline of fine-tuning or generation, before launching."""

from __future__ import annotations

import argparse
import json

from neo_jax.cli.common import ATTENTION_HELP
from neo_jax.cli.serve import DEFAULT_PREFILL_CHUNK, add_draft_flags
from neo_jax.config import DTYPES, REMAT, WEIGHTS


def add_parser(commands) -> None:
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
    p.add_argument("--task", choices=("train", "generate", "serve", "embed"), default="train")
    p.add_argument("--batch", type=int, help="global batch size (sequences; serve: slots)")
    p.add_argument("--seq", type=int, help="train: sequence length; embed: tokens per document (padded)")
    p.add_argument("--grad-accum", type=int, help="train: micro-batches per step (default 1)")
    p.add_argument("--remat", choices=REMAT, help="train: recompute activations (default none)")
    p.add_argument("--max-len", type=int, help="generate, serve: positions in all (default: the model's maximum)")
    p.add_argument("--prefill-chunk", type=int, help=f"serve: prompt tokens per step (default {DEFAULT_PREFILL_CHUNK})")
    p.add_argument("--adapters", type=int, help="serve: LoRA adapters served at once (--lora-rank, --lora-targets)")
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
    add_draft_flags(p)  # serve
    p.add_argument("--no-compile", action="store_true", help="the estimate, without compiling")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=plan)


def _from_run_config(args: argparse.Namespace) -> None:
    """A fine-tuning YAML's model, batch, seq, accumulation, remat, dtype, mesh and slice, where no flag is
    given (flags on the command line win)."""
    from neo_jax.settings import FinetuneConfig

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
    for key, value in settings.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def _weights_and_dtype(args: argparse.Namespace) -> None:
    if args.weights is not None:
        if args.task == "train" and not (args.weights == "int8" and args.lora_rank):
            raise ValueError(
                "training keeps float32 weights (a LoRA base: --dtype): --weights is for --task generate, or int8 "
                "with --lora-rank for a QLoRA-style frozen base"
            )
        if args.weights != "int8" and args.dtype not in (None, args.weights):
            raise ValueError(f"--weights {args.weights} and --dtype {args.dtype} disagree: give one of them")
    args.dtype = args.dtype or (args.weights if args.weights in DTYPES else "bfloat16")


def _where(args: argparse.Namespace) -> dict:
    """Checks what the plan is for (model, shapes, slice or mesh); returns where it runs."""
    from neo_jax.attention import check_implementation, compiling_for
    from neo_jax.sharding import parse_mesh

    with compiling_for("tpu"):  # a plan is for a TPU slice, whatever this host is
        check_implementation(args.attention)
    if args.model is None:
        raise ValueError("--model (or --config) is required")
    if args.task in ("train", "embed") and (args.batch is None or args.seq is None):
        raise ValueError(
            f"--batch and --seq are required for --task {args.task}" + " (or give --config)" * (args.task == "train")
        )
    if args.task in ("generate", "serve") and args.batch is None:
        raise ValueError(f"--batch is required for --task {args.task}")
    _check_sizes(args)
    for flag, example in (("topology", "a TPU slice such as v5e-8"), ("mesh", "D,F,T")):
        if getattr(args, flag) is not None and not getattr(args, flag).strip():
            raise ValueError(f"--{flag} is empty: give {example}, or leave it out")
    if args.topology is None and args.mesh is None:
        raise ValueError("give --topology (a TPU slice such as v5e-8) or --mesh D,F,T")
    mesh = parse_mesh(args.mesh) if args.mesh else None
    if mesh is not None and args.topology is None and min(mesh["data"], mesh["fsdp"], mesh["tensor"]) < 1:
        raise ValueError(f"--mesh needs the three sizes themselves (no -1) to plan for, got {args.mesh!r}")
    if args.topology is not None and not args.no_compile:
        from neo_jax import aot

        aot.require_libtpu()
    return {"topology": args.topology, "mesh": mesh, "dtype": args.dtype, "compile": not args.no_compile}


def _check_sizes(args: argparse.Namespace) -> None:
    """The shapes' flags, checked as the command the plan is for checks them (``serve``: the same function)."""
    from neo_jax.cli.serve import check_draft_flags, check_slot_flags
    from neo_jax.validate import integer

    if args.task == "serve":
        check_slot_flags("--batch", args.batch, args.max_len, args.prefill_chunk)
        if args.prefill_chunk == 0:
            raise ValueError("--prefill-chunk 0 (whole prompts) is not planned: plan the chunked server (>= 16)")
        integer("--adapters", args.adapters, least=0)
        if args.adapters and args.lora_rank is not None:
            integer("--lora-rank", args.lora_rank, least=1)
        check_draft_flags(args)
        return
    if args.draft is not None:
        raise ValueError("--draft is planned with --task serve (neo-jax generate's draft runs beside the model alone)")
    integer("--batch", args.batch, least=1)
    if args.task == "generate":
        if args.max_len is not None:
            integer("--max-len", args.max_len, least=2)
        if args.prompt_len is not None:
            integer("--prompt-len", args.prompt_len, least=1)
        return
    if args.task == "embed":
        integer("--seq", args.seq, least=1)
        return
    integer("--seq", args.seq, least=2)  # as neo-jax train checks them
    integer("--grad-accum", args.grad_accum, least=1)
    if args.lora_rank is not None:
        integer("--lora-rank", args.lora_rank, least=0)  # 0: full fine-tuning, as in train


def plan(args: argparse.Namespace) -> None:
    from neo_jax import plan as planning

    if args.config:
        _from_run_config(args)
    args.grad_accum = 1 if args.grad_accum is None else args.grad_accum
    args.remat = args.remat or "none"
    args.adapters = args.adapters or 0
    args.prefill_chunk = DEFAULT_PREFILL_CHUNK if args.prefill_chunk is None else args.prefill_chunk
    _weights_and_dtype(args)
    args.attention = args.attention or "auto"
    lora = _lora(args)
    where = _where(args)
    config = _config(args.model)
    int8 = args.weights == "int8"
    if args.task == "train":
        result = planning.train_report(
            config, batch=args.batch, seq=args.seq, remat=args.remat, grad_accum=args.grad_accum,
            attention=args.attention, lora=lora, int8=int8, **where,
        )  # fmt: skip
    elif args.task == "embed":
        result = planning.embed_report(config, batch=args.batch, seq=args.seq, **where)
    elif args.task == "serve":
        result = planning.serve_report(
            config, slots=args.batch, max_len=args.max_len, prefill_chunk=args.prefill_chunk,
            adapters=args.adapters, lora=_lora(args, serving=True), **where,
            draft=_draft(args), num_draft_tokens=args.draft_tokens,
        )  # fmt: skip
    else:
        result = planning.generate_report(
            config, batch=args.batch, max_len=args.max_len, prompt_len=args.prompt_len, int8=int8, **where
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


def _lora(args: argparse.Namespace, serving: bool = False):
    if not args.lora_rank and not (serving and args.adapters):
        return None
    from neo_jax.lora import LoRAConfig

    targets = tuple(t.strip() for t in (args.lora_targets or "q_proj,v_proj").split(",") if t.strip())
    return LoRAConfig(r=args.lora_rank or 16, targets=targets, dropout=args.lora_dropout or 0.0)


def _draft(args: argparse.Namespace):
    """``--draft``: ``"ngram"``, or the draft's config, checked against the model's as ``serve`` checks it."""
    if args.draft is None or args.draft == "ngram":
        return args.draft
    from neo_jax.generation.speculative import check_draft_config

    draft = _config(args.draft)
    check_draft_config(args.draft, draft, args.model, _config(args.model))
    return draft


def _config(model: str):
    """A preset by size (125M) or by the released model's hub id, without the network; else the model's own."""
    from neo_jax.config import PRESETS, GPTNeoConfig
    from neo_jax.source import config_of

    size = model.removeprefix("EleutherAI/gpt-neo-")
    return GPTNeoConfig.preset(size) if size in PRESETS else config_of(model)


def _describe(args, result) -> str:
    if args.task == "serve":
        adapters = f", {args.adapters} LoRA adapters of rank {args.lora_rank or 16}" if args.adapters else ""
        chunk = result["prefill_chunk"]
        clamped = f" (--prefill-chunk {args.prefill_chunk} clamped to the slots)" if chunk != args.prefill_chunk else ""
        draft = f", drafting {args.draft_tokens} tokens a round with {args.draft}" if args.draft else ""
        return (
            f"{args.batch} slots of {result['max_len']} positions, prefill chunks of {chunk}{clamped}, "
            f"{args.dtype} weights{adapters}{draft}"
        )
    if args.task == "embed":
        return f"batches of {args.batch} documents x {args.seq} tokens, {args.dtype} weights"
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
