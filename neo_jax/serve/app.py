"""The OpenAI-compatible HTTP layer over ``Engine``: ``/v1/completions`` (streamed as server-sent events or
not), ``/v1/embeddings``, ``/v1/models``, ``/health``, ``/metrics`` (Prometheus) and the playground page at ``/``.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request
(naming the field), 401 for a missing or wrong API key, 404 for an unknown model or path, 408 for a body
that does not arrive in time, 413 for an oversized body, 429 when the queue is full, 503 while draining,
and 500 (logged, with no traceback in the body) for anything unexpected.

Prompts are tokenized in a worker thread, never on the event loop, after their length in characters is
checked against the most any prompt that fits the context could have.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from neo_jax.embed import check_pooling, from_sums
from neo_jax.generation.batching import TOP_LOGPROBS
from neo_jax.serve.engine import Embedded, Engine, EngineStopped, Finished, QueueFull, sampling_settings
from neo_jax.serve.engine import Request as EngineRequest

PLAYGROUND = Path(__file__).with_name("playground.html")
MAX_STOP = 4
log = logging.getLogger(__name__)


def check_api_key(key: str | None, name: str = "--api-key") -> str | None:
    """``key`` if it can be matched: not empty, and visible ASCII without spaces. HTTP header values are
    ASCII and lose surrounding spaces in transit, so any other key could never be sent back exactly (and an
    empty one would let ``Authorization: Bearer`` with nothing after it in)."""
    if key is None:
        return None
    if not key or not all("!" <= c <= "~" for c in key):
        raise ValueError(
            f"{name} must be a non-empty key of visible ASCII characters, without spaces; "
            "leave it unset to serve without a key"
        )
    return key


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_body(message: str, type: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error_response(error: APIError) -> JSONResponse:
    # a message may quote the request, and a lone surrogate there could not be encoded as UTF-8
    message = error.message.encode("utf-8", "backslashreplace").decode()
    return JSONResponse(error_body(message, error.type, error.param, error.code), status_code=error.status)


class CompletionRequest(BaseModel):
    """The fields of OpenAI's ``/v1/completions``, plus ``top_k``, ``min_p``, ``repetition_penalty``,
    ``min_tokens`` (vLLM's) and ``bad_words_ids`` (transformers')."""

    model_config = ConfigDict(extra="ignore", strict=True)  # "4" or true is not an integer
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = 0
    min_p: float | None = 0.0
    repetition_penalty: float | None = 1.0
    min_tokens: int = Field(0, ge=0)
    logit_bias: dict[str, float] | None = None
    bad_words_ids: list[list[int]] | None = None
    n: int = Field(1, ge=1, le=16)
    best_of: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    user: str | None = None
    # OpenAI fields this server does not implement: refused unless left at their neutral value.
    suffix: str | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0

    def unsupported(self) -> str | None:
        if self.best_of is not None and self.best_of != self.n:
            return "best_of"
        if self.suffix:
            return "suffix"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name
        return None


class _Choice:
    """One choice's text as its tokens arrive: incremental decoding, ``stop`` cuts (the stop string is not
    returned), the text that is safe to send while streaming, and OpenAI's legacy ``logprobs`` object."""

    request: EngineRequest  # its engine request, made once the choice exists (the request reports to it)

    def __init__(self, index: int, tokenizer, stop: list[str], logprobs: int | None, prefix: str = ""):
        self.index, self.tokenizer, self.stop, self.logprobs = index, tokenizer, stop, logprobs
        self.prefix = prefix  # the echoed prompt
        self.ids: list[int] = []
        self.text = prefix
        self.sent = 0
        self.finish_reason: str | None = None
        self.generated = 0
        self.entries: list[dict] = []  # per token: text, logprob, top, offset
        self.sent_entries = 0

    def piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def entry(self, token_id: int, logprob, top, offset: int) -> dict:
        top_dict = None
        if top is not None and self.logprobs:
            top_dict = {}
            for tid, lp in top[: self.logprobs]:
                top_dict.setdefault(self.piece(tid), lp)
        return {"token": self.piece(token_id), "logprob": logprob, "top": top_dict, "offset": offset}

    def echo_prompt(self, prompt: list[int], prompt_logprobs) -> None:
        """Log-probability entries for the echoed prompt's tokens (the first has none)."""
        offset = 0
        for i, token_id in enumerate(prompt):
            logprob, top = (None, None) if i == 0 else (prompt_logprobs[i - 1][0], prompt_logprobs[i - 1][1:])
            pairs = None if top is None else list(zip(top[0], top[1], strict=True))
            self.entries.append(self.entry(token_id, logprob, pairs, offset))
            offset = len(self.tokenizer.decode(prompt[: i + 1]))

    def add(self, token) -> bool:
        """Take one generated token; True if a stop string has now appeared (the text is cut before it)."""
        offset = len(self.text)
        self.ids.append(token.id)
        self.text = self.prefix + self.tokenizer.decode(self.ids)
        if self.logprobs is not None:
            self.entries.append(self.entry(token.id, token.logprob, token.top, offset))
        completion = self.text[len(self.prefix) :]
        cuts = [completion.find(s) for s in self.stop if s in completion]
        if cuts:
            self.text = self.prefix + completion[: min(cuts)]
            self.entries = [e for e in self.entries if e["offset"] < len(self.text)]
            return True
        return False

    def ready(self) -> str:
        """Text not yet sent that can be sent now: all of it once finished; while running, not a trailing
        unfinished character, nor a tail that could still grow into a stop string."""
        end = len(self.text)
        if self.finish_reason is None:
            if self.text.endswith("\ufffd"):
                return ""
            completion = self.text[len(self.prefix) :]
            for s in self.stop:
                for k in range(min(len(s) - 1, len(completion)), 0, -1):
                    if completion.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        piece = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

    def logprobs_object(self, entries: list[dict]) -> dict | None:
        if self.logprobs is None:
            return None
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [e["top"] for e in entries],
            "text_offset": [e["offset"] for e in entries],
        }

    def new_logprobs(self) -> dict | None:
        entries = self.entries[self.sent_entries :]
        self.sent_entries = len(self.entries)
        return self.logprobs_object(entries)


