"""``neo-jax serve``: load the model, compile every program, then serve it with uvicorn.

SIGTERM drains: new requests get 503, requests in flight finish (up to ``drain_timeout`` seconds, after
which they are cancelled), and the process exits 0. Ctrl-C (SIGINT) stops at once.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

import uvicorn

from neo_jax.serve.app import create_app
from neo_jax.serve.engine import Engine
from neo_jax.serve.metrics import Metrics


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
    weights: str | None = None,
) -> int:
    from neo_jax import sharding
    from neo_jax.convert import from_pretrained
    from neo_jax.hf import load_tokenizer, resolve

    log = lambda message: print(message, file=sys.stderr, flush=True)
    start = time.perf_counter()
    source = resolve(model)
    tokenizer = load_tokenizer(source)  # before the weights: a model without a tokenizer fails fast
    device_mesh = sharding.make_mesh(**sharding.parse_mesh(mesh)) if mesh else None
    loaded = from_pretrained(source, dtype=dtype, param_dtype=dtype, weights=weights, mesh=device_mesh, adapter=adapter)
    engine = Engine(loaded, max_batch=max_batch, max_len=max_len, max_queue=max_queue, metrics=Metrics())
    seconds = engine.warm_up(progress=log)
    engine.start()
    log(f"compiled {len(engine.buckets) + 2} programs in {seconds:.1f}s; ready in {time.perf_counter() - start:.1f}s")
    app = create_app(engine, tokenizer, model_name=served_model_name or model, api_key=api_key)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=drain_timeout + 5)
    server = _DrainingServer(config, app, engine, drain_timeout)
    log(f"serving {served_model_name or model} on http://{host}:{port} ({max_batch} slots of {engine.max_len} tokens)")
    server.run()
    engine.stop()
    if server.draining:
        log("drained; exiting")
    return 0
