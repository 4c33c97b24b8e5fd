"""``neo-jax train`` and ``neo-jax data prepare``: training, and the token shards it reads."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time


def add_parser(commands) -> None:
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
    _add_data_parser(commands)


def add_settings(parser: argparse.ArgumentParser) -> None:
    """One flag per ``FinetuneConfig`` setting, with its type, choices and help (the default shown is the
    setting's; the flag's own default is None, so a YAML file's value is kept unless the flag is given)."""
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
    from neo_jax.finetune import finetune
    from neo_jax.settings import FinetuneConfig

    settings = {name: getattr(args, name, None) for name in FinetuneConfig.fields()}
    config = FinetuneConfig.load(args.config, **settings)
    result = finetune(config)
    print(json.dumps(result))
    return 130 if result["stopped"] == "sigint" else 0  # a Ctrl-C ends with the shell's status for SIGINT


def _add_data_parser(commands) -> None:
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