def _prompts(prompt, tokenizer, max_chars: int, param: str = "prompt") -> list[list]:
    """Token ids of every prompt in a request; text is checked (valid Unicode, at most ``max_chars``
    characters) before it is tokenized. Runs in a worker thread."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, f"{param} is empty: give a string, a list of strings, or token ids", param=param)
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt):
        for text in prompt:
            if len(text) > max_chars:
                raise APIError(
                    400,
                    f"{param} has {len(text)} characters, more than any prompt that fits this server's context "
                    f"could have ({max_chars}); shorten it",
                    param=param,
                    code="context_length_exceeded",
                )
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                message = f"{param} holds an unpaired surrogate ({text[e.start]!r} at character {e.start}): send valid Unicode"
                raise APIError(400, message, param=param) from None
        return [tokenizer(p)["input_ids"] for p in prompt]
    if all(isinstance(p, list) for p in prompt):
        return [list(p) for p in prompt]
    raise APIError(
        400, f"{param} must be a string, a list of strings, a list of token ids, or a list of those", param=param
    )


def _prompt_count(prompt) -> int:
    """How many prompts a request's ``prompt`` holds (each gets ``n`` choices)."""
    if isinstance(prompt, str) or (prompt and all(isinstance(p, int) for p in prompt)):
        return 1
    return len(prompt)


def _longest_token(tokenizer) -> int:
    """The most characters one token can stand for, from the vocabulary's strings (a byte-level BPE string has
    one character per byte, so at least as many as its text)."""
    return max((len(piece) for piece in tokenizer.get_vocab()), default=1)


def _param_of(message: str) -> str | None:
    first = message.split(" ", 1)[0]
    return first if first.isidentifier() else None


