"""``neo-jax convert``: between Hugging Face's format, neo_jax's Orbax directories and PEFT adapters."""

from __future__ import annotations

import argparse
import sys
import time

from neo_jax.config import DTYPES, WEIGHTS


def add_parser(commands) -> None:
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


def _check(args: argparse.Namespace, lora_run: bool) -> None:
    if args.merge and not (args.adapter or lora_run):
        raise ValueError("--merge folds adapters into the weights: give them with --adapter PEFT_DIR, or a LoRA run")
    if args.adapter and not args.merge and args.to != "peft":
        raise ValueError("--adapter needs --merge: the hf and orbax formats hold plain weights")
    if args.to == "peft" and not (args.adapter or lora_run):
        raise ValueError(f"{args.src} has no LoRA adapters to write: --to peft takes a `neo-jax train --lora-rank` run")
    if args.weights == "int8" and (args.to != "orbax" or args.adapter or lora_run):
        raise ValueError("--weights int8 writes --to orbax, from plain weights (merge adapters in a first convert)")


def convert(args: argparse.Namespace) -> None:
    from neo_jax import lora, peft
    from neo_jax.checkpoints import check_destination
    from neo_jax.convert import from_pretrained, save_pretrained
    from neo_jax.quantize import is_quantized
    from neo_jax.source import resolve

    start = time.perf_counter()
    source = resolve(args.src, args.revision)
    _check(args, lora_run=source.base is not None)
    check_destination(args.dst, args.overwrite, source.directory)  # before the weights are read
    model = from_pretrained(
        source, dtype=args.dtype, param_dtype=args.dtype, weights=args.weights, adapter=args.adapter
    )
    if args.to == "peft":  # the adapters alone, from a LoRA run (or --adapter)
        base = source.base.name if source.base is not None else str(args.src)
        out = peft.save(model, args.dst, base_model=base, overwrite=args.overwrite)
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
