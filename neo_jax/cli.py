"""``neo-jax`` command line: thin wrappers over the library functions."""

from __future__ import annotations

import argparse
import sys
import time

DTYPES = ("float32", "bfloat16")


def convert(args: argparse.Namespace) -> None:
    from neo_jax.convert import from_pretrained, save_pretrained

    start = time.perf_counter()
    model = from_pretrained(args.src, dtype=args.dtype, param_dtype=args.dtype, revision=args.revision)
    out = save_pretrained(model, args.dst, format=args.to, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    print(
        f"wrote {out} ({args.to}, {args.dtype}, {model.config.num_params() / 1e6:.1f}M parameters) "
        f"in {time.perf_counter() - start:.1f}s",
        file=sys.stderr,
    )


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
    p.add_argument("--to", choices=("orbax", "hf"), default="orbax", help="output format (default: orbax)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written weights")
    p.add_argument("--max-shard-size", default="2GB", help="hf format: split safetensors above this size")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(run=convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError, ImportError) as e:
        print(f"neo-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