@dataclasses.dataclass
class Served:
    """What every route reads: the engine, the tokenizer and the names served (``app.state.served``)."""

    engine: Engine
    tokenizer: Any
    model_name: str
    created: int
    max_chars: int  # the most characters any prompt that fits the context could have
    tokenizing: ThreadPoolExecutor  # one tokenizer, used in turn, off the event loop
    names: dict[str, int]  # served name -> adapter index (-1: the base model)
    embedding_pooling: str  # neo_jax.embed.POOLINGS

    def adapter_of(self, model: str) -> int:
        """The adapter index of a request's ``model``, or a 404 naming what is served."""
        if model not in self.names:
            adapters = self.engine.adapters
            served = f"'{self.model_name}'" + (
                f" and its adapters {', '.join(map(repr, adapters))}" if adapters else ""
            )
            raise APIError(
                404,
                f"the model '{model}' does not exist; this server serves {served}",
                param="model",
                code="model_not_found",
            )
        return self.names[model]

    async def tokenized(self, prompt, param: str = "prompt") -> list[list]:
        return await asyncio.get_running_loop().run_in_executor(
            self.tokenizing, _prompts, prompt, self.tokenizer, self.max_chars, param
        )


def create_app(
    engine: Engine,
    tokenizer,
    *,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = 4 << 20,
    body_timeout: float = 30.0,
    embedding_pooling: str = "mean",
) -> FastAPI:
    """The FastAPI application serving ``engine`` (which the caller starts and stops); a request's body must
    arrive within ``body_timeout`` seconds of its headers. ``/v1/embeddings`` pools by ``embedding_pooling``."""
    app = FastAPI(title="neo_jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.draining = False
    app.state.served = Served(
        engine,
        tokenizer,
        model_name,
        int(time.time()),
        engine.max_len * _longest_token(tokenizer),
        ThreadPoolExecutor(1, thread_name_prefix="neo-jax-tokenize"),
        {model_name: -1, **{name: i for i, name in enumerate(engine.adapters)}},
        check_pooling(embedding_pooling, "embedding_pooling"),
    )
    _handle_errors(app)
    app.add_middleware(
        _Guard,
        state=app.state,
        api_key=check_api_key(api_key, "api_key"),
        max_body_bytes=max_body_bytes,
        body_timeout=body_timeout,
    )
    app.include_router(router)
    return app


def _handle_errors(app: FastAPI) -> None:
    """Every error as OpenAI shapes it (see the module)."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            return _error_response(APIError(400, f"the body is not valid JSON: {first.get('msg')}"))
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        return _error_response(APIError(400, f"{where}: {first.get('msg')}", param=param))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return _error_response(APIError(500, "the server failed to handle this request", type="server_error"))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return _error_response(
            APIError(error.status_code, f"{error.detail}: {request.method} {request.url.path}", type=kind)
        )


router = APIRouter()


def served_by(http: Request) -> Served:
    return http.app.state.served


@router.get("/health")
async def health(http: Request):
    engine = served_by(http).engine
    if http.app.state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if engine.error is not None:
        return JSONResponse({"status": "error", "error": str(engine.error)}, status_code=503)
    return {"status": "ok", "active_slots": engine.active, "queue_length": engine.waiting}


@router.get("/metrics")
async def prometheus(http: Request):
    metrics = served_by(http).engine.metrics
    if metrics is None:
        raise APIError(404, "this server keeps no metrics")
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/", response_class=HTMLResponse)
async def playground():
    return HTMLResponse(PLAYGROUND.read_text())


@router.get("/v1/models")
async def models(http: Request):
    served = served_by(http)
    entry = lambda name, parent: {
        "id": name,
        "object": "model",
        "created": served.created,
        "owned_by": "neo_jax",
        "root": name,
        "parent": parent,
        "max_model_len": served.engine.max_len,
    }
    adapters = [entry(a, served.model_name) for a in served.engine.adapters]
    return {"object": "list", "data": [entry(served.model_name, None), *adapters]}


@router.post("/v1/chat/completions")
async def chat():
    raise APIError(
        400,
        "GPT-Neo is a base language model with no chat template, so /v1/chat/completions is not served; "
        "send the text to continue to /v1/completions instead",
        param="messages",
        code="chat_not_supported",
    )


@router.post("/v1/completions")
async def completions(body: CompletionRequest, http: Request):
    served = served_by(http)
    adapter = served.adapter_of(body.model)
    prompts, max_tokens, stop, base = await _checked_completion(served, body)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    echo_logprobs = body.echo and body.logprobs is not None
    choices: list[_Choice] = []
    for p, prompt in enumerate(prompts):
        prefix = served.tokenizer.decode(prompt) if body.echo else ""
        for j in range(body.n):
            index = p * body.n + j
            choice = _Choice(index, served.tokenizer, stop, body.logprobs, prefix)
            settings = dict(base, seed=(base["seed"] + index) % 2**63)
            choice.request = EngineRequest(
                prompt,
                max_tokens,
                settings,
                _emitter(loop, events, index),
                echo_logprobs=echo_logprobs,
                adapter=adapter,
            )
            choices.append(choice)
    submit_all(served.engine, [c.request for c in choices])

    request_id = f"cmpl-{uuid.uuid4().hex}"
    usage = lambda: {
        "prompt_tokens": sum(len(p) for p in prompts),
        "completion_tokens": sum(c.generated for c in choices),
        "total_tokens": sum(len(p) for p in prompts) + sum(c.generated for c in choices),
    }
    take = partial(_take, choices, echo_logprobs)
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            _stream(choices, events, take, request_id, body.model, usage, include_usage, http),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    if not await _collect([c.request for c in choices], events, take, http):
        return Response(status_code=499)
    if any(c.finish_reason == "error" for c in choices):
        raise APIError(500, "generation failed on the server", type="server_error")
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": c.logprobs_object(c.entries),
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": usage(),
    }


async def _checked_completion(served: Served, body: CompletionRequest) -> tuple[list[list], int, list[str], dict]:
    """A completion request's prompts (tokenized), ``max_tokens``, stop strings and sampling settings, or a 400."""
    unsupported = body.unsupported()
    if unsupported:
        message = f"{unsupported} is not supported by this server; leave it out (repetition_penalty is available)"
        raise APIError(400, message, param=unsupported)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP or not all(stop):
        raise APIError(400, f"stop takes at most {MAX_STOP} non-empty strings", param="stop")
    engine = served.engine
    choices_asked = _prompt_count(body.prompt) * body.n
    if choices_asked > engine.max_queue:
        raise APIError(
            400,
            f"this request asks for {choices_asked} completions (prompts times n), more than this server ever "
            f"queues ({engine.max_queue}); split it into smaller requests",
            param="n",
        )
    prompts = await served.tokenized(body.prompt)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    try:
        for prompt in prompts:
            engine.check(prompt, max_tokens)
    except ValueError as error:
        message = str(error)
        if "maximum context length" in message:
            raise APIError(400, message, param="prompt", code="context_length_exceeded") from None
        raise APIError(400, message, param="max_tokens" if message.startswith("max_tokens") else "prompt") from None
    fields = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "min_tokens", "logit_bias")
    fields += ("bad_words_ids",)
    values = {k: v for k in fields if (v := getattr(body, k)) is not None}
    if body.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({body.min_tokens}) must be <= max_tokens ({max_tokens})", param="min_tokens")
    try:
        base = sampling_settings(**values, seed=body.seed, vocab_size=engine.model.config.vocab_size)
    except ValueError as error:
        raise APIError(400, str(error), param=_param_of(str(error))) from None
    return prompts, max_tokens, stop, base


