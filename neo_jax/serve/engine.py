"""Continuous batching: a fixed number of slots share one KV cache and one compiled decode step.

Each slot is one row of the cache (``KVCache.index`` holds one slot index per row). A new request is
prefilled alone at a bucketed length, its cache row shifted so that its real tokens start at slot 0, and
written into a free row while the other rows keep their state; one compiled step then advances every row.
A row is freed the moment its request finishes (EOS, ``max_tokens``) or is cancelled, and the next waiting
request takes it. Sampling settings are per-row arrays and every row draws from its own key
(``fold_in(key(seed), tokens so far)``), so greedy and sampled requests share one program and a seeded
request gives the same tokens whatever else is in the batch.

Every program is compiled ahead of time by ``Engine.warm_up`` (one prefill per prompt bucket, one step), so
no request shape compiles afterwards. The log-probabilities of the prompt's own tokens (``echo`` with
``logprobs``) are a branch of the same prefill program, taken only when a request asks for them.
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
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from neo_jax import sharding, validate
from neo_jax.evaluate import token_logprobs
from neo_jax.generation.cache import KVCache, init_cache, prefill
from neo_jax.generation.cache import decode_step as model_step
from neo_jax.generation.programs import Weights, build
from neo_jax.generation.sampling import NEG_INF, SamplingParams, min_p, repetition_penalty, seed_key, temperature
from neo_jax.model import GPTNeo
from neo_jax.shapes import bucket

log = logging.getLogger(__name__)

TOP_LOGPROBS = 5  # the most alternatives per token OpenAI's completions API returns


class QueueFull(RuntimeError):
    """More requests are waiting than the engine's ``max_queue``."""


class EngineStopped(RuntimeError):
    """The engine is draining or stopped and takes no new requests."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowSampling:
    """Per-row sampling settings ([rows] arrays). Greedy rows hold neutral values (temperature 1, top_k 0,
    top_p 1, min_p 0), so the processors leave them alone."""

    temperature: jax.Array
    top_k: jax.Array  # 0: off
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    sample: jax.Array  # bool: sample, else the most likely token
    key: jax.Array  # typed PRNG keys

    @classmethod
    def of(cls, rows: list[dict]) -> RowSampling:
        column = lambda name, dtype: jnp.asarray(np.array([r[name] for r in rows], dtype))
        return cls(
            temperature=column("temperature", np.float32),
            top_k=column("top_k", np.int32),
            top_p=column("top_p", np.float32),
            min_p=column("min_p", np.float32),
            repetition_penalty=column("repetition_penalty", np.float32),
            sample=column("sample", bool),
            key=jax.random.wrap_key_data(jnp.stack([jax.random.key_data(seed_key(r["seed"])) for r in rows])),
        )


def _threshold(values, enough, low, high, steps: int = 32):
    """Per row, the largest ``t`` in [low, high] with ``enough(t)`` (monotone: true at ``low``), by bisection:
    a few masked reductions over the vocabulary, where a sort of it costs XLA:CPU ~200 ms per step."""

    def body(_, bounds):
        low, high = bounds
        middle = (low + high) / 2
        ok = enough(middle[:, None])
        return jnp.where(ok, middle, low), jnp.where(ok, high, middle)

    return jax.lax.fori_loop(0, steps, body, (low, high))[0][:, None]


def top_k_rows(logits, k):
    """Each row keeps its own ``k`` largest logits (0: all); ties at the k-th value are kept."""
    kth = _threshold(logits, lambda t: (logits >= t).sum(-1) >= k, logits.min(-1), logits.max(-1), steps=48)
    return jnp.where((k[:, None] > 0) & (logits < kth), NEG_INF, logits)


def top_p_rows(logits, p):
    """Each row keeps its smallest set of most likely tokens whose probability reaches its own ``p``."""
    probs = jax.nn.softmax(logits, axis=-1)
    mass = lambda t: jnp.where(probs >= t, probs, 0).sum(-1) >= p
    cut = _threshold(probs, mass, jnp.zeros(probs.shape[:1]), probs.max(-1))
    return jnp.where((p[:, None] < 1) & (probs < cut), NEG_INF, logits)


def _sample(logits, keys):
    """One draw per row from softmax(logits), by inverting the cumulative distribution at a uniform number
    from the row's own key (one random number per row instead of a Gumbel draw per vocabulary entry)."""
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
    u = jax.vmap(lambda key: jax.random.uniform(key, (), minval=jnp.finfo(jnp.float32).tiny))(keys)
    return jnp.minimum((cdf < (u * cdf[:, -1])[:, None]).sum(-1), logits.shape[-1] - 1)


