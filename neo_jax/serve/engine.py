"""Continuous batching: a fixed number of slots share one KV cache, and one compiled step advances them all.

Each slot is one row of the cache (``KVCache.index`` holds one slot index per row), its prompt's tokens at
slots ``0..n-1``. A waiting request takes a free row, and its prompt is prefilled in chunks of a fixed token
budget (``prefill_chunk``) inside the same step that gives every decoding row its next token
(``neo_jax.generation.batching.step``): a long prompt no longer stops the running streams, and up to
``MAX_LANES`` prompts advance per step, each in its own lane (the budget split evenly: one lane of 64
tokens, two of 32, four of 16; the step picks the split that prefills the most). While no row decodes, a step
runs the lanes alone, up to four whole chunks, every prompt's earlier chunks before any last one, so that a
burst's streams start together. The step that holds a prompt's end also chooses its first token.
``prefill_chunk=0`` keeps the whole-prompt prefill, one request alone at a bucketed length between steps.

A row is freed the moment its request finishes (EOS, ``max_tokens``) or is cancelled, and the next waiting
request takes it. Sampling settings are per-row arrays and every row draws from its own key
(``fold_in(key(seed), tokens so far)``), so greedy and sampled requests share one program and a seeded
request gives the same tokens whatever else is in the batch.

With ``prefix_cache_mb``, the keys and values of whole prompt blocks are kept in a pool on the device
(``neo_jax.serve.prefix``); a request whose prompt starts with cached blocks has them copied into its row and
prefills only the rest. With several LoRA adapters on the model (``neo_jax.lora.add_many``), each request
names its own and rows of different adapters share every step (``Request.adapter``).

Every program is compiled ahead of time by ``Engine.warm_up`` (the decode step, one mixed step per lane
split, and the helpers), so no request shape compiles afterwards. The log-probabilities of the prompt's own
tokens (``echo`` with ``logprobs``) are a branch of the same step, taken only when a request asks for them.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from neo_jax import sharding, validate
from neo_jax.generation import batching, speculative
from neo_jax.generation.batching import (
    BLOCK,
    DEFAULT_PREFILL_CHUNK,
    MAX_BAD_LENGTH,
    MAX_BAD_WORDS,
    MAX_LOGIT_BIAS,
    NEUTRAL,
    Lanes,
    RowSampling,
    check_slots,
    chunk_limit,
)
from neo_jax.generation.programs import Weights
from neo_jax.generation.sampling import SamplingParams
from neo_jax.lora import Adapters, adapted_layers
from neo_jax.model import GPTNeo
from neo_jax.serve.prefix import PrefixCache, hashes
from neo_jax.shapes import bucket

log = logging.getLogger(__name__)

MAX_LANES = 4


class QueueFull(RuntimeError):
    """More requests are waiting than the engine's ``max_queue``."""


class EngineStopped(RuntimeError):
    """The engine is draining or stopped and takes no new requests."""


@dataclasses.dataclass
class Token:
    """One generated token: its id, the raw model's log-probability of it, and the ``TOP_LOGPROBS`` most
    likely tokens with theirs."""

    id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class Finished:
    """The request is over: ``reason`` is "stop" (EOS), "length" (``max_tokens``), "cancelled" or "error"."""

    reason: str
    generated: int  # tokens generated, EOS included


@dataclasses.dataclass
class Embedded:
    """An embedding request's prompt has run: its final hidden states summed over its tokens, plainly and
    weighted by position + 1, and its last token's (``neo_jax.embed.from_sums`` pools them)."""

    sums: np.ndarray  # [3, embed] float32
    tokens: int


@dataclasses.dataclass
class Request:
    """One sequence to continue. Events (``Token``, then one ``Finished``) go to ``emit``, called from the
    engine's thread. ``prompt_logprobs`` is filled before the first token when the request asked for it.
    An ``embedding`` request generates nothing: its prompt is prefilled like any other, chunk by chunk, and
    its ``Embedded`` event comes before ``Finished("embedded")``."""

    prompt: list[int]
    max_tokens: int
    sampling: dict
    emit: Callable[[object], None]
    echo_logprobs: bool = False
    adapter: int = -1  # the LoRA adapter (index in ``Engine.adapters``); -1: the base model
    embedding: bool = False
    sums: np.ndarray | None = None  # an embedding's sums so far
    prompt_logprobs: list = dataclasses.field(default_factory=list)
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: bool = False
    generated: int = 0
    last_token_at: float | None = None
    slot: int = -1  # its row, once it has one
    done: int = 0  # prompt tokens in the row's cache
    started: bool = False  # the first chunk has run
    chain: list = dataclasses.field(default_factory=list)  # prefix-cache hashes of the prompt's whole blocks
    drafted: int = 0  # tokens of the row the draft model's cache holds

    @property
    def end(self) -> int:
        """The slot of the row's newest token (the next step's input)."""
        return len(self.prompt) + self.generated - 1

    def cancel(self) -> None:
        """Stop this request; its slot is freed before the engine's next step."""
        self.cancelled = True


