"""``neo-jax serve``: an OpenAI-compatible completions server."""

from __future__ import annotations

import argparse
import os

from neo_jax.cli.common import CACHE_HELP, MODEL_HELP, WEIGHTS_HELP, enable_compilation_cache
from neo_jax.config import DTYPES, WEIGHTS

BLOCK = 16  # neo_jax.generation.batching.BLOCK: prefix-cache blocks and prefill chunks (a test keeps them equal)
DEFAULT_PREFILL_CHUNK = 64  # neo_jax.generation.batching's (the CLI loads no JAX before checking flags)


def add_parser(commands) -> None:
    p = commands.add_parser(
        "serve",
        help="an OpenAI-compatible completions server with continuous batching",
        description="Serve /v1/completions (OpenAI's API), /v1/models, /health, /metrics and a playground at /.",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
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
    p.add_argument(
        "--adapter",
        action="append",
        metavar="[NAME=]DIR",
        help="a PEFT LoRA adapter: NAME=DIR (repeatable) serves it as model NAME beside the base, every adapter "
        "and the base sharing each batch; a bare DIR applies one adapter (unmerged) to every request",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=DEFAULT_PREFILL_CHUNK,
        help=f"prompt tokens prefilled per step, inside the decode step (a multiple of {BLOCK}; default "
        f"{DEFAULT_PREFILL_CHUNK}); 0 prefills each prompt whole, alone, between steps",
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=0,
        help="MiB of device memory that keep the keys and values of prompt blocks for later requests that start "
        "the same way (least recently used out first; default 0: no prefix cache)",
    )
    p.add_argument(
        "--embedding-pooling",
        choices=("mean", "weightedmean", "last"),
        help="how /v1/embeddings pools the final hidden states (default: the checkpoint's own, as neo-jax embed)",
    )
    add_draft_flags(p)
    p.add_argument("--compilation-cache", help=CACHE_HELP)
    p.set_defaults(run=serve)


def add_draft_flags(p) -> None:
    """``--draft`` and ``--draft-tokens``, as ``serve`` and ``plan --task serve`` take them."""
    p.add_argument(
        "--draft",
        help="speculative decoding: a smaller GPT-Neo with the model's tokenizer (a source, as --model), or "
        "'ngram' (prompt lookup); completions follow the same law (greedy: the same text), and steps stop "
        "speculating while it does not pay",
    )
    p.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes a round (default 4)")


def check_draft_flags(args: argparse.Namespace) -> None:
    from neo_jax import validate

    validate.integer("--draft-tokens", args.draft_tokens, least=1)
    if args.draft is not None and not args.prefill_chunk:
        raise ValueError("--draft needs chunked prefill: give --prefill-chunk > 0 (or drop --draft)")


def _adapters(values: list[str] | None) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """``--adapter`` values: one bare DIR (applied to every request), or any number of NAME=DIR."""
    values = values or []
    named = tuple((v.split("=", 1)[0], v.split("=", 1)[1]) for v in values if "=" in v)
    bare = [v for v in values if "=" not in v]
    if bare and (named or len(bare) > 1):
        raise ValueError("--adapter: give one bare DIR (applied to every request) or any number of NAME=DIR, not both")
    for name, directory in named:
        if not name or not directory or any(c.isspace() for c in name):
            raise ValueError(f"--adapter {name}={directory}: give NAME=DIR with a name without spaces and a directory")
    return (bare[0] if bare else None), named


def _check(args: argparse.Namespace) -> str | None:
    """Every flag, before anything loads; returns the API key (from --api-key or NEO_JAX_API_KEY), checked."""
    from neo_jax import sharding, validate
    from neo_jax.serve.app import check_api_key

    validate.integer("--port", args.port, least=0, most=65535)
    check_slot_flags("--max-batch", args.max_batch, args.max_len, args.prefill_chunk, args.prefix_cache_mb)
    validate.integer("--max-queue", args.max_queue, least=1)
    name = args.served_model_name
    if name is not None and (not name or any(c.isspace() for c in name)):
        raise ValueError(
            f"--served-model-name {name!r}: give a name without spaces, or leave it out (default: --model)"
        )
    validate.real("--drain-timeout", args.drain_timeout)
    if args.drain_timeout < 0:
        raise ValueError(f"--drain-timeout must be >= 0 seconds, got {args.drain_timeout}")
    validate.real("--header-timeout", args.header_timeout)
    if args.header_timeout <= 0:
        raise ValueError(f"--header-timeout must be > 0 seconds, got {args.header_timeout}")
    validate.integer("--max-connections", args.max_connections, least=1)
    if args.api_key is not None:
        api_key = check_api_key(args.api_key, "--api-key")
    else:
        api_key = check_api_key(os.environ.get("NEO_JAX_API_KEY"), "NEO_JAX_API_KEY")
    if args.mesh:
        sharding.parse_mesh(args.mesh)
    _adapters(args.adapter)
    check_draft_flags(args)
    return api_key


def check_slot_flags(batch_flag: str, batch, max_len, prefill_chunk, prefix_cache_mb=0.0) -> None:
    """The slots' flags, as ``serve`` and ``plan --task serve`` both check them (``batch_flag``: the name of the
    slot count's flag), before anything loads; the model's own limits come after (``batching.check_slots``)."""
    from neo_jax import validate
    from neo_jax.serve.engine import check_prefill

    validate.integer(batch_flag, batch, least=1)
    if max_len is not None:
        validate.integer("--max-len", max_len, least=2)
    try:
        check_prefill(prefill_chunk, prefix_cache_mb, batch)
    except ValueError as e:  # in the flags' names
        raise ValueError(
            str(e).replace("prefill_chunk", "--prefill-chunk").replace("prefix_cache_mb", "--prefix-cache-mb")
        ) from None


def serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ImportError("neo-jax serve needs FastAPI and uvicorn: pip install 'neo_jax[serve]'") from None
    api_key = _check(args)
    enable_compilation_cache(args.compilation_cache)
    from neo_jax.serve.server import serve as run

    adapter, adapters = _adapters(args.adapter)
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
        adapter=adapter,
        adapters=adapters,
        prefill_chunk=args.prefill_chunk,
        prefix_cache_mb=args.prefix_cache_mb,
        weights=args.weights,
        header_timeout=args.header_timeout,
        max_connections=args.max_connections,
        embedding_pooling=args.embedding_pooling,
        draft=args.draft,
        num_draft_tokens=args.draft_tokens,
    )
