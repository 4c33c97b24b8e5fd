"""``stream`` and ``generate``: a validated, bucketed request is prefilled once, then one jitted
``lax.while_loop`` of single-token decode steps runs until every row has finished. On the CPU the decode
reads per-layer weight copies (``Weights``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from neo_jax import sharding, validate
from neo_jax.generation.beam import beam_search
from neo_jax.generation.cache import KVCache, cache_bucket, decode_step, prefill
from neo_jax.generation.programs import Weights, build, pad_id, prepare, to_host
from neo_jax.generation.sampling import SamplingParams, check_beams, seed_key
from neo_jax.generation.speculative import check_draft, speculative_stream
from neo_jax.model import GPTNeo


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoopState:
    cache: KVCache
    tokens: jax.Array  # [batch, new] generated tokens (pad after a row finishes)
    last: jax.Array  # [batch] the newest token, fed to the next step
    positions: jax.Array  # [batch] position of ``last``
    finished: jax.Array  # [batch]
    seen: jax.Array  # [batch, vocab] tokens in the sequence (repetition penalty), else [batch, 1]
    prompt_tail: jax.Array  # [batch, params.history] the prompt's last tokens (banned sequences)
    step: jax.Array  # number of tokens generated so far
    key: jax.Array


def _emit(state: LoopState, logits, params: SamplingParams, eos, pad) -> LoopState:
    """Pick the next token of every row from ``logits`` and record it."""
    # a row's latest ``params.history`` tokens: the prompt's tail, then what was generated
    history = jax.lax.dynamic_slice_in_dim(
        jnp.concatenate([state.prompt_tail, state.tokens], axis=1), state.step, params.history, axis=1
    )
    logits = params.process(logits, state.seen, state.step, history, eos)
    token = params.choose(logits, jax.random.fold_in(state.key, state.step))
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
    graphdefs,
    arrays,
    input_ids,
    attention_mask,
    seen,
    prompt_tail,
    params: SamplingParams,
    key,
    eos,
    pad,
    *,
    max_len,
    max_new,
):
    """Prefill and pick the first new token."""
    model, periods = build(graphdefs[0], arrays[0], graphdefs[1], arrays[1])
    batch = input_ids.shape[0]
    logits, cache, _ = prefill(model, periods, input_ids, attention_mask, max_len)
    state = LoopState(
        cache=cache,
        tokens=jnp.full((batch, max_new), pad, jnp.int32),
        last=jnp.zeros((batch,), jnp.int32),
        positions=attention_mask.sum(axis=1).astype(jnp.int32),  # where the first new token goes
        finished=jnp.zeros((batch,), bool),
        seen=seen,
        prompt_tail=prompt_tail,
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
        model, periods = build(graphdefs[0], arrays[0], graphdefs[1], arrays[1])
        logits, cache = decode_step(model, periods, state.last, state.positions, state.cache)
        state = _emit(dataclasses.replace(state, cache=cache), logits, params, eos, pad)
        return dataclasses.replace(state, positions=state.positions + 1), arrays

    return jax.lax.while_loop(cond, body, (state, arrays))[0]


def compiled_programs() -> dict[str, int]:
    """How many variants of the prefill and of the decode loop this process has compiled: an inspection hook
    for tests and benchmarks that check that nearby shapes share one program."""
    programs: dict[str, Any] = {"prefill": _start, "decode": _continue}  # jax's jitted functions count their variants
    return {name: jitted._cache_size() for name, jitted in programs.items()}


def _params(model: GPTNeo, sampling: dict, prompt_length: int, eos_token_id) -> SamplingParams:
    return SamplingParams.of(
        **sampling, vocab_size=model.config.vocab_size, prompt_length=prompt_length, eos_token_id=eos_token_id
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
    draft=None,
    num_draft_tokens: int = 4,
    statistics: dict | None = None,
    **sampling,
) -> Iterator[np.ndarray]:
    """Yield the new tokens ``[batch, n]`` chunk by chunk (``chunk_size`` tokens, or all at once).

    Stops early once every row has emitted EOS. Arguments as in ``generate`` (no beam search); with a
    ``draft``, ``statistics`` (a dict) is filled in with its counts (``speculative.speculative_stream``).
    """
    width = np.shape(input_ids)[-1] if np.ndim(input_ids) else 0
    params = _params(model, sampling, width, eos_token_id)
    key = seed_key(seed)
    if chunk_size is not None:
        validate.integer("chunk_size", chunk_size, least=1)
    checked_draft = None if draft is None else check_draft(model, draft, num_draft_tokens)
    request = prepare(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id)
    if max_new_tokens == 0:
        return
    vocab = model.config.vocab_size
    caller_ids = np.asarray(input_ids).reshape(request.input_ids.shape[0], -1)
    if (
        checked_draft is not None
        and caller_ids.shape[1] + max_new_tokens > checked_draft.config.max_position_embeddings
    ):
        raise ValueError(
            f"prompt length {caller_ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds the draft's "
            f"max_position_embeddings ({checked_draft.config.max_position_embeddings}); ask for fewer tokens"
        )
    if params.use_repetition_penalty:  # as transformers: every id in the caller's input_ids, padding included
        seen = np.zeros((caller_ids.shape[0], vocab), bool)
        seen[np.arange(caller_ids.shape[0])[:, None], caller_ids] = True
    else:
        seen = np.zeros((request.input_ids.shape[0], 1), bool)
    if draft is not None:
        yield from speculative_stream(
            model,
            checked_draft,
            request,
            caller_ids,
            seen,
            params,
            key,
            max_new_tokens=max_new_tokens,
            num_draft_tokens=num_draft_tokens,
            chunk_size=chunk_size,
            statistics=statistics,
        )
        return
    prompt_tail = np.full((caller_ids.shape[0], params.history), -2, np.int32)  # -2: before the prompt, no token
    if params.history:
        tail = caller_ids[:, -params.history :]
        prompt_tail[:, params.history - tail.shape[1] :] = tail
    graphdefs, arrays = Weights.of(model).split()
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
            jnp.asarray(prompt_tail),
            params,
            key,
            eos,
            pad,
            max_len=max_len,
            max_new=cache_bucket(max_new_tokens),
        )
    yield to_host(state.tokens[:, :1])  # right after prefill: time to first token
    done = 1
    chunk = chunk_size or max_new_tokens
    while done < max_new_tokens and not bool(state.finished.all()):
        stop = min(done + chunk, max_new_tokens)
        with sharding.use_mesh(mesh):
            state = _continue(graphdefs, arrays, state, jnp.int32(stop), params, eos, pad)
        step = int(state.step)
        yield to_host(state.tokens[:, done:step])
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
    draft=None,
    num_draft_tokens: int = 4,
    statistics: dict | None = None,
    **sampling,
) -> np.ndarray:
    """Continue ``input_ids`` ([batch, seq], left-padded with ``attention_mask`` when rows differ in length).

    Returns ``[batch, seq + max_new_tokens]``: the prompt, then the new tokens; after a row emits
    ``eos_token_id`` the rest of it is ``pad_token_id`` (default: the EOS id). ``eos_token_id=None`` never
    stops early. Greedy by default; ``sampling`` takes transformers' keywords (``do_sample``, ``temperature``,
    ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``, ``min_length``, ``min_new_tokens``,
    ``bad_words_ids``) and OpenAI's ``logit_bias`` (``SamplingParams.of``); ``num_beams > 1`` is
    beam search with ``length_penalty`` and ``early_stopping`` as in transformers. The same ``seed`` gives
    the same samples.

    ``draft``: speculative decoding (``neo_jax.generation.speculative``), with a smaller GPT-Neo of the same
    vocabulary or ``"ngram"`` (prompt lookup) proposing ``num_draft_tokens`` tokens a round. The output
    follows the same law (greedy: the same tokens), though not the same samples for a seed. ``statistics``
    (a dict) receives its counts: ``draft_tokens``, ``accepted_tokens``, ``rounds`` and ``tokens``.
    """
    width = np.shape(input_ids)[-1] if np.ndim(input_ids) else 0
    check_beams(_params(model, sampling, width, eos_token_id), num_beams)
    if draft is not None and num_beams > 1:
        raise ValueError("a draft speeds up sampling and greedy decoding, not beam search: use num_beams=1")
    prompt = np.asarray(input_ids)
    prompt = prompt[None] if prompt.ndim == 1 else prompt
    if num_beams > 1:
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
                draft=draft,
                num_draft_tokens=num_draft_tokens,
                statistics=statistics,
                **sampling,
            )
        )
        new = np.concatenate(chunks, axis=1) if chunks else np.zeros((prompt.shape[0], 0), np.int32)
    pad = pad_id(eos_token_id, pad_token_id)
    filled = np.full((prompt.shape[0], max_new_tokens), pad, np.int64)
    filled[:, : new.shape[1]] = new
    return np.concatenate([prompt.astype(np.int64), filled], axis=1)
