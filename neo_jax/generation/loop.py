"""``stream`` and ``generate``: a validated, bucketed request is prefilled once, then one jitted
``lax.while_loop`` of single-token decode steps runs until every row has finished. On the CPU the decode
reads per-layer weight copies (``Weights``)."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neo_jax import sharding, validate
from neo_jax.generation.cache import KVCache, cache_bucket, decode_step, prefill
from neo_jax.generation.sampling import SamplingParams, check_beams, seed_key
from neo_jax.model import GPTNeo
from neo_jax.shapes import bucket


@dataclasses.dataclass(frozen=True)
class Weights:
    """The model split for generation programs: its graph and parameters, plus the blocks as one module per
    period (``periods``) so that generation runs layer by layer with a static index.

    On the CPU the per-period weights are separate buffers: XLA:CPU copies any slice of a stacked weight
    inside a program, which would double a decode step's memory traffic. They are made once per model
    (one more copy of the block weights, kept while the model lives) and made again if its parameters are
    replaced. On accelerators slicing inside the program is free, so ``periods`` is None and the slices
    are taken there.
    """

    graphdef: nnx.GraphDef
    params: nnx.State
    period_graphdef: nnx.GraphDef
    periods: list | None

    @classmethod
    def of(cls, model: GPTNeo) -> Weights:
        graphdef, params = nnx.split(model)
        period_graphdef, stacked = nnx.split(model.periods)
        periods = None
        if jax.default_backend() == "cpu":
            leaves = jax.tree.leaves(stacked)
            cached = _UNSTACKED.get(model)
            if cached is None or any(a is not b for a, b in zip(cached[0], leaves, strict=True)):
                cached = _UNSTACKED[model] = (leaves, _unstack_copy(stacked, model.config.num_periods))
            periods = cached[1]
        return cls(graphdef, params, period_graphdef, periods)


_UNSTACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _unstack(stacked, n: int) -> list:
    return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n)]


_unstack_copy = jax.jit(_unstack, static_argnums=1)  # one dispatch instead of one per tensor


def _build(graphdef, params, period_graphdef, periods):
    """Inside a program: the model and its list of per-period block modules."""
    model = nnx.merge(graphdef, params)
    if periods is None:
        periods = _unstack(nnx.state(model.periods), model.config.num_periods)
    return model, [nnx.merge(period_graphdef, state) for state in periods]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoopState:
    cache: KVCache
    tokens: jax.Array  # [batch, new] generated tokens (pad after a row finishes)
    last: jax.Array  # [batch] the newest token, fed to the next step
    positions: jax.Array  # [batch] position of ``last``
    finished: jax.Array  # [batch]
    seen: jax.Array  # [batch, vocab] tokens in the sequence (repetition penalty), else [batch, 1]
    step: jax.Array  # number of tokens generated so far
    key: jax.Array


def _emit(state: LoopState, logits, params: SamplingParams, eos, pad) -> LoopState:
    """Pick the next token of every row from ``logits`` and record it."""
    token = params.choose(params.process(logits, state.seen), jax.random.fold_in(state.key, state.step))
    token = jnp.where(state.finished, pad, token)
    seen = state.seen.at[jnp.arange(token.shape[0]), token].set(True) if params.use_repetition_penalty else state.seen
    return dataclasses.replace(
        state,
        tokens=jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step)),
        last=token,
        finished=state.finished | (token == eos),
        seen=seen,
        step=state.step + 1,
    )


@partial(jax.jit, static_argnames=("graphdefs", "max_len", "max_new"))
def _start(
    graphdefs, arrays, input_ids, attention_mask, seen, params: SamplingParams, key, eos, pad, *, max_len, max_new
):
    """Prefill and pick the first new token."""
    model, periods = _build(graphdefs[0], arrays[0], graphdefs[1], arrays[1])
    batch = input_ids.shape[0]
    logits, cache = prefill(model, periods, input_ids, attention_mask, max_len)
    state = LoopState(
        cache=cache,
        tokens=jnp.full((batch, max_new), pad, jnp.int32),
        last=jnp.zeros((batch,), jnp.int32),
        positions=attention_mask.sum(axis=1).astype(jnp.int32),  # where the first new token goes
        finished=jnp.zeros((batch,), bool),
        seen=seen,
        step=jnp.int32(0),
        key=key,
    )
    return _emit(state, logits, params, eos, pad)


@partial(jax.jit, static_argnames=("graphdefs",), donate_argnames=("state",))
def _continue(graphdefs, arrays, state: LoopState, stop, params: SamplingParams, eos, pad):
    """Decode until ``stop`` tokens exist or every row has finished."""

    def cond(carry):
        state, _ = carry
        return (state.step < stop) & ~jnp.all(state.finished)

    def body(carry):
        # The weights ride in the carry: NNX wants modules built at the trace level that uses them.
        state, arrays = carry
        model, periods = _build(graphdefs[0], arrays[0], graphdefs[1], arrays[1])
        logits, cache = decode_step(model, periods, state.last, state.positions, state.cache)
        state = _emit(dataclasses.replace(state, cache=cache), logits, params, eos, pad)
        return dataclasses.replace(state, positions=state.positions + 1), arrays

    return jax.lax.while_loop(cond, body, (state, arrays))[0]


def compiled_programs() -> dict[str, int]:
    """How many variants of the prefill and of the decode loop this process has compiled: an inspection hook
    for tests and benchmarks that check that nearby shapes share one program."""
    return {"prefill": _start._cache_size(), "decode": _continue._cache_size()}


def _to_host(array) -> np.ndarray:
    """A result on the host; in a multi-host run, rows other hosts hold are gathered first."""
    if array.is_fully_addressable or array.is_fully_replicated:
        return np.asarray(array)
    from neo_jax.distributed import gather

    return np.asarray(gather(array))


@dataclasses.dataclass
class _Request:
    """A validated, bucketed generation request."""

    input_ids: np.ndarray  # [batch, bucketed prompt] left-padded
    attention_mask: np.ndarray
    eos: int  # -1: never stop early
    pad: int


def _prepare(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id) -> _Request:
    input_ids = np.asarray(input_ids)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.ndim != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"the prompt is empty or not [batch, seq]: input_ids has shape {input_ids.shape}")
    input_ids = validate.token_ids(input_ids, model.config.vocab_size)
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    mask = validate.attention_mask(mask[None] if mask.ndim == 1 else mask, input_ids.shape)
    max_new_tokens = validate.integer("max_new_tokens", max_new_tokens, least=0)
    for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if value is not None:
            validate.integer(name, value)
    limit = model.config.max_position_embeddings
    if input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
            f"max_position_embeddings ({limit}); shorten the prompt or ask for fewer tokens"
        )
    pad = _pad_id(eos_token_id, pad_token_id)
    eos = -1 if eos_token_id is None else eos_token_id
    width = bucket(input_ids.shape[1])
    left = width - input_ids.shape[1]
    return _Request(
        input_ids=np.pad(input_ids, ((0, 0), (left, 0)), constant_values=pad).astype(np.int32),
        attention_mask=np.pad(mask, ((0, 0), (left, 0))).astype(np.int32),
        eos=eos,
        pad=pad,
    )


def stream(
    model: GPTNeo,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
    **sampling,
) -> Iterator[np.ndarray]:
    """Yield the new tokens ``[batch, n]`` chunk by chunk (``chunk_size`` tokens, or all at once).

    Stops early once every row has emitted EOS. Arguments as in ``generate`` (no beam search).
    """
    params = SamplingParams.of(**sampling, vocab_size=model.config.vocab_size)
    key = seed_key(seed)
    if chunk_size is not None:
        validate.integer("chunk_size", chunk_size, least=1)
    request = _prepare(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id)
    if max_new_tokens == 0:
        return
    vocab = model.config.vocab_size
    if params.use_repetition_penalty:  # as transformers: every id in the caller's input_ids, padding included
        caller_ids = np.asarray(input_ids).reshape(request.input_ids.shape[0], -1)
        seen = np.zeros((caller_ids.shape[0], vocab), bool)
        seen[np.arange(caller_ids.shape[0])[:, None], caller_ids] = True
    else:
        seen = np.zeros((request.input_ids.shape[0], 1), bool)
    weights = Weights.of(model)
    graphdefs, arrays = (weights.graphdef, weights.period_graphdef), (weights.params, weights.periods)
    max_len = cache_bucket(request.input_ids.shape[1] + max_new_tokens)
    eos, pad = jnp.int32(request.eos), jnp.int32(request.pad)
    mesh = sharding.model_mesh(model)
    with sharding.use_mesh(mesh):
        state = _start(
            graphdefs,
            arrays,
            jnp.asarray(request.input_ids),
            jnp.asarray(request.attention_mask),
            jnp.asarray(seen),
            params,
            key,
            eos,
            pad,
            max_len=max_len,
            max_new=cache_bucket(max_new_tokens),
        )
    yield _to_host(state.tokens[:, :1])  # right after prefill: time to first token
    done = 1
    chunk = chunk_size or max_new_tokens
    while done < max_new_tokens and not bool(state.finished.all()):
        stop = min(done + chunk, max_new_tokens)
        with sharding.use_mesh(mesh):
            state = _continue(graphdefs, arrays, state, jnp.int32(stop), params, eos, pad)
        step = int(state.step)
        yield _to_host(state.tokens[:, done:step])
        done = step


def generate(
    model: GPTNeo,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
    **sampling,
) -> np.ndarray:
    """Continue ``input_ids`` ([batch, seq], left-padded with ``attention_mask`` when rows differ in length).

    Returns ``[batch, seq + max_new_tokens]``: the prompt, then the new tokens; after a row emits
    ``eos_token_id`` the rest of it is ``pad_token_id`` (default: the EOS id). ``eos_token_id=None`` never
    stops early. Greedy by default; ``sampling`` takes transformers' keywords (``do_sample``, ``temperature``,
    ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``: ``SamplingParams.of``); ``num_beams > 1`` is
    beam search with ``length_penalty`` and ``early_stopping`` as in transformers. The same ``seed`` gives
    the same samples.
    """
    check_beams(SamplingParams.of(**sampling), num_beams)
    prompt = np.asarray(input_ids)
    prompt = prompt[None] if prompt.ndim == 1 else prompt
    if num_beams > 1:
        from neo_jax.generation.beam import beam_search  # beam search builds on this module

        new = beam_search(
            model,
            prompt,
            attention_mask,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
    else:
        chunks = list(
            stream(
                model,
                prompt,
                attention_mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                seed=seed,
                **sampling,
            )
        )
        new = np.concatenate(chunks, axis=1) if chunks else np.zeros((prompt.shape[0], 0), np.int32)
    pad = _pad_id(eos_token_id, pad_token_id)
    filled = np.full((prompt.shape[0], max_new_tokens), pad, np.int64)
    filled[:, : new.shape[1]] = new
    return np.concatenate([prompt.astype(np.int64), filled], axis=1)


def _pad_id(eos_token_id, pad_token_id) -> int:
    return pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
