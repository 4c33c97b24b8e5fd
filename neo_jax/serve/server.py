"""``neo-jax serve``: load the model, compile every program, then serve it with uvicorn.

The port is bound before anything loads, so a port in use is an error at once. SIGTERM drains: new
requests get 503, requests in flight finish (up to ``drain_timeout`` seconds, after which they are
cancelled), and the process exits 0. Ctrl-C (SIGINT) stops at once.

Connections are bounded in time and number: a connection that has not sent a complete request's headers
within ``header_timeout`` seconds of opening (or of starting its next request) is closed, a body that takes
longer than that again is a 408, an idle keep-alive
connection after ``KEEP_ALIVE`` seconds, and past ``max_connections`` open connections new requests get 503
(uvicorn's ``limit_concurrency``); the process's open-file limit is raised to fit them.
"""

from __future__ import annotations

import math
import resource
import signal
import socket
import sys
import threading
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from neo_jax.generation.batching import DEFAULT_PREFILL_CHUNK, check_slots, clamped_chunk
from neo_jax.serve.app import create_app
from neo_jax.serve.engine import Engine, prefix_blocks
from neo_jax.serve.metrics import Metrics

KEEP_ALIVE = 5  # seconds an idle keep-alive connection stays open (uvicorn's default)
SPARE_FILES = 64  # open files kept for the model, logs and the like beside the connections