def sampling_settings(
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    min_tokens: int = 0,
    logit_bias: dict | None = None,
    bad_words_ids: list | None = None,
    seed: int | None = None,
    vocab_size: int,
) -> dict:
    """One request's settings, checked as ``generate`` checks them (``SamplingParams.of``): ``temperature`` 0
    is greedy, ``top_k`` 0 (or -1, vLLM's spelling) is off; ``min_tokens`` (vLLM's) holds EOS back;
    ``logit_bias`` is OpenAI's (at most ``MAX_LOGIT_BIAS`` token ids, each biased by -100 to 100);
    ``bad_words_ids`` transformers' (at most ``MAX_BAD_WORDS`` sequences of at most ``MAX_BAD_LENGTH`` tokens);
    without a ``seed`` a random one is drawn."""
    if top_k == -1 and not isinstance(top_k, bool):
        top_k = 0
    params = SamplingParams.of(
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        min_new_tokens=min_tokens,
        logit_bias=logit_bias,
        bad_words_ids=bad_words_ids,
        vocab_size=vocab_size,
    )
    words = [list(map(int, word)) for word in bad_words_ids or ()]
    if len(words) > MAX_BAD_WORDS or any(len(word) > MAX_BAD_LENGTH for word in words):
        raise ValueError(
            f"bad_words_ids takes at most {MAX_BAD_WORDS} sequences of at most {MAX_BAD_LENGTH} tokens each"
        )
    bias = {}
    if params.use_logit_bias:
        if len(logit_bias or {}) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias takes at most {MAX_LOGIT_BIAS} token ids, got {len(logit_bias or {})}")
        bias = {int(token): float(params.logit_bias[int(token)]) for token in logit_bias or {}}
        if any(not -100 <= value <= 100 for value in bias.values()):
            raise ValueError("logit_bias values must be between -100 and 100")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    validate.integer("seed", seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return dict(  # greedy rows hold neutral values
        temperature=float(params.temperature) if params.do_sample else 1.0,
        top_k=params.top_k,
        top_p=float(params.top_p) if params.use_top_p else 1.0,
        min_p=float(params.min_p) if params.use_min_p else 0.0,
        repetition_penalty=float(params.repetition_penalty),
        sample=params.do_sample,
        seed=seed,
        min_tokens=int(params.min_new),
        logit_bias=bias,
        bad_words_ids=words,
    )


class Engine:
    """Continuous batching over ``max_batch`` slots of ``max_len`` cache positions each.

    ``submit`` queues a request (at most ``max_queue`` wait); a background thread (``start``) gives waiting
    requests free slots, prefills them chunk by chunk and advances every decoding slot by one token per
    step. ``generate`` is a blocking convenience. The model may live on a mesh (``from_pretrained(...,
    mesh=...)``): the slots are then split over its batch axes like any batch. ``adapters`` names the LoRA
    adapters a model made with ``lora.add_many`` holds, in order.
    """

    def __init__(
        self,
        model: GPTNeo,
        *,
        max_batch: int = 16,
        max_len: int | None = None,
        max_queue: int = 256,
        eos_token_id: int | None = -1,
        metrics=None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        prefix_cache_mb: float = 0,
        adapters: tuple[str, ...] = (),
        draft: GPTNeo | str | None = None,
        num_draft_tokens: int = 4,
    ):
        config = model.config
        validate.integer("max_queue", max_queue, least=1)
        max_len = check_slots(config, max_batch, max_len)
        self.lanes = check_prefill(prefill_chunk, prefix_cache_mb, max_batch)
        if prefill_chunk > chunk_limit(max_len):
            raise ValueError(
                f"prefill_chunk {prefill_chunk} is longer than slots of max_len {max_len} can use: give at most "
                f"{chunk_limit(max_len)}"
            )
        self.idle_lanes = tuple(n for n in (1, 2, 4) if prefill_chunk and n <= min(MAX_LANES, max_batch))
        blocks = prefix_blocks(prefix_cache_mb, config, model.dtype)
        held = {dense.lora.a.shape[-3] for _, dense in adapted_layers(model) if isinstance(dense.lora, Adapters)}
        if held != ({len(adapters)} if adapters else set()):
            raise ValueError(
                f"the model holds {held or 'no'} multi-adapter layers but {len(adapters)} adapter names were given"
            )
        if draft is not None:
            check_speculation(model, draft, num_draft_tokens, max_len, prefill_chunk)
        self.k = num_draft_tokens if draft is not None else 0
        self.lookahead = self.k + 1 if draft is not None else 0
        self.draft = None if draft is None or isinstance(draft, str) else draft
        self.switch = Switch() if draft is not None else None
        self.model, self.max_batch, self.max_len, self.max_queue = model, max_batch, max_len, max_queue
        self.prefill_chunk, self.adapters = prefill_chunk, tuple(adapters)
        self.eos_token_id = config.eos_token_id if eos_token_id == -1 else eos_token_id
        self.metrics = metrics
        self.mesh = sharding.model_mesh(model)
        self._graphdefs, self._arrays = Weights.of(model).split()
        self._draft_graphdefs, self._draft_arrays = Weights.of(self.draft).split() if self.draft else (None, None)
        self.buckets = sorted({min(bucket(n), max_len) for n in range(1, max_len)}) if not prefill_chunk else []
        with sharding.use_mesh(self.mesh):
            empty = jax.jit(batching.empty_slots, static_argnums=(0, 1, 2, 3, 4, 5))
            self._slots = empty(config, max_batch, max_len, model.dtype, prefill_chunk, self.lookahead)
            self._draft_cache = None
            if self.draft is not None:
                draft_cache = jax.jit(batching.slot_cache, static_argnums=(0, 1, 2, 3, 4, 5))
                self._draft_cache = draft_cache(
                    self.draft.config, max_batch, max_len, self.draft.dtype, prefill_chunk, self.lookahead
                )
            self._pool = (
                jax.jit(batching.empty_pool, static_argnums=(0, 1, 2))(config, blocks, model.dtype) if blocks else None
            )
        # each row's tokens, for n-gram lookup and the draft model's catch-up (speculative.serve_round)
        self._sequence = np.zeros((max_batch, max_len + self.lookahead), np.int32) if draft is not None else None
        self.prefix_cache = PrefixCache(blocks, metrics) if blocks else None
        self._programs: dict = {}
        self._requests: list[Request | None] = [None] * max_batch
        self._prefilling: list[Request] = []  # in the order they took their rows
        self._waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self.accepting = True
        self.error: Exception | None = None  # set if the loop failed; the engine then takes no requests

    # ---- compiled programs -------------------------------------------------------------------------------
    def _replicated(self, array):
        """A small input on every device of the mesh (or on the default device)."""
        return jax.device_put(array, None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec()))

    def _admit_inputs(self, slot: int, request: Request):
        prompt = request.prompt
        width = min(bucket(len(prompt)), self.max_len)
        ids = np.zeros((1, width), np.int32)
        mask = np.zeros((1, width), np.int32)
        ids[0, width - len(prompt) :], mask[0, width - len(prompt) :] = prompt, 1
        seen = np.zeros((self.model.config.vocab_size,), bool)
        if request.sampling["repetition_penalty"] != 1.0:
            seen[prompt] = True
        inputs = (slot, ids, mask, seen, RowSampling.of([request.sampling]), request.adapter, request.echo_logprobs)
        return jax.tree.map(self._replicated, inputs)

    def _lane_inputs(self, lanes: dict, settings: list[dict]) -> Lanes:
        return jax.tree.map(self._replicated, Lanes(**lanes, settings=RowSampling.of(settings)))

    def _program(self, name: str, size: int = 0):
        """The compiled program ``name`` ("step", "release", "restore", "mixed" for a number of lanes that split
        the prefill budget, "idle" for a number of lanes of a whole budget each, or
        "admit" for a prompt bucket), compiled ahead of time on first use."""
        key = (name, size)
        if key not in self._programs:
            replicated = None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())
            layout = None if self.mesh is None else jax.tree.map(lambda x: x.sharding, self._slots)
            pool_layout = None if self.mesh is None else jax.tree.map(lambda x: x.sharding, self._pool)
            draft_layout = None if self.mesh is None else jax.tree.map(lambda x: x.sharding, self._draft_cache)
            with sharding.use_mesh(self.mesh):
                if name in ("step", "mixed", "idle"):
                    fn = partial(batching.step, self._graphdefs, decode=name != "idle")
                    lanes = None
                    if name != "step":
                        width = self.prefill_chunk // (size if name == "mixed" else 1)
                        lanes = self._lane_inputs(batching.empty_lanes(size, width, self.max_batch), [NEUTRAL] * size)
                    args = (self._arrays, self._slots, self._pool, lanes, self._replicated(np.bool_(False)))
                    donate, outs = (1, 2), (layout, pool_layout, replicated, replicated)
                elif name == "spec":
                    fn = partial(speculative.serve_round, self._graphdefs, self._draft_graphdefs, k=self.k)
                    sequence = None if self.draft else self._replicated(self._sequence)
                    args = (self._arrays, self._draft_arrays, self._slots, self._draft_cache, sequence)
                    donate = (2, 3) if self.draft else (2,)
                    outs = (layout, draft_layout, replicated)
                elif name == "catch":
                    fn = partial(speculative.catch_up, self._draft_graphdefs)
                    rows = np.zeros(self.max_batch, np.int32)
                    ids = np.zeros((self.max_batch, self.prefill_chunk), np.int32)
                    args = (self._draft_arrays, self._draft_cache, *map(self._replicated, (ids, rows, rows)))
                    donate, outs = (1,), draft_layout
                elif name == "release":
                    fn, args = batching.release, (self._slots, self._replicated(np.zeros(self.max_batch, bool)))
                    donate, outs = (0,), layout
                elif name == "restore":
                    blocks = np.zeros(self.max_len // BLOCK, np.int32)
                    fn, args = (
                        batching.restore,
                        (self._slots, self._pool, *map(self._replicated, (np.int32(0), blocks, np.int32(0)))),
                    )
                    donate, outs = (0,), layout
                else:
                    fn = partial(batching.admit, self._graphdefs)
                    sampling = sampling_settings(seed=0, vocab_size=self.model.config.vocab_size)
                    args = (self._arrays, self._slots, *self._admit_inputs(0, Request([0] * size, 1, sampling, print)))
                    donate, outs = (1,), (layout, replicated)
                out_shardings = None if self.mesh is None else outs
                jitted = jax.jit(fn, donate_argnums=donate, out_shardings=out_shardings)
                self._programs[key] = jitted.lower(*args).compile()
        return self._programs[key]

    def _program_names(self) -> list[tuple[str, int]]:
        names = [("step", 0), ("release", 0)] + [("spec", 0)] * bool(self.switch) + [("catch", 0)] * bool(self.draft)
        if self.prefill_chunk:
            names += [("mixed", lanes) for lanes in self.lanes] + [("idle", lanes) for lanes in self.idle_lanes]
        else:
            names += [("admit", w) for w in reversed(self.buckets)]
        return names + ([("restore", 0)] if self.prefix_cache else [])

    def warm_up(self, progress: Callable[[str], None] | None = None) -> float:
        """Compile every program, two at a time (XLA compiles outside the GIL); return the seconds it took."""
        start = time.perf_counter()
        names = self._program_names()
        done = 0

        def compile_one(name_size):
            nonlocal done
            self._program(*name_size)
            done += 1
            if progress:
                name, size = name_size
                progress(f"compiled {name}{f' {size}' if size else ''} ({done}/{len(names)})")

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(compile_one, names))
        return time.perf_counter() - start

    # ---- requests ----------------------------------------------------------------------------------------
    def check(self, prompt: list[int], max_tokens: int, embedding: bool = False) -> None:
        """Raise ValueError if the request cannot be served: bad token ids, or more tokens than a slot holds (an
        embedding's prompt may fill it: nothing follows)."""
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if not all(isinstance(t, int | np.integer) and not isinstance(t, bool) for t in prompt):
            raise ValueError("prompt token ids must be integers")
        vocab = self.model.config.vocab_size
        if bad := [t for t in prompt if not 0 <= t < vocab]:  # in Python: 10**30 overflows any array dtype
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {bad[0]}")
        if embedding:
            if not self.prefill_chunk:
                raise ValueError(
                    "embeddings are computed in prefill chunks, and this engine prefills whole prompts "
                    "(prefill_chunk 0): give it a prefill_chunk"
                )
            if len(prompt) > self.max_len:
                raise ValueError(
                    f"this server's maximum context length is {self.max_len} tokens, but the input has {len(prompt)}; "
                    "shorten it"
                )
            return
        validate.integer("max_tokens", max_tokens, least=1)
        if len(prompt) + max_tokens > self.max_len:
            raise ValueError(
                f"this server's maximum context length is {self.max_len} tokens, but {len(prompt) + max_tokens} "
                f"were requested ({len(prompt)} in the prompt, {max_tokens} for the completion); "
                "shorten the prompt or ask for fewer tokens"
            )

    def submit(self, request: Request) -> Request:
        """Queue ``request`` (checked first); raises QueueFull or EngineStopped when it cannot wait."""
        self.check(request.prompt, request.max_tokens, request.embedding)
        eos = -1 if self.eos_token_id is None else self.eos_token_id
        request.sampling = {**request.sampling, "eos": eos, "tail": request.prompt[-(MAX_BAD_LENGTH - 1) :]}
        if not -1 <= request.adapter < len(self.adapters):
            raise ValueError(f"adapter {request.adapter} is not one of this engine's {len(self.adapters)}")
        with self._lock:
            if not self.accepting:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (max_queue {self.max_queue})")
            self._waiting.append(request)
            self._lock.notify()
        self._observe()
        return request

    def generate(self, prompt: list[int], max_tokens: int, *, adapter: int = -1, **sampling) -> tuple[list[int], str]:
        """Blocking: the generated tokens (EOS excluded) and why generation stopped. Needs ``start()``."""
        if not self._running:
            raise RuntimeError("the engine is not running: call engine.start() first")
        done = threading.Event()
        tokens, finished = [], []

        def emit(event):
            if isinstance(event, Token):
                tokens.append(event.id)
            else:
                finished.append(event.reason)
                done.set()

        settings = sampling_settings(**sampling, vocab_size=self.model.config.vocab_size)
        self.submit(Request(list(prompt), max_tokens, settings, emit, adapter=adapter))
        done.wait()
        return tokens, finished[0]

    @property
    def active(self) -> int:
        return sum(r is not None for r in self._requests)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def idle(self) -> bool:
        with self._lock:
            return not self._waiting and self.active == 0

    def _observe(self):
        if self.metrics:
            self.metrics.queue_length.set(self.waiting)
            self.metrics.active_slots.set(self.active)

    # ---- the loop ----------------------------------------------------------------------------------------
    def start(self) -> Engine:
        """Run the engine loop in a background thread (compiling first if ``warm_up`` has not run)."""
        self.warm_up()
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="neo-jax-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop; waiting and active requests are finished as cancelled."""
        with self._lock:
            self.accepting = False
            self._running = False
            self._lock.notify()
        if self._thread:
            self._thread.join()
        for request in [*self._waiting, *(r for r in self._requests if r)]:
            request.emit(Finished("cancelled", request.generated))
        self._waiting.clear()
        self._requests = [None] * self.max_batch
        self._prefilling = []

    def _finish(self, request: Request, reason: str) -> None:
        if request.slot >= 0:
            self._requests[request.slot] = None
        if request in self._prefilling:
            self._prefilling.remove(request)
        request.emit(Finished(reason, request.generated))
        if self.metrics:
            self.metrics.requests.labels(reason).inc()

    def _deliver(self, request: Request, token, logprob, top_ids, top_logprobs, now: float) -> bool:
        """Hand one token to its request; True if the request is over."""
        request.generated += 1
        if self.metrics:
            self.metrics.generated_tokens.inc()
            if request.last_token_at is None:
                self.metrics.time_to_first_token.observe(now - request.submitted)
            else:
                self.metrics.inter_token_latency.observe(now - request.last_token_at)
        request.last_token_at = now
        if self._sequence is not None:
            self._sequence[request.slot, request.end] = token
        if token == self.eos_token_id:
            self._finish(request, "stop")
            return True
        request.emit(Token(int(token), float(logprob), list(zip(top_ids.tolist(), top_logprobs.tolist(), strict=True))))
        if request.generated >= request.max_tokens:
            self._finish(request, "length")
            return True
        return False

    def _take_waiting(self) -> Request | None:
        """The next waiting request that is not cancelled, if a row is free for it."""
        while True:
            with self._lock:
                if None not in self._requests or not self._waiting:
                    return None
                request = self._waiting.popleft()
            if not request.cancelled:
                request.slot = self._requests.index(None)
                self._requests[request.slot] = request
                if self._sequence is not None:
                    self._sequence[request.slot, : len(request.prompt)] = request.prompt
                if self.metrics:
                    self.metrics.prompt_tokens.inc(len(request.prompt))
                self._observe()  # the queue gauge drops as the request is taken, whether chunked or whole
                return request
            self._finish(request, "cancelled")
            self._observe()

    def _admit_waiting(self) -> None:
        """Give waiting requests free rows: chunked, to be prefilled by the next steps (each first copying in
        what the prefix cache holds of the prompt, ``_reuse_prefix``); else prefilled whole, one at a time."""
        while (request := self._take_waiting()) is not None:
            if self.prefill_chunk:
                if self.prefix_cache is not None:
                    request.chain = hashes(request.prompt, request.adapter)
                self._prefilling.append(request)
                continue
            program = self._program("admit", min(bucket(len(request.prompt)), self.max_len))
            self._slots, out = program(self._arrays, self._slots, *self._admit_inputs(request.slot, request))
            request.started, request.done = True, len(request.prompt)
            out = jax.device_get(out)
            if request.echo_logprobs:  # the prompt's tokens 1..n-1 are the last n-1 of the bucket
                chosen, top_ids, top_logprobs = (x[x.shape[0] - (len(request.prompt) - 1) :] for x in out[4])
                request.prompt_logprobs = list(
                    zip(chosen.tolist(), top_ids.tolist(), top_logprobs.tolist(), strict=True)
                )
            if self._deliver(request, *(np.asarray(x) for x in out[:4]), now=time.perf_counter()):
                self._release([request.slot])  # done at once: free the row before another request takes it

    def _reuse_prefix(self, request: Request) -> None:
        """Copy the cached blocks ``request``'s prompt starts with into its row, if more are cached than it
        holds. Called before every step until the prompt's first chunk runs, so that a prompt waiting behind
        another with the same prefix takes the blocks that one computed meanwhile (every block found was
        computed by an earlier step). At least one prompt token is always prefilled (its logits give the first
        token); with ``echo`` the last cached block is computed again too, its last position giving the
        log-probability of the next block's first token."""
        if self.prefix_cache is None or request.embedding:  # an embedding pools every token's state
            return
        found = self.prefix_cache.lookup(request.chain, request.echo_logprobs)
        usable = min(len(found), (len(request.prompt) - 1) // BLOCK)
        if request.echo_logprobs:
            usable = max(0, min(len(found) - 1, usable))
        if usable * BLOCK <= request.done:
            return
        blocks = np.zeros(self.max_len // BLOCK, np.int32)
        blocks[:usable] = [block.index for block in found[:usable]]
        inputs = map(self._replicated, (np.int32(request.slot), blocks, np.int32(usable)))
        self._slots = self._program("restore")(self._slots, self._pool, *inputs)
        request.done = usable * BLOCK
        if request.echo_logprobs:  # tokens 1..done, the last from the next block (found, not reused)
            entries = [entry for block in found[: usable + 1] for entry in block.logprobs or ()]
            request.prompt_logprobs = entries[1 : request.done + 1]

    def _lane_programs(self, decoding: bool) -> list[tuple[str, int, int]]:
        """The programs a step with prompt chunks may run, as (name, lanes, width): beside decoding rows, the
        budget split into lanes; when no row is decoding (no stream waits on the step), the lanes alone, up to
        ``MAX_LANES`` of a whole budget each."""
        if decoding:
            return [("mixed", lanes, self.prefill_chunk // lanes) for lanes in self.lanes]
        return [("idle", lanes, self.prefill_chunk) for lanes in self.idle_lanes]

    def _lanes(self, decoding: bool) -> tuple[str, int, dict, list[dict], list[tuple[Request, int, int, list]]]:
        """This step's chunks: the program that prefills the most prompt tokens (ties: the fewest computed), the
        oldest prompts first; the host arrays of its lanes, their settings, and per lane what it holds
        (request, start, count, and the pool blocks it saves as (block number, hash))."""
        pending = self._prefilling
        if not decoding:  # no stream runs: every prompt's earlier chunks before any last one, so that the streams
            # start together, instead of the first ones starting and then slowing the rest's prefill
            pending = [r for r in pending if len(r.prompt) - r.done > self.prefill_chunk] or pending

        def tokens(program):
            _, lanes, width = program
            return sum(min(len(r.prompt) - r.done, width) for r in pending[:lanes]), -lanes * width

        name, lanes, width = max(self._lane_programs(decoding), key=tokens)
        chosen = pending[:lanes]
        arrays = batching.empty_lanes(lanes, width, self.max_batch)
        settings, held, allocated = [NEUTRAL] * lanes, [], 0
        for lane, request in enumerate(chosen):
            prompt, start = request.prompt, request.done
            if self.prefix_cache is not None and not request.started:
                self.prefix_cache.record(start)  # its first chunk: the prompt tokens it found cached
            count = min(len(prompt) - start, width)
            arrays["row"][lane], arrays["start"][lane], arrays["count"][lane] = request.slot, start, count
            arrays["ids"][lane, :count] = prompt[start : start + count]
            after = prompt[start + 1 : start + count + 1]
            arrays["targets"][lane, : len(after)] = after
            arrays["first"][lane], arrays["final"][lane] = not request.started, start + count == len(prompt)
            arrays["adapter"][lane] = request.adapter
            settings[lane] = request.sampling
            saved, cache = [], self.prefix_cache
            for j in range(count // BLOCK):
                if cache is None or allocated == cache.capacity:  # more would evict blocks this step writes
                    break
                number = start // BLOCK + j
                index = cache.allocate(request.chain[number])
                if index is not None:
                    arrays["save"][lane, j] = index
                    allocated += 1
                saved.append(number)
            held.append((request, start, count, saved))
        return name, lanes, arrays, settings, held

    def _step(self) -> None:
        """One step: a token for every decoding row, and the next chunk of the prompts waiting in lanes."""
        decoding = [r for r in self._requests if r is not None and r.started and r not in self._prefilling]
        echo = False
        for request in self._prefilling:
            if not request.started:
                self._reuse_prefix(request)
        if self._prefilling:
            name, lanes, arrays, settings, held = self._lanes(bool(decoding))
            echo = any(request.echo_logprobs for request, *_ in held)
            inputs = (self._lane_inputs(arrays, settings), self._replicated(np.bool_(echo)))
            self._slots, self._pool, out, prompt_out = self._program(name, lanes)(
                self._arrays, self._slots, self._pool, *inputs
            )
        elif self.switch is not None and self.switch.speculate():
            self._speculate(decoding)
            return
        else:
            held = []
            start = time.perf_counter()
            self._slots, self._pool, out, prompt_out = self._program("step")(
                self._arrays, self._slots, self._pool, None, self._replicated(np.bool_(False))
            )
        tokens, logprobs, top_ids, top_logprobs = jax.device_get(out)
        if self.switch is not None and not held:
            self.switch.record(False, 1.0, time.perf_counter() - start)
        embedding = any(request.embedding for request, *_ in held)
        prompt_out, sums = prompt_out or (None, None)
        prompt_out = jax.device_get(prompt_out) if echo else None
        sums = np.asarray(jax.device_get(sums)) if embedding else None
        now = time.perf_counter()
        producing, freed = list(decoding), []
        for lane, (request, start, count, saved) in enumerate(held):
            request.started = True
            request.done = start + count
            if request.echo_logprobs:
                self._keep_prompt_logprobs(request, [x[lane] for x in prompt_out or ()], start, count, saved)
            if request.embedding and sums is not None:  # the plain and weighted sums add up; the last is the newest
                if request.sums is None:
                    request.sums = sums[lane].copy()
                else:
                    request.sums[:2] += sums[lane, :2]
                    request.sums[2] = sums[lane, 2]
            if request.done == len(request.prompt):
                self._prefilling.remove(request)
                if request.embedding:
                    self._embedded(request)
                    freed.append(request.slot)
                else:
                    producing.append(request)
        for request in producing:
            slot = request.slot
            if request.cancelled:
                self._finish(request, "cancelled")
                freed.append(slot)
            elif self._deliver(request, tokens[slot], logprobs[slot], top_ids[slot], top_logprobs[slot], now):
                freed.append(slot)
        self._release(freed)

    def _speculate(self, decoding: list[Request]) -> None:
        """A speculative round for every decoding row (``speculative.serve_round``)."""
        if self.draft is not None:
            self._catch_up(decoding)
        sequence = None if self.draft is not None else self._replicated(self._sequence)
        start = time.perf_counter()
        self._slots, self._draft_cache, out = self._program("spec")(
            self._arrays, self._draft_arrays, self._slots, self._draft_cache, sequence
        )
        tokens, emitted, accepted, logprobs, top_ids, top_logprobs = jax.device_get(out)
        now = time.perf_counter()
        if self.switch is not None:
            self.switch.record(True, float(emitted.sum()) / len(decoding), now - start)
        if self.metrics:
            self.metrics.spec_decode_drafts.inc(len(decoding))
            self.metrics.spec_decode_draft_tokens.inc(self.k * len(decoding))
            self.metrics.spec_decode_accepted_tokens.inc(int(accepted.sum()))
        freed = []
        for request in decoding:
            slot = request.slot
            if request.cancelled:
                self._finish(request, "cancelled")
                freed.append(slot)
                continue
            for j in range(emitted[slot]):
                if self._deliver(
                    request, tokens[slot, j], logprobs[slot, j], top_ids[slot, j], top_logprobs[slot, j], now
                ):
                    freed.append(slot)
                    break
            request.drafted = request.end  # the draft's cache holds every token before the newest
        self._release(freed)

    def _catch_up(self, decoding: list[Request]) -> None:
        """Write into the draft model's cache the tokens of decoding rows it has not seen (their prompts, the
        tokens of plain steps), ``prefill_chunk`` per row and call."""
        width, sequence = self.prefill_chunk, self._sequence
        assert sequence is not None
        while lagging := [r for r in decoding if r.drafted < r.end]:
            ids = np.zeros((self.max_batch, width), np.int32)
            start, count = np.zeros(self.max_batch, np.int32), np.zeros(self.max_batch, np.int32)
            for request in lagging:
                slot, begin = request.slot, request.drafted
                n = min(width, request.end - begin)
                ids[slot, :n], start[slot], count[slot] = sequence[slot, begin : begin + n], begin, n
                request.drafted = begin + n
            inputs = map(self._replicated, (ids, start, count))
            self._draft_cache = self._program("catch")(self._draft_arrays, self._draft_cache, *inputs)

    def _embedded(self, request: Request) -> None:
        """An embedding's last chunk has run: hand it its sums."""
        sums = np.asarray(request.sums, np.float32)
        if not request.cancelled:
            request.emit(Embedded(sums, len(request.prompt)))
        if self.metrics:
            self.metrics.embedding_requests.inc()
            self.metrics.embedding_tokens.inc(len(request.prompt))
        self._finish(request, "cancelled" if request.cancelled else "embedded")

    def _keep_prompt_logprobs(self, request: Request, computed: list, start: int, count: int, saved: list[int]) -> None:
        """Add a chunk's log-probabilities of the prompt's tokens to ``request`` (position j predicts token
        ``start + j + 1``), and keep those of the blocks it ``saved`` in the prefix cache."""
        known = min(count, len(request.prompt) - 1 - start)
        request.prompt_logprobs.extend(zip(*(x[:known].tolist() for x in computed), strict=True))
        for number in saved:
            block = self.prefix_cache.blocks.get(request.chain[number]) if self.prefix_cache else None
            if block is not None:
                first = number * BLOCK
                block.logprobs = [
                    None if t == 0 else request.prompt_logprobs[t - 1] for t in range(first, first + BLOCK)
                ]

    def _release(self, slots: list[int]) -> None:
        """Mark ``slots`` free on the device (their rows stop advancing until a new request takes them)."""
        if slots:
            mask = np.zeros(self.max_batch, bool)
            mask[slots] = True
            self._slots = self._program("release")(self._slots, self._replicated(mask))
        self._observe()

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while self._running and not self._waiting and self.active == 0:
                        self._lock.wait()
                    if not self._running:
                        return
                cancelled = [r for r in self._requests if r is not None and r.cancelled]
                for request in cancelled:
                    self._finish(request, "cancelled")
                self._release([r.slot for r in cancelled if r.started])
                self._admit_waiting()
                if self.active:
                    self._step()
        except Exception as error:  # a failed program: every request learns it, nothing hangs
            log.exception("engine loop failed")
            with self._lock:
                self.accepting = False
                pending = [*self._waiting, *(r for r in self._requests if r)]
                self._waiting.clear()
            for request in pending:
                request.emit(Finished("error", request.generated))
            self.error = error


def check_prefill(prefill_chunk: int, prefix_cache_mb: float, max_batch: int) -> tuple[int, ...]:
    """The lane counts a prefill budget splits into (widths whole blocks), after checking the settings."""
    validate.integer("prefill_chunk", prefill_chunk, least=0)
    if prefill_chunk % BLOCK:
        raise ValueError(
            f"prefill_chunk must be a multiple of {BLOCK} tokens (or 0: whole prompts), got {prefill_chunk}"
        )
    validate.real("prefix_cache_mb", prefix_cache_mb)
    if prefix_cache_mb < 0:
        raise ValueError(f"prefix_cache_mb must be >= 0 (0: no prefix cache), got {prefix_cache_mb}")
    if prefix_cache_mb and not prefill_chunk:
        raise ValueError("the prefix cache needs chunked prefill: set prefill_chunk > 0 or leave prefix_cache_mb at 0")
    lanes, options = 1, []
    while (
        lanes <= min(MAX_LANES, max_batch) and prefill_chunk // lanes >= BLOCK and not (prefill_chunk // lanes) % BLOCK
    ):
        options.append(lanes)
        lanes *= 2
    return tuple(options)


def prefix_blocks(prefix_cache_mb: float, config, dtype) -> int:
    """How many prefix-cache blocks fit ``prefix_cache_mb`` MiB; a budget too small for one is an error."""
    if not prefix_cache_mb:
        return 0
    size = batching.block_bytes(config, dtype)
    sharding.check_fits(
        f"prefix_cache_mb {prefix_cache_mb:g}", prefix_cache_mb * 2**20, "give less, or 0 for no prefix cache"
    )
    blocks = int(prefix_cache_mb * 2**20 // size)
    if blocks < 1:
        raise ValueError(
            f"prefix_cache_mb {prefix_cache_mb:g} holds no block: one block ({BLOCK} tokens, every layer's keys and "
            f"values) takes {size / 2**20:.3g} MiB; give at least that, or 0 for no prefix cache"
        )
    return blocks


def check_speculation(model: GPTNeo, draft, num_draft_tokens: int, max_len: int, prefill_chunk: int) -> None:
    """A draft (a GPT-Neo or "ngram") the engine can speculate with."""
    speculative.check_draft(model, draft, num_draft_tokens)
    if not prefill_chunk:
        raise ValueError("speculative decoding in the server needs chunked prefill: give a prefill_chunk > 0")
    if not isinstance(draft, str):
        speculative.check_draft_positions(draft.config.max_position_embeddings, max_len)


class Switch:
    """The off switch of speculative decoding: each decode step (one token for every decoding row, or a
    speculative round) adds its tokens per row and second to that kind's running mean (per row: the number of
    rows decoding changes), and the steps take the kind whose mean is higher. After ``every`` steps of one
    kind the other runs for ``probe`` steps, so that a draft that starts (or stops) paying is noticed; each
    probe that leaves the choice as it was doubles the steps before the next one (up to ``most``), so that a
    draft that never pays costs less and less. The draft model's catch-up is not timed: a probe after plain
    steps would pay for all of them at once."""

    def __init__(self, every: int = 64, probe: int = 2, most: int = 4096):
        self.every, self.probe, self.most = every, probe, most
        self.interval = every  # steps of the kind in use before the next probe
        self.rates: dict[bool, float] = {}
        self.steps = 0  # of the kind in use, since the last probe
        self.probing = 0  # probe steps left
        self.choice = True  # the kind in use when the probe began

    def _faster(self) -> bool:
        return self.rates[True] >= self.rates[False]

    def speculate(self) -> bool:
        """Whether the next decode step is a speculative round."""
        for kind in (True, False):
            if kind not in self.rates:
                return kind
        return self._faster() != bool(self.probing)

    def record(self, speculative: bool, tokens: float, seconds: float) -> None:
        """A decode step of the kind ``speculative`` gave each decoding row ``tokens`` (on average) in ``seconds``."""
        rate, old = tokens / max(seconds, 1e-9), self.rates.get(speculative)
        self.rates[speculative] = rate if old is None else (old + rate) / 2
        if self.probing:
            self.probing -= 1
            if not self.probing:  # the probe is over: back off while the choice holds
                held = self._faster() == self.choice
                self.interval = min(2 * self.interval, self.most) if held else self.every
        elif len(self.rates) == 2:
            self.steps += 1
            if self.steps >= self.interval:
                self.steps, self.probing, self.choice = 0, self.probe, self._faster()