def _emitter(loop, events: asyncio.Queue, index: int):
    """The engine's ``emit`` for request ``index``: its events onto ``events``, from the engine's thread."""

    def emit(event):
        try:
            loop.call_soon_threadsafe(events.put_nowait, (index, event))
        except RuntimeError:  # the event loop has closed: nobody is listening
            pass

    return emit


def submit_all(engine: Engine, requests: list[EngineRequest]) -> None:
    """Queue every request, or none: a 429 when the queue is full, a 503 while draining."""
    submitted = []
    try:
        for request in requests:
            submitted.append(engine.submit(request))
    except QueueFull as error:
        for request in submitted:
            request.cancel()
        raise APIError(
            429, f"the server is busy: {error}; retry later", type="rate_limit_error", code="queue_full"
        ) from None
    except EngineStopped as error:
        for request in submitted:
            request.cancel()
        raise APIError(503, str(error), type="server_error", code="draining") from None


def _take(choices: list[_Choice], echo_logprobs: bool, index: int, event) -> _Choice:
    """Apply one engine event to its choice."""
    choice = choices[index]
    if isinstance(event, Finished):
        choice.generated = event.generated
        if choice.finish_reason is None:
            choice.finish_reason = {"length": "length", "stop": "stop"}.get(event.reason, event.reason)
        return choice
    if choice.finish_reason is not None:  # cut by a stop string: later tokens are dropped
        return choice
    if echo_logprobs and not choice.entries:
        choice.echo_prompt(choice.request.prompt, choice.request.prompt_logprobs)
    if choice.add(event):
        choice.finish_reason = "stop"
        choice.generated = choice.request.generated
        choice.request.cancel()
    return choice