def _with_header_deadline(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, plus a deadline for the headers of each request: a client that opens a
    connection (or starts its next request) and never finishes the headers is cut off, where uvicorn alone
    would keep it open for ever."""

    class Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            self._deadline = None
            super().connection_made(transport)
            self._watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def connection_lost(self, exc) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _watch(self) -> None:
            waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
            if waiting and self._deadline is None:
                self._deadline = self.loop.call_later(header_timeout, self._expire)
            elif not waiting and self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return Protocol


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (not yet listening), or an OSError that says what to do."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror or e}): check --host") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise OSError(
            f"cannot listen on {host}:{port} ({e.strerror or e}): stop what holds it, or pick another --port"
        ) from None
    return sock


def _allow_connections(wanted: int) -> int:
    """Raise the open-file limit to fit ``wanted`` connections if the hard limit allows; returns how many
    connections fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < need:
        soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return wanted if soft == resource.RLIM_INFINITY else max(1, min(wanted, soft - SPARE_FILES))


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app, engine: Engine, drain_timeout: float):
        super().__init__(config)
        self.app, self.engine, self.drain_timeout = app, engine, drain_timeout
        self.draining = False

    def handle_exit(self, sig, frame) -> None:
        if sig != signal.SIGTERM or self.draining:
            return super().handle_exit(sig, frame)
        self.draining = True
        self.app.state.draining = True
        self.engine.accepting = False
        threading.Thread(target=self._drain, name="neo-jax-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while not self.engine.idle() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.engine.idle():
            print(f"drain timeout ({self.drain_timeout}s): cancelling what is left", file=sys.stderr)
        self.engine.stop()
        self.should_exit = True  # uvicorn then lets open responses finish and exits


def check_adapters(source, adapters: tuple[tuple[str, str], ...], served: str) -> dict:
    """Each named adapter (``(name, directory)``) read and checked against the base's config: ``{name: (LoRAConfig,
    tensors)}``. A ValueError that names the adapter if one does not fit the base, a name is used twice or is
    the served model's, or the base is a LoRA run (which brings its own)."""
    from neo_jax.peft import check_adapter
    from neo_jax.source import local_directory

    if adapters and source.adapter is not None:
        raise ValueError(
            f"{source.name} is a LoRA run and brings its own adapters: serve its base with --adapter NAME=DIR"
        )
    named = {}
    for name, directory in adapters:
        if name in named or name == served:
            raise ValueError(
                f"--adapter {name}: the name is already taken (by another adapter or the served model); give each its own"
            )
        try:
            named[name] = check_adapter(local_directory(directory), source.config)
        except (ValueError, OSError) as e:
            raise ValueError(f"--adapter {name}={directory}: {e}") from None
    return named


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 16,
    max_len: int | None = None,
    max_queue: int = 256,
    dtype: str = "float32",
    mesh: str | None = None,
    api_key: str | None = None,
    drain_timeout: float = 30.0,
    served_model_name: str | None = None,
    adapter: str | None = None,
    adapters: tuple[tuple[str, str], ...] = (),
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    prefix_cache_mb: float = 0,
    weights: str | None = None,
    header_timeout: float = 10.0,
    max_connections: int = 2048,
    embedding_pooling: str | None = None,
    draft: str | None = None,
    num_draft_tokens: int = 4,
) -> int:
    from neo_jax import sharding
    from neo_jax.convert import from_pretrained
    from neo_jax.embed import check_pooling, recipe_of
    from neo_jax.generation.speculative import check_draft_positions, draft_source
    from neo_jax.hf import load_tokenizer
    from neo_jax.lora import add_many
    from neo_jax.peft import by_target
    from neo_jax.serve.app import check_api_key
    from neo_jax.source import resolve

    log = lambda message: print(message, file=sys.stderr, flush=True)
    start = time.perf_counter()
    check_api_key(api_key)
    sock = bind(host, port)  # before anything loads: a port in use fails at once
    port = sock.getsockname()[1]
    connections = _allow_connections(max_connections)
    if connections < max_connections:
        log(f"the open-file limit fits {connections} connections: serving at most that many, not {max_connections}")
    source = resolve(model)
    if embedding_pooling is None:  # the checkpoint's own (a sentence-transformers layout's), else mean
        embedding_pooling = recipe_of(source.directory, source.config).pooling
    check_pooling(embedding_pooling, "--embedding-pooling")
    tokenizer = load_tokenizer(source.require_directory())  # before the weights: a model without a tokenizer fails fast
    named = check_adapters(source, adapters, served_model_name or model)  # before the weights too: adapters are small
    drafting = None if draft is None else draft_source(source, draft)  # before either model loads
    try:
        max_len = check_slots(source.config, max_batch, max_len)
        prefix_blocks(prefix_cache_mb, source.config, dtype)
        if drafting is not None and not isinstance(drafting, str):
            check_draft_positions(drafting.config.max_position_embeddings, max_len, drafting.name)
    except ValueError as e:
        message = str(e)
        for name in ("prefix_cache_mb", "max_len", "max_batch"):
            message = message.replace(name, "--" + name.replace("_", "-"))
        raise ValueError(message) from None
    if clamped_chunk(prefill_chunk, max_len) != prefill_chunk:
        prefill_chunk = clamped_chunk(prefill_chunk, max_len)
        log(
            f"--prefill-chunk is longer than a slot of {max_len} positions can use: prefilling {prefill_chunk} at a time"
        )
    device_mesh = sharding.make_mesh(**sharding.parse_mesh(mesh)) if mesh else None
    # causal-lm whatever the checkpoint's class: a bare GPTNeoModel (SGPT) has no head of its own, and GPT-Neo's
    # language-model head is the token embedding, so completions work on it too
    loaded = from_pretrained(
        source, dtype=dtype, param_dtype=dtype, weights=weights, mesh=device_mesh, adapter=adapter, task="causal-lm"
    )
    if drafting is not None and not isinstance(drafting, str):  # the draft runs without the adapters
        drafting = from_pretrained(
            drafting, dtype=dtype, param_dtype=dtype, weights=weights, mesh=device_mesh, task="causal-lm"
        )
    if named:
        add_many(loaded, [(checked[0], by_target(source.config, checked)) for checked in named.values()])
    engine = Engine(
        loaded,
        max_batch=max_batch,
        max_len=max_len,
        max_queue=max_queue,
        metrics=Metrics(),
        prefill_chunk=prefill_chunk,
        prefix_cache_mb=prefix_cache_mb,
        adapters=tuple(named),
        draft=drafting,
        num_draft_tokens=num_draft_tokens,
    )
    seconds = engine.warm_up(progress=log)
    engine.start()
    log(
        f"compiled {len(engine._program_names())} programs in {seconds:.1f}s; ready in {time.perf_counter() - start:.1f}s"
    )
    app = create_app(
        engine,
        tokenizer,
        model_name=served_model_name or model,
        api_key=api_key,
        body_timeout=header_timeout,
        embedding_pooling=embedding_pooling,
    )
    config = uvicorn.Config(
        app,
        http=_with_header_deadline(header_timeout),
        log_level="warning",
        timeout_graceful_shutdown=math.ceil(drain_timeout) + 5,
        timeout_keep_alive=KEEP_ALIVE,
        limit_concurrency=connections,
    )
    server = _DrainingServer(config, app, engine, drain_timeout)
    log(f"serving {served_model_name or model} on http://{host}:{port} ({max_batch} slots of {engine.max_len} tokens)")
    server.run(sockets=[sock])
    engine.stop()
    if server.draining:
        log("drained; exiting")
    return 0
