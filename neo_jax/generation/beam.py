"""Beam search, vectorised as transformers' ``_beam_search``: the beams of every row advance together in one
jitted loop over the same KV cache and decode step as sampling."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from neo_jax import sharding, validate
from neo_jax.generation.cache import KVCache, cache_bucket, decode_step, prefill
from neo_jax.generation.programs import Weights, build, prepare, to_host
from neo_jax.model import GPTNeo


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BeamState:
    """transformers' vectorised beam search state: ``running_*`` are the live beams, the others the best
    finished hypotheses, per batch row ([batch, beams, ...])."""

    cache: KVCache
    logits: jax.Array  # [batch * beams, vocab] for the step about to be taken
    positions: jax.Array  # [batch * beams]
    running_sequences: jax.Array  # [batch, beams, new]
    running_scores: jax.Array  # [batch, beams]
    sequences: jax.Array
    scores: jax.Array
    finished: jax.Array  # [batch, beams]
    improvable: jax.Array  # [batch, 1]: the early-stop heuristic is not yet satisfied
    all_hit_stop: jax.Array  # every candidate of the last step hit EOS or the length limit
    step: jax.Array


def _gather_beams(x, indices):
    """x [batch, n, ...], indices [batch, k] -> [batch, k, ...]."""
    return jnp.take_along_axis(x, indices.reshape(*indices.shape, *([1] * (x.ndim - 2))), axis=1)


def _beam_step(state: BeamState, *, num_beams, max_new, eos, length_penalty, early_stopping) -> tuple:
    """One selection step of transformers' ``_beam_search``; returns the new state and the flat indices of
    the batch*beams rows the next step continues from (to reorder the cache)."""
    batch = state.running_scores.shape[0]
    vocab = state.logits.shape[-1]
    keep = 2 * num_beams
    log_probs = jax.nn.log_softmax(state.logits.astype(jnp.float32), axis=-1).reshape(batch, num_beams, vocab)
    log_probs = (log_probs + state.running_scores[:, :, None]).reshape(batch, num_beams * vocab)
    top_scores, top_indices = jax.lax.top_k(log_probs, keep)
    origin, tokens = top_indices // vocab, (top_indices % vocab).astype(jnp.int32)
    top_sequences = _gather_beams(state.running_sequences, origin)
    top_sequences = jax.lax.dynamic_update_slice(top_sequences, tokens[:, :, None], (0, 0, state.step))
    hit_stop = (tokens == eos) | (state.step + 1 >= max_new)

    # The live beams: the best candidates that did not just stop.
    running_scores = top_scores + hit_stop * -1.0e9
    live = jax.lax.top_k(running_scores, num_beams)[1]
    running_sequences = _gather_beams(top_sequences, live)
    running_scores = _gather_beams(running_scores, live)
    rows = (_gather_beams(origin, live) + jnp.arange(batch)[:, None] * num_beams).reshape(-1)

    # The finished hypotheses: merge in the candidates among the top `num_beams` that just stopped.
    just_finished = hit_stop & (jnp.arange(keep) < num_beams)[None]
    length = (state.step + 1).astype(jnp.float32)
    final = top_scores / length**length_penalty
    full = jnp.all(state.finished, axis=-1, keepdims=True) & (early_stopping is True)
    final = final + full * -1.0e9 + (~state.improvable) * -1.0e9 + (~just_finished) * -1.0e9
    merged_scores = jnp.concatenate([state.scores, final], axis=1)
    best = jax.lax.top_k(merged_scores, num_beams)[1]
    sequences = _gather_beams(jnp.concatenate([state.sequences, top_sequences], axis=1), best)
    scores = _gather_beams(merged_scores, best)
    finished = _gather_beams(jnp.concatenate([state.finished, just_finished], axis=1), best)

    # Could a live beam still beat the worst finished one?
    step = state.step + 1
    if early_stopping == "never" and length_penalty > 0.0:
        best_length = jnp.float32(max_new)
    else:
        best_length = step.astype(jnp.float32)
    best_possible = running_scores[:, :1] / best_length**length_penalty
    worst_finished = jnp.where(finished, scores.min(axis=1, keepdims=True), -1.0e9)
    improvable = state.improvable & jnp.any(best_possible > worst_finished, axis=-1, keepdims=True)
    state = dataclasses.replace(
        state,
        running_sequences=running_sequences,
        running_scores=running_scores,
        sequences=sequences,
        scores=scores,
        finished=finished,
        improvable=improvable,
        all_hit_stop=jnp.all(hit_stop),
        step=step,
    )
    return state, rows, running_sequences[:, :, state.step - 1].reshape(-1)


@partial(
    jax.jit,
    static_argnames=("graphdefs", "num_beams", "max_len", "max_new", "length_penalty", "early_stopping"),
)
def _beam_search(
    graphdefs,
    arrays,
    input_ids,
    attention_mask,
    eos,
    pad,
    *,
    num_beams,
    max_len,
    max_new,
    length_penalty,
    early_stopping,
):
    model, periods = build(graphdefs[0], arrays[0], graphdefs[1], arrays[1])
    batch = input_ids.shape[0] // num_beams
    logits, cache, _ = prefill(model, periods, input_ids, attention_mask, max_len)
    empty = jnp.full((batch, num_beams, max_new), pad, jnp.int32)
    state = BeamState(
        cache=cache,
        logits=logits,
        positions=attention_mask.sum(axis=1).astype(jnp.int32),
        running_sequences=empty,
        running_scores=jnp.zeros((batch, num_beams)).at[:, 1:].set(-1.0e9),
        sequences=empty,
        scores=jnp.full((batch, num_beams), -1.0e9),
        finished=jnp.zeros((batch, num_beams), bool),
        improvable=jnp.ones((batch, 1), bool),
        all_hit_stop=jnp.bool_(False),
        step=jnp.int32(0),
    )

    def cond(carry):
        state, _ = carry
        open_beam = ~(jnp.all(state.finished) & (early_stopping is True))
        return jnp.any(state.improvable) & open_beam & ~state.all_hit_stop

    def body(carry):
        state, arrays = carry
        model, periods = build(graphdefs[0], arrays[0], graphdefs[1], arrays[1])
        state, rows, tokens = _beam_step(
            state,
            num_beams=num_beams,
            max_new=max_new,
            eos=eos,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
        )
        reorder = lambda x: jnp.take(x, rows, axis=0)
        cache = dataclasses.replace(
            state.cache, keys=tuple(map(reorder, state.cache.keys)), values=tuple(map(reorder, state.cache.values))
        )
        logits, cache = decode_step(model, periods, tokens, state.positions, cache)
        return dataclasses.replace(state, cache=cache, logits=logits, positions=state.positions + 1), arrays

    state, _ = jax.lax.while_loop(cond, body, (state, arrays))
    return state.sequences[:, 0]


def beam_search(
    model: GPTNeo,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> np.ndarray:
    """transformers' beam search (``num_return_sequences=1``): the new tokens ``[batch, max_new_tokens]`` of
    the best hypothesis per row. ``early_stopping``: True stops a row once ``num_beams`` hypotheses are
    finished; False (default) and "never" use transformers' heuristics for whether a live beam can still win."""
    validate.real("length_penalty", length_penalty)
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    request = prepare(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id)
    if max_new_tokens == 0:
        return np.zeros((request.input_ids.shape[0], 0), np.int32)
    graphdefs, arrays = Weights.of(model).split()
    with sharding.use_mesh(sharding.model_mesh(model)):
        new = _beam_search(
            graphdefs,
            arrays,
            jnp.asarray(np.repeat(request.input_ids, num_beams, axis=0)),
            jnp.asarray(np.repeat(request.attention_mask, num_beams, axis=0)),
            jnp.int32(request.eos),
            jnp.int32(request.pad),
            num_beams=num_beams,
            max_len=cache_bucket(request.input_ids.shape[1] + max_new_tokens),
            max_new=max_new_tokens,
            length_penalty=float(length_penalty),
            early_stopping=early_stopping,
        )
    return to_host(new)