def _choose(logits, seen, settings: RowSampling, steps):
    """The next token of every row under its own settings, and the raw model's log-probabilities of it and
    of its ``TOP_LOGPROBS`` most likely alternatives. Each processor runs only when some row uses it, so an
    all-greedy batch costs an argmax."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, TOP_LOGPROBS)
    s = settings
    sampled = s.sample
    keep = lambda x, _: x
    x = jax.lax.cond(
        jnp.any(s.repetition_penalty != 1),
        repetition_penalty,
        lambda x, *_: x,
        logits,
        seen,
        s.repetition_penalty[:, None],
    )
    x = temperature(x, s.temperature[:, None])
    x = jax.lax.cond(jnp.any(sampled & (s.top_k > 0)), top_k_rows, keep, x, s.top_k)
    x = jax.lax.cond(jnp.any(sampled & (s.top_p < 1)), top_p_rows, keep, x, s.top_p)
    x = jax.lax.cond(jnp.any(sampled & (s.min_p > 0)), min_p, keep, x, s.min_p[:, None])
    greedy = jnp.argmax(x, axis=-1)
    keys = jax.vmap(jax.random.fold_in)(s.key, steps)
    draw = lambda: jnp.where(sampled, _sample(x, keys), greedy)
    token = jax.lax.cond(jnp.any(sampled), draw, lambda: greedy).astype(jnp.int32)
    chosen = jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
    return token, (token, chosen, top_ids.astype(jnp.int32), top_logprobs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Slots:
    """The device state of every slot."""

    cache: KVCache  # index: [slots], the next cache slot of each row
    last: jax.Array  # [slots] the newest token, fed to the next step
    positions: jax.Array  # [slots] position id of ``last``
    seen: jax.Array  # [slots, vocab] tokens in the sequence (repetition penalty)
    steps: jax.Array  # [slots] tokens generated so far (the sampling key's counter)
    settings: RowSampling
    active: jax.Array  # [slots] bool


def _empty_slots(config, count: int, max_len: int, dtype) -> Slots:
    cache = init_cache(config, count, max_len, dtype)
    cache = dataclasses.replace(cache, index=jnp.zeros((count,), jnp.int32))
    zeros = jnp.zeros((count,), jnp.int32)
    neutral = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, sample=False, seed=0)
    return Slots(
        cache=cache,
        last=zeros,
        positions=zeros,
        seen=sharding.constrain(jnp.zeros((count, config.vocab_size), bool), "batch", None),
        steps=zeros,
        settings=RowSampling.of([neutral] * count),
        active=jnp.zeros((count,), bool),
    )


def _admit(graphdefs, arrays, slots: Slots, slot, input_ids, attention_mask, seen, settings: RowSampling, echo):
    """Prefill one left-padded prompt [1, T], shift its cache row so that its n real tokens take slots
    0..n-1, write it into row ``slot``, and choose its first token. If ``echo`` (a traced bool) also compute
    the log-probabilities of the prompt's tokens 1..T-1 and their alternatives (else zeros: the branch is
    skipped, so requests that do not ask pay nothing)."""
    model, periods = build(graphdefs[0], arrays[0], graphdefs[1], arrays[1])
    width = input_ids.shape[1]
    n = attention_mask.sum().astype(jnp.int32)
    max_len = slots.cache.valid.shape[1]
    logits, cache, hidden = prefill(model, periods, input_ids, attention_mask, max_len)
    shift = width - n  # the left padding: roll it out of the way (ring entry r holds slot r mod length)
    put = lambda rows, row: jax.lax.dynamic_update_slice_in_dim(rows, jnp.roll(row, -shift, axis=2), slot, axis=0)
    valid = jax.lax.dynamic_update_slice_in_dim(slots.cache.valid, jnp.roll(cache.valid, -shift, axis=1), slot, 0)
    cache = KVCache(
        keys=tuple(put(rows, row) for rows, row in zip(slots.cache.keys, cache.keys, strict=True)),
        values=tuple(put(rows, row) for rows, row in zip(slots.cache.values, cache.values, strict=True)),
        valid=valid,
        index=slots.cache.index.at[slot].set(n),
    )
    token, out = _choose(logits, seen[None], settings, jnp.zeros((1,), jnp.int32))
    at = lambda rows, value: rows.at[slot].set(value)
    slots = Slots(
        cache=cache,
        last=at(slots.last, token[0]),
        positions=at(slots.positions, n),
        seen=at(slots.seen, seen.at[token[0]].set(True)),
        steps=at(slots.steps, 1),
        settings=jax.tree.map(lambda rows, row: rows.at[slot].set(row[0]), slots.settings, settings),
        active=at(slots.active, True),
    )

    def prompt_logprobs():
        all_logits = model.logits(hidden[:, :-1])[0]
        logprobs = jax.nn.log_softmax(all_logits, axis=-1)
        top_logprobs, top_ids = jax.lax.top_k(logprobs, TOP_LOGPROBS)
        return token_logprobs(all_logits, input_ids[0, 1:]), top_ids.astype(jnp.int32), top_logprobs

    skip = lambda: jax.tree.map(jnp.zeros_like, jax.eval_shape(prompt_logprobs))
    return slots, (*jax.tree.map(lambda x: x[0], out), jax.lax.cond(echo, prompt_logprobs, skip))


def _step(graphdefs, arrays, slots: Slots):
    """One token for every row; rows that are not active keep their state."""
    model, periods = build(graphdefs[0], arrays[0], graphdefs[1], arrays[1])
    logits, cache = model_step(model, periods, slots.last, slots.positions, slots.cache)
    active = slots.active
    cache = dataclasses.replace(cache, index=jnp.where(active, cache.index, slots.cache.index))
    token, out = _choose(logits, slots.seen, slots.settings, slots.steps)
    rows = jnp.arange(token.shape[0])
    slots = dataclasses.replace(
        slots,
        cache=cache,
        last=jnp.where(active, token, slots.last),
        positions=slots.positions + active,
        seen=slots.seen.at[rows, token].set(slots.seen[rows, token] | active),
        steps=slots.steps + active,
    )
    return slots, out


def _release(slots: Slots, free):
    return dataclasses.replace(slots, active=slots.active & ~free)


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
class Request:
    """One sequence to continue. Events (``Token``, then one ``Finished``) go to ``emit``, called from the
    engine's thread. ``prompt_logprobs`` is filled before the first token when the request asked for it."""

    prompt: list[int]
    max_tokens: int
    sampling: dict
    emit: Callable[[object], None]
    echo_logprobs: bool = False
    prompt_logprobs: list | None = None
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: bool = False
    generated: int = 0
    last_token_at: float | None = None
    slot: int | None = None

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
    seed: int | None = None,
    vocab_size: int,
) -> dict:
    """One request's settings, checked as ``generate`` checks them (``SamplingParams.of``): ``temperature`` 0
    is greedy, ``top_k`` 0 (or -1, vLLM's spelling) is off; without a ``seed`` a random one is drawn."""
    if top_k == -1 and not isinstance(top_k, bool):
        top_k = 0
    params = SamplingParams.of(
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        vocab_size=vocab_size,
    )
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
    )


