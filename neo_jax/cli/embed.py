"""``neo-jax embed``: every document of a corpus into one float32 ``[N, H]`` ``.npy`` file (``neo_jax.embed``)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from neo_jax.cli.common import CACHE_HELP, MODEL_HELP, WEIGHTS_HELP, enable_compilation_cache
from neo_jax.config import DTYPES, WEIGHTS


def add_parser(commands) -> None:
    p = commands.add_parser(
        "embed",
        help="sentence embeddings of a corpus into a .npy file",
        description="Row i of OUT is document i's vector, pooled from the model's hidden states as "
        "sentence-transformers pools them. Documents are sorted by length within windows of 4096, so that few "
        "shapes compile; OUT is written as it goes and renamed into place when complete. Running the same "
        "command again after an interruption continues. Prints a JSON summary.",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP + "; a sentence-transformers layout brings its pooling")
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="what `neo-jax data prepare` reads: text files, globs, .jsonl, datasets",
    )
    p.add_argument("--output", required=True, help="the .npy file to write")
    p.add_argument(
        "--pooling",
        choices=("mean", "weightedmean", "last"),
        help="mean, weightedmean (SGPT's) or last (the last token); default: the checkpoint's, else mean",
    )
    p.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="L2-normalise each row (default: if the checkpoint has a Normalize module)",
    )
    p.add_argument(
        "--layer", type=int, help="pool this hidden state (0: embeddings, L: the last; negative from the end)"
    )
    p.add_argument(
        "--max-length",
        type=int,
        help="tokens kept of a document (default: the checkpoint's max_seq_length, or its positions)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--weights", choices=WEIGHTS, help=WEIGHTS_HELP)
    p.add_argument("--mesh", default=None, help="D,F,T: split each batch over a device mesh")
    p.add_argument("--text-field", default="text", help="the field of .jsonl lines and dataset rows to embed")
    p.add_argument("--split", default="train", help="the split of a dataset source")
    p.add_argument("--revision", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--compilation-cache", help=CACHE_HELP)
    p.set_defaults(run=run, command="embed")


def run(args: argparse.Namespace) -> None:
    from neo_jax import distributed, embed
    from neo_jax.convert import from_pretrained
    from neo_jax.data import read_documents

    start = time.perf_counter()
    source, out, mesh, tokenizer, settings = _checked(args)  # before the model loads
    enable_compilation_cache(args.compilation_cache)
    model = from_pretrained(
        source, task="feature-extraction", dtype=args.dtype, param_dtype=args.dtype, weights=args.weights, mesh=mesh
    )
    embedder = embed.Embedder(
        model,
        pooling=settings["pooling"],
        normalize=settings["normalize"],
        layer=settings["layer"],
        max_length=settings["max_length"],
        batch_size=args.batch_size,
    )
    documents = lambda: read_documents(args.data, args.text_field, args.split)
    summary = embed.embed_corpus(embedder, tokenizer, documents, out, settings, log=distributed.log)
    print(
        json.dumps(
            {"output": str(out), "documents": summary["count"], "dimensions": embedder.width}
            | {key: settings[key] for key in ("pooling", "normalize", "layer", "max_length")}
            | {"truncated": summary["cut"], "empty": summary["empty"], "tokens": summary["tokens"]}
            | {"seconds": round(time.perf_counter() - start, 2)}
        )
    )
    if summary["cut"]:
        distributed.log(
            f"{summary['cut']} of {summary['count']} documents were longer than {settings['max_length']} tokens and "
            "were cut"
        )
    sys.stdout.flush()


def _checked(args: argparse.Namespace):
    """Everything a user can get wrong, checked: (source, output path, mesh, tokenizer, settings)."""
    from neo_jax import embed, sharding, validate
    from neo_jax.data import expand_paths
    from neo_jax.hf import load_tokenizer
    from neo_jax.prepare import describe_sources
    from neo_jax.source import resolve

    sources = expand_paths(args.data)
    out = embed.output_path(args.output, sources, args.overwrite)
    validate.integer("--batch-size", args.batch_size, least=1)
    source = resolve(args.model, args.revision)
    recipe = embed.recipe_of(source.directory, source.config)
    max_length = recipe.max_length if args.max_length is None else args.max_length
    try:
        layer = embed.check_layer(args.layer, source.config)
    except ValueError as e:
        raise ValueError(f"--{e}") from None
    embed.check_max_length(max_length, source.config, "--max-length")
    mesh = sharding.make_mesh(**sharding.parse_mesh(args.mesh)) if args.mesh else None
    if mesh is not None and args.batch_size % (rows := mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the mesh's data x fsdp ({rows})")
    settings = {
        "model": str(source.name),
        "pooling": args.pooling or recipe.pooling,
        "normalize": recipe.normalize if args.normalize is None else args.normalize,
        "layer": layer,
        "max_length": max_length,
        "dtype": args.dtype,
        "weights": args.weights,
        "text_field": args.text_field,
        "split": args.split,
        "sources": describe_sources(args.data),
    }
    return source, out, mesh, load_tokenizer(source.require_directory()), settings