async def _collect(requests: list[EngineRequest], events: asyncio.Queue, take, http: Request) -> bool:
    """Hand each request's events to ``take`` until every one has finished; False if the client went away first
    (the requests are cancelled)."""
    remaining = set(range(len(requests)))
    try:
        while remaining:
            try:
                index, event = await asyncio.wait_for(events.get(), timeout=0.25)
            except TimeoutError:
                if await http.is_disconnected():  # nobody to answer: the finally frees the slots
                    return False
                continue
            take(index, event)
            if isinstance(event, Finished):
                remaining.discard(index)
    finally:
        for request in requests:
            request.cancel()
    return True


class EmbeddingRequest(BaseModel):
    """The fields of OpenAI's ``/v1/embeddings``."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, http: Request):
    """Each input's vector, pooled from the final hidden states and L2-normalised (as OpenAI and vLLM return
    them). The inputs are prefilled as prompts are, chunk by chunk in the decode step's budget, so running
    completion streams keep their pace."""
    served = served_by(http)
    adapter = served.adapter_of(body.model)
    engine = served.engine
    width = engine.model.config.hidden_size
    if body.dimensions is not None and body.dimensions != width:
        message = f"dimensions must be this model's width, {width}, or left out: its vectors cannot be shortened"
        raise APIError(400, message, param="dimensions")
    if (count := _prompt_count(body.input)) > engine.max_queue:
        message = f"this request holds {count} inputs, more than this server ever queues ({engine.max_queue}); split it"
        raise APIError(400, message, param="input")
    inputs = await served.tokenized(body.input, "input")
    for i, ids in enumerate(inputs):
        where = "input" if len(inputs) == 1 else f"input[{i}]"
        if not ids:
            raise APIError(400, f"{where} is empty: every input needs at least one token", param="input")
        try:
            engine.check(ids, 0, embedding=True)
        except ValueError as error:
            code = "context_length_exceeded" if "maximum context length" in str(error) else None
            raise APIError(400, f"{where}: {error}", param="input", code=code) from None
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    settings = sampling_settings(temperature=0.0, seed=0, vocab_size=engine.model.config.vocab_size)
    requests = [
        EngineRequest(ids, 1, settings, _emitter(loop, events, i), adapter=adapter, embedding=True)
        for i, ids in enumerate(inputs)
    ]
    submit_all(engine, requests)
    vectors: dict[int, np.ndarray] = {}
    failed = []

    def take(index: int, event) -> None:
        if isinstance(event, Embedded):
            vectors[index] = from_sums(event.sums, event.tokens, served.embedding_pooling, normalize=True)
        elif isinstance(event, Finished) and event.reason != "embedded":
            failed.append(event.reason)

    if not await _collect(requests, events, take, http):
        return Response(status_code=499)
    if failed or len(vectors) != len(inputs):
        raise APIError(500, "embedding failed on the server", type="server_error")
    encode = (
        (lambda v: base64.b64encode(v.astype("<f4").tobytes()).decode())
        if body.encoding_format == "base64"
        else (lambda v: v.tolist())
    )
    tokens = sum(len(ids) for ids in inputs)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode(vectors[i])} for i in range(len(inputs))],
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


class _Guard:
    """ASGI middleware in front of every route: 503 while draining, the API key on ``/v1/``, and POST bodies
    read once with a size limit (413) and a time limit (408) and handed on to the route."""

    def __init__(self, app, *, state, api_key: str | None, max_body_bytes: int, body_timeout: float):
        self.app, self.state, self.api_key, self.max_body_bytes = app, state, api_key, max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error, path = None, scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.state.draining and path not in ("/health", "/metrics"):
            error = APIError(503, "the server is shutting down", type="server_error", code="draining")
        elif self.api_key is not None and path.startswith("/v1/"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self.api_key.encode()):
                message = "missing or incorrect API key: send 'Authorization: Bearer <key>'"
                error = APIError(401, message, code="invalid_api_key")
        if error is None and scope["method"] == "POST":
            declared = headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_body_bytes:
                error = _too_large(self.max_body_bytes)
            else:
                body, more = b"", True
                try:
                    async with asyncio.timeout(self.body_timeout):
                        while more and error is None:
                            message = await receive()
                            if message["type"] == "http.disconnect":
                                return
                            body += message.get("body", b"")
                            more = message.get("more_body", False)
                            if len(body) > self.max_body_bytes:
                                error = _too_large(self.max_body_bytes)
                except TimeoutError:
                    message = f"the request body did not arrive within {self.body_timeout:g} seconds"
                    error = APIError(408, message, code="request_timeout")
                receive = _replay(body, receive)
        if error is not None:
            return await _error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)


def _replay(body: bytes, receive):
    """An ASGI ``receive`` that gives ``body`` once, then whatever the client sends next (its disconnect)."""
    given = False

    async def replay():
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


async def _stream(choices, events, take, request_id, model_name, usage, include_usage, http):
    """Server-sent events as OpenAI sends them: one chunk per piece of text, a final chunk per choice with its
    ``finish_reason``, the usage chunk if asked for, then ``data: [DONE]``."""

    def chunk(choice_rows: list[dict], usage_value: Any = None, with_usage: bool = False) -> str:
        body = {
            "id": request_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choice_rows,
        }
        if with_usage:
            body["usage"] = usage_value
        return f"data: {json.dumps(body)}\n\n"

    remaining = {c.index for c in choices}
    try:
        for c in choices:  # the echoed prompt comes first
            if c.prefix:
                c.sent = len(c.prefix)
                yield chunk(
                    [{"index": c.index, "text": c.prefix, "logprobs": None, "finish_reason": None}], None, include_usage
                )
        while remaining:
            index, event = await events.get()
            choice = take(index, event)
            if isinstance(event, Finished):
                remaining.discard(index)
            done = index not in remaining
            piece = choice.ready()
            if piece:
                row = {"index": index, "text": piece, "logprobs": choice.new_logprobs(), "finish_reason": None}
                yield chunk([row], None, include_usage)
            if done:
                if choice.finish_reason == "error":
                    yield f"data: {json.dumps(error_body('generation failed on the server', 'server_error'))}\n\n"
                    return
                row = {
                    "index": index,
                    "text": choice.ready(),
                    "logprobs": choice.new_logprobs(),
                    "finish_reason": choice.finish_reason,
                }
                yield chunk([row], None, include_usage)
        if include_usage:
            yield chunk([], usage(), True)
        yield "data: [DONE]\n\n"
    finally:  # also when the client goes away mid-stream: the slots are freed before the next step
        for choice in choices:
            choice.request.cancel()
