"""``neo-jax serve``: an OpenAI-compatible completions server."""

from __future__ import annotations

import argparse
import os

from neo_jax.cli.common import ADAPTER_HELP, CACHE_HELP, MODEL_HELP, WEIGHTS_HELP, enable_compilation_cache
from neo_jax.config import DTYPES, WEIGHTS


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
    p.add_argument("--adapter", help=ADAPTER_HELP)
    p.add_argument("--compilation-cache", help=CACHE_HELP)
    p.set_defaults(run=serve)


def _check(args: argparse.Namespace) -> str | None:
    """Every flag, before anything loads; returns the API key (from --api-key or NEO_JAX_API_KEY), checked."""
    from neo_jax import sharding, validate
    from neo_jax.serve.app import check_api_key

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
    if args.api_key is not None:
        api_key = check_api_key(args.api_key, "--api-key")
    else:
        api_key = check_api_key(os.environ.get("NEO_JAX_API_KEY"), "NEO_JAX_API_KEY")
    if args.mesh:
        sharding.parse_mesh(args.mesh)
    return api_key


def serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ImportError("neo-jax serve needs FastAPI and uvicorn: pip install 'neo_jax[serve]'") from None
    api_key = _check(args)
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