class Engine:
    """Continuous batching over ``max_batch`` slots of ``max_len`` cache positions each.

    ``submit`` queues a request (at most ``max_queue`` wait); a background thread (``start``) admits waiting
    requests into free slots and advances every active slot by one token per step. ``generate`` is a
    blocking convenience. The model may live on a mesh (``from_pretrained(..., mesh=...)``): the slots are
    then split over its batch axes like any batch.
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
    ):
        config = model.config
        validate.integer("max_batch", max_batch, least=1)
        validate.integer("max_queue", max_queue, least=1)
        max_len = config.max_position_embeddings if max_len is None else max_len
        validate.integer("max_len", max_len, least=2)
        if max_len > config.max_position_embeddings:
            raise ValueError(
                f"max_len {max_len} exceeds the model's max_position_embeddings ({config.max_position_embeddings})"
            )
        self.model, self.max_batch, self.max_len, self.max_queue = model, max_batch, max_len, max_queue
        self.eos_token_id = config.eos_token_id if eos_token_id == -1 else eos_token_id
        self.metrics = metrics
        self.mesh = sharding.model_mesh(model)
        weights = Weights.of(model)
        self._graphdefs = (weights.graphdef, weights.period_graphdef)
        self._arrays = (weights.params, weights.periods)
        self.buckets = sorted({min(bucket(n), max_len) for n in range(1, max_len)})
        with sharding.use_mesh(self.mesh):
            self._slots = jax.jit(_empty_slots, static_argnums=(0, 1, 2, 3))(config, max_batch, max_len, model.dtype)
        self._programs: dict = {}
        self._requests: list[Request | None] = [None] * max_batch
        self._waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self.accepting = True
        self.error: Exception | None = None  # set if the loop failed; the engine then takes no requests

    # ---- compiled programs -------------------------------------------------------------------------------
    def _replicated(self, array):
        """A small input on every device of the mesh (or on the default device)."""
        array = array if isinstance(array, jax.Array) else jnp.asarray(array)
        return array if self.mesh is None else jax.device_put(array, NamedSharding(self.mesh, PartitionSpec()))

    def _admit_inputs(self, slot: int, prompt: list[int], sampling: dict, echo: bool):
        width = min(bucket(len(prompt)), self.max_len)
        ids = np.zeros((1, width), np.int32)
        mask = np.zeros((1, width), np.int32)
        ids[0, width - len(prompt) :], mask[0, width - len(prompt) :] = prompt, 1
        seen = np.zeros((self.model.config.vocab_size,), bool)
        if sampling["repetition_penalty"] != 1.0:
            seen[prompt] = True
        return (
            self._replicated(np.int32(slot)),
            self._replicated(ids),
            self._replicated(mask),
            self._replicated(seen),
            jax.tree.map(self._replicated, RowSampling.of([sampling])),
            self._replicated(np.bool_(echo)),
        )

    def _program(self, name: str, width: int = 0):
        """The compiled program ``name`` ("step", "release", or "admit" for a prompt bucket), compiled ahead
        of time on first use."""
        key = (name, width)
        if key not in self._programs:
            with sharding.use_mesh(self.mesh):
                if name == "step":
                    fn, args = partial(_step, self._graphdefs), (self._arrays, self._slots)
                elif name == "release":
                    fn, args = _release, (self._slots, self._replicated(np.zeros(self.max_batch, bool)))
                else:
                    fn = partial(_admit, self._graphdefs)
                    sampling = sampling_settings(seed=0, vocab_size=self.model.config.vocab_size)
                    args = (self._arrays, self._slots, *self._admit_inputs(0, [0] * width, sampling, False))
                donate, out_shardings = (0 if name == "release" else 1), None
                if self.mesh is not None:  # the slots keep their layout from step to step
                    layout = jax.tree.map(lambda x: x.sharding, self._slots)
                    out_shardings = layout if name == "release" else (layout, NamedSharding(self.mesh, PartitionSpec()))
                jitted = jax.jit(fn, donate_argnums=donate, out_shardings=out_shardings)
                self._programs[key] = jitted.lower(*args).compile()
        return self._programs[key]

    def warm_up(self, progress: Callable[[str], None] | None = None) -> float:
        """Compile the step and one prefill per prompt bucket, two at a time (XLA compiles outside the GIL);
        return the seconds it took."""
        start = time.perf_counter()
        names = [("step", 0), ("release", 0)] + [("admit", w) for w in reversed(self.buckets)]
        done = 0

        def compile_one(name_width):
            nonlocal done
            self._program(*name_width)
            done += 1
            if progress:
                name, width = name_width
                progress(f"compiled {name}{f' {width}' if width else ''} ({done}/{len(names)})")

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(compile_one, names))
        return time.perf_counter() - start

    # ---- requests ----------------------------------------------------------------------------------------
    def check(self, prompt: list[int], max_tokens: int) -> None:
        """Raise ValueError if the request cannot be served: bad token ids, or more tokens than a slot holds."""
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if not all(isinstance(t, int | np.integer) and not isinstance(t, bool) for t in prompt):
            raise ValueError("prompt token ids must be integers")
        vocab = self.model.config.vocab_size
        if bad := [t for t in prompt if not 0 <= t < vocab]:  # in Python: 10**30 overflows any array dtype
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {bad[0]}")
        validate.integer("max_tokens", max_tokens, least=1)
        if len(prompt) + max_tokens > self.max_len:
            raise ValueError(
                f"this server's maximum context length is {self.max_len} tokens, but {len(prompt) + max_tokens} "
                f"were requested ({len(prompt)} in the prompt, {max_tokens} for the completion); "
                "shorten the prompt or ask for fewer tokens"
            )

    def submit(self, request: Request) -> Request:
        """Queue ``request`` (checked first); raises QueueFull or EngineStopped when it cannot wait."""
        self.check(request.prompt, request.max_tokens)
        with self._lock:
            if not self.accepting:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (max_queue {self.max_queue})")
            self._waiting.append(request)
            self._lock.notify()
        self._observe()
        return request

    def generate(self, prompt: list[int], max_tokens: int, **sampling) -> tuple[list[int], str]:
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
        self.submit(Request(list(prompt), max_tokens, settings, emit))
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

    def _finish(self, request: Request, reason: str) -> None:
        if request.slot is not None:
            self._requests[request.slot] = None
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
        if token == self.eos_token_id:
            self._finish(request, "stop")
            return True
        request.emit(Token(int(token), float(logprob), list(zip(top_ids.tolist(), top_logprobs.tolist(), strict=True))))
        if request.generated >= request.max_tokens:
            self._finish(request, "length")
            return True
        return False

    def _admit_waiting(self) -> None:
        """Prefill waiting requests into free slots."""
        while True:
            with self._lock:
                free = [i for i, r in enumerate(self._requests) if r is None]
                if not free or not self._waiting:
                    return
                request = self._waiting.popleft()
            if request.cancelled:
                self._finish(request, "cancelled")
                continue
            slot = free[0]
            request.slot, self._requests[slot] = slot, request
            if self.metrics:
                self.metrics.prompt_tokens.inc(len(request.prompt))
            program = self._program("admit", min(bucket(len(request.prompt)), self.max_len))
            inputs = self._admit_inputs(slot, request.prompt, request.sampling, request.echo_logprobs)
            self._slots, out = program(self._arrays, self._slots, *inputs)
            out = jax.device_get(out)
            if request.echo_logprobs:  # the prompt's tokens 1..n-1 are the last n-1 of the bucket
                chosen, top_ids, top_logprobs = (x[x.shape[0] - (len(request.prompt) - 1) :] for x in out[4])
                request.prompt_logprobs = list(
                    zip(chosen.tolist(), top_ids.tolist(), top_logprobs.tolist(), strict=True)
                )
            if self._deliver(request, *(np.asarray(x) for x in out[:4]), now=time.perf_counter()):
                self._release([slot])  # done at once: free the row before another request takes the slot
            self._observe()

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
                cancelled = [(i, r) for i, r in enumerate(self._requests) if r is not None and r.cancelled]
                for _, request in cancelled:
                    self._finish(request, "cancelled")
                self._release([i for i, _ in cancelled])
                self._admit_waiting()
                if self.active == 0:
                    continue
                self._slots, out = self._program("step")(self._arrays, self._slots)
                tokens, logprobs, top_ids, top_logprobs = jax.device_get(out)
                now = time.perf_counter()
                freed = []
                for slot, request in enumerate(list(self._requests)):
                    if request is None:
                        continue
                    if request.cancelled:
                        self._finish(request, "cancelled")
                        freed.append(slot)
                    elif self._deliver(request, tokens[slot], logprobs[slot], top_ids[slot], top_logprobs[slot], now):
                        freed.append(slot)
                self._release(freed)
        except Exception as error:  # a failed program: every request learns it, nothing hangs
            log.exception("engine loop failed")
            with self._lock:
                self.accepting = False
                pending = [*self._waiting, *(r for r in self._requests if r)]
                self._waiting.clear()
            for request in pending:
                request.emit(Finished("error", request.generated))
            self.error = error
