"""Speculative decoding: a draft proposes ``k`` tokens per row, the target scores all of them in one forward
pass (``cache.extend``), and each row keeps the longest run its rule accepts, plus one token of the target's
own: ``n + 1`` tokens per round for ``n`` accepted.

The rule is the modified rejection sampling of Leviathan et al. (2023) and Chen et al. (2023): draft token
``x`` drawn from the draft's law ``q`` is accepted with probability ``min(1, p(x) / q(x))``, where ``p`` is
the target's; at the first rejection the row's token is drawn from ``max(0, p - q)``, renormalised, and
after ``k`` acceptances from ``p``. Every token then follows the target's law exactly. ``p`` and ``q`` are
the laws after the same logit processors (temperature, top-k, top-p, min-p, repetition penalty, ...), each
at its own position. Greedy decoding accepts ``x`` when it is the target's most likely token, so its output
is token-identical to plain greedy decoding.

Drafts: a smaller GPT-Neo with the same vocabulary (it keeps a KV cache of its own and runs ``k + 1``
single-token steps per round, the last one to write its last proposal), or ``"ngram"``, prompt lookup: the
latest earlier occurrence of the sequence's last ``n`` tokens (``n`` = 3, 2, 1, the longest found), and the
``k`` tokens that followed it. An n-gram proposal is certain (``q`` is one token), so it is accepted with
probability ``p(x)``.

Rows move at their own pace: every row has its own cache index, and a local layer's ring holds ``window + k +
1`` slots, so that tokens written for a round and then rejected overwrite nothing a later query sees.

The server (``serve_round``, ``catch_up``) speculates for its slots with another acceptance rule, one that
keeps a plain step's tokens exactly: see ``serve_round``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from functools import partial
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np

from neo_jax import sharding, validate
from neo_jax.generation.cache import KVCache, cache_bucket, decode_step, extend, prefill
from neo_jax.generation.programs import Request, Weights, build, to_host
from neo_jax.generation.sampling import SamplingParams

NGRAM = "ngram"
NGRAM_SIZES = (3, 2, 1)  # the lengths prompt lookup tries to match, longest first
BEFORE = -2  # a sequence entry before the caller's prompt (bucket padding): matches no token


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SpecState:
    cache: KVCache  # the target's; ``index`` [batch]: the slot of ``last``, which is not in it yet
    draft_cache: KVCache | None  # the draft model's, in step with the target's (None: n-gram)
    sequence: jax.Array  # [batch, room] the prompt (BEFORE its bucket padding), then the tokens generated
    length: jax.Array  # [batch] entries of ``sequence`` filled: ``last`` is at length - 1
    positions: jax.Array  # [batch] position id of ``last``
    finished: jax.Array  # [batch]
    seen: jax.Array  # [batch, vocab] tokens in the sequence (repetition penalty), else [batch, 1]
    key: jax.Array
    rounds: jax.Array  # verification passes so far
    drafted: jax.Array  # [batch] draft tokens proposed to the target
    accepted: jax.Array  # [batch] of them, accepted


def check_draft(model, draft, num_draft_tokens: int):
    """The draft, checked against the target: ``"ngram"`` or a GPT-Neo with the target's vocabulary."""
    from neo_jax.model import GPTNeo

    validate.integer("num_draft_tokens", num_draft_tokens, least=1)
    if isinstance(draft, str):
        if draft != NGRAM:
            raise ValueError(f"draft must be a GPT-Neo model or {NGRAM!r}, got {draft!r}")
        return None
    if not isinstance(draft, GPTNeo):
        raise ValueError(f"draft must be a GPT-Neo model or {NGRAM!r}, got {type(draft).__name__}")
    if draft.config.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"the draft's vocabulary ({draft.config.vocab_size} tokens) differs from the model's "
            f"({model.config.vocab_size}): a draft must share the model's tokenizer"
        )
    return draft


def check_draft_config(draft: str, draft_config, model: str, model_config) -> None:
    """The draft ``draft``'s config against the model ``model``'s, before either loads: the same vocabulary."""
    if draft_config.vocab_size != model_config.vocab_size:
        raise ValueError(
            f"the draft {draft} has a vocabulary of {draft_config.vocab_size} tokens, the model "
            f"{model} {model_config.vocab_size}: a draft must share the model's tokenizer"
        )


def check_draft_positions(positions: int, max_len: int, draft: str | None = None) -> None:
    """A server's draft must reach every position of its slots."""
    if positions < max_len:
        raise ValueError(
            f"the draft{'' if draft is None else ' ' + draft} has {positions} positions, fewer than a slot's "
            f"max_len {max_len}: give a draft with as many, or a smaller max_len"
        )


def draft_source(model, draft: str):
    """``draft`` (anything ``from_pretrained`` reads, or ``"ngram"``) checked against ``model`` (a resolved
    ``Source``) before either loads: its vocabulary must be the model's, and where both have a tokenizer, its
    tokenizer's vocabulary and EOS too. Returns the draft's ``Source``, or ``"ngram"``."""
    from neo_jax.data import vocab_hash
    from neo_jax.hf import load_tokenizer
    from neo_jax.source import resolve

    if draft == NGRAM:
        return NGRAM
    source = resolve(draft)
    check_draft_config(draft, source.config, model.name, model.config)
    if source.tokenizer is not None and model.tokenizer is not None:
        mine, theirs = load_tokenizer(model.tokenizer), load_tokenizer(source.tokenizer)
        if vocab_hash(mine) != vocab_hash(theirs) or mine.eos_token_id != theirs.eos_token_id:
            raise ValueError(
                f"the draft {draft} has another tokenizer than the model {model.name} (its vocabulary or EOS "
                "differ): a draft must share the model's tokenizer"
            )
    return source


def _history(sequence, end, size: int):
    """``[batch, size]``: each row's entries ``end - size .. end - 1`` (BEFORE where there are none)."""
    at = end[:, None] - size + jnp.arange(size)
    return jnp.where(at >= 0, jnp.take_along_axis(sequence, jnp.maximum(at, 0), axis=1), BEFORE)


def _processed(params: SamplingParams, logits, seen, sequence, end, generated, eos):
    """A position's logits after the processors, for the token that goes at ``sequence[end]`` (the
    ``generated``-th new one)."""
    history = _history(sequence, end, params.history) if params.history else None
    return params.process(logits, seen, generated[:, None], history, eos)


def _see(params: SamplingParams, seen, tokens, keep=None):
    """``seen`` with ``tokens`` ([batch, n]; only where ``keep``) marked, if the repetition penalty uses it."""
    if not params.use_repetition_penalty:
        return seen
    rows = jnp.arange(tokens.shape[0])[:, None]
    return seen.at[rows, tokens].max(True if keep is None else keep)


def ngram_proposals(sequence, length, k: int):
    """``[batch, k]`` prompt-lookup proposals: after the latest earlier occurrence of a row's last ``n``
    tokens (the longest ``n`` of ``NGRAM_SIZES`` that occurs), the ``k`` tokens that followed it (repeating
    the last one where the sequence ends first); a row with no occurrence proposes its last token."""
    room = sequence.shape[1]
    start = jnp.arange(room)
    rows = jnp.arange(sequence.shape[0])[:, None]
    proposal = jnp.broadcast_to(_history(sequence, length, 1), (sequence.shape[0], k))
    for n in sorted(NGRAM_SIZES):  # longest last: it wins where it occurs
        tail = _history(sequence, length, n)  # [batch, n]
        match = (start[None] + n < length[:, None]) & (tail >= 0).all(axis=1, keepdims=True)
        for j in range(n):
            match &= sequence[:, jnp.minimum(start + j, room - 1)] == tail[:, j : j + 1]
        latest = jnp.max(jnp.where(match, start[None], -1), axis=1)  # [batch]
        follow = jnp.minimum(latest[:, None] + n + jnp.arange(k), length[:, None] - 1)  # what came after it
        proposal = jnp.where((latest >= 0)[:, None], sequence[rows, follow], proposal)
    return proposal


def residual(p, q):
    """The law of a row's token at its first rejection: ``max(0, p - q)``, renormalised by the sampler (``p``
    itself where nothing is left: then ``p`` equals ``q`` and nothing is ever rejected, but for rounding)."""
    left = jnp.maximum(p - q, 0)
    return jnp.where(left.sum(-1, keepdims=True) > 0, left, p)


def _draft_round(draft, periods, state: SpecState, params: SamplingParams, eos, k: int, width: int, key):
    """The draft model's ``k`` proposals ``[batch, k]``, its laws ``[batch, k, vocab]`` (probabilities; None
    when greedy) and its cache after ``k + 1`` steps (the last writes the last proposal)."""
    rows = jnp.arange(state.length.shape[0])
    last = state.sequence[rows, state.length - 1]
    cache, sequence, seen, fed = cast(KVCache, state.draft_cache), state.sequence, state.seen, last
    proposals, laws = [], []
    for j in range(k + 1):
        logits, cache = decode_step(draft, periods, fed, state.positions + j, cache)
        if j == k:
            break
        end = state.length + j
        x = _processed(params, logits, seen, sequence, end, end - width, eos)
        if params.do_sample:
            fed = jax.random.categorical(jax.random.fold_in(key, j), x, axis=-1).astype(jnp.int32)
            laws.append(jax.nn.softmax(x, axis=-1))
        else:
            fed = jnp.argmax(x, axis=-1).astype(jnp.int32)
        proposals.append(fed)
        sequence = sequence.at[rows, end].set(fed)
        seen = _see(params, seen, fed[:, None])
    return jnp.stack(proposals, 1), (jnp.stack(laws, 1) if laws else None), cache


def _round(target, tperiods, draft, dperiods, state: SpecState, params: SamplingParams, eos, k, width, max_new):
    """One round: proposals, one verification pass, each row's accepted run and its next token."""
    batch = state.length.shape[0]
    rows = jnp.arange(batch)
    key = jax.random.fold_in(state.key, state.rounds)
    draft_key, accept_key, residual_key = jax.random.split(key, 3)
    if draft is None:
        proposals, laws, draft_cache = ngram_proposals(state.sequence, state.length, k), None, None
    else:
        proposals, laws, draft_cache = _draft_round(draft, dperiods, state, params, eos, k, width, draft_key)
    last = state.sequence[rows, state.length - 1]
    logits, cache = extend(
        target, tperiods, jnp.concatenate([last[:, None], proposals], 1), state.positions, state.cache
    )
    # the target's processed logits at each of the k + 1 positions, the proposals before it in the sequence
    written = state.sequence.at[rows[:, None], state.length[:, None] + jnp.arange(k)].set(proposals)
    seen, target = state.seen, []
    for i in range(k + 1):
        end = state.length + i
        target.append(_processed(params, logits[:, i], seen, written, end, end - width, eos))
        if i < k:
            seen = _see(params, seen, proposals[:, i : i + 1])
    target = jnp.stack(target, 1)  # [batch, k + 1, vocab]
    if params.do_sample:
        p = jax.nn.softmax(target, axis=-1)
        q = jax.nn.one_hot(proposals, p.shape[-1], dtype=p.dtype) if laws is None else laws
        p_x = jnp.take_along_axis(p[:, :k], proposals[..., None], axis=-1)[..., 0]
        q_x = jnp.take_along_axis(q, proposals[..., None], axis=-1)[..., 0]
        accept = jax.random.uniform(accept_key, (batch, k)) * q_x < p_x  # probability min(1, p(x) / q(x))
    else:
        accept = proposals == jnp.argmax(target[:, :k], axis=-1)
    n = jnp.cumprod(accept, axis=1).sum(axis=1)  # [batch] the accepted run's length
    if params.do_sample:
        q = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # after k acceptances: p itself
        token = jax.random.categorical(residual_key, jnp.log(residual(p[rows, n], q[rows, n])), axis=-1)
        token = token.astype(jnp.int32)
    else:
        token = jnp.argmax(target[rows, n], axis=-1).astype(jnp.int32)
    j = jnp.arange(k + 1)
    emitted = jnp.where(j < n[:, None], jnp.concatenate([proposals, token[:, None]], 1), token[:, None])
    # a row keeps its run up to its first EOS and within max_new tokens; a finished row keeps nothing
    ends = (emitted == eos) & (j <= n[:, None])
    first_eos = jnp.where(ends.any(axis=1), jnp.argmax(ends, axis=1), k + 1)
    generated = state.length - width
    m = jnp.minimum(jnp.minimum(n + 1, first_eos + 1), max_new - generated)
    m = jnp.where(state.finished, 0, m)
    keep = j < m[:, None]
    at = state.length[:, None] + j
    sequence = state.sequence.at[rows[:, None], at].set(jnp.where(keep, emitted, state.sequence[rows[:, None], at]))
    moved = lambda c: None if c is None else dataclasses.replace(c, index=state.cache.index + m)
    active = ~state.finished
    return dataclasses.replace(
        state,
        cache=moved(cache),
        draft_cache=moved(draft_cache),
        sequence=sequence,
        length=state.length + m,
        positions=state.positions + m,
        finished=state.finished | (ends & keep).any(axis=1) | (generated + m >= max_new),
        seen=_see(params, state.seen, emitted, keep),
        rounds=state.rounds + 1,
        drafted=state.drafted + jnp.where(active, k, 0),
        accepted=state.accepted + jnp.where(active, n, 0),
    )


@partial(jax.jit, static_argnames=("graphdefs", "draft_graphdefs", "max_len", "room", "k"))
def _start(
    graphdefs,
    arrays,
    draft_graphdefs,
    draft_arrays,
    input_ids,
    attention_mask,
    sequence,
    seen,
    params: SamplingParams,
    key,
    eos,
    *,
    max_len,
    room,
    k,
):
    """Prefill the target (and the draft) and pick the first new token from the target's logits."""
    batch, width = input_ids.shape
    model, periods = build(graphdefs[0], arrays[0], graphdefs[1], arrays[1])
    logits, cache, _ = prefill(model, periods, input_ids, attention_mask, max_len, lookahead=k + 1)
    draft_cache = None
    if draft_graphdefs is not None:
        draft, draft_periods = build(draft_graphdefs[0], draft_arrays[0], draft_graphdefs[1], draft_arrays[1])
        draft_cache = prefill(draft, draft_periods, input_ids, attention_mask, max_len, lookahead=k + 1)[1]
        draft_cache = dataclasses.replace(draft_cache, index=jnp.full((batch,), width, jnp.int32))
    length = jnp.full((batch,), width, jnp.int32)
    sequence = jnp.concatenate([sequence, jnp.full((batch, room - width), 0, jnp.int32)], axis=1)
    x = _processed(params, logits, seen, sequence, length, jnp.zeros((batch,), jnp.int32), eos)
    first, key = jax.random.split(key)
    token = params.choose(x, first)
    rows = jnp.arange(batch)
    return SpecState(
        cache=dataclasses.replace(cache, index=jnp.full((batch,), width, jnp.int32)),
        draft_cache=draft_cache,
        sequence=sequence.at[rows, width].set(token),
        length=length + 1,
        positions=attention_mask.sum(axis=1).astype(jnp.int32),
        finished=token == eos,
        seen=_see(params, seen, token[:, None]),
        key=key,
        rounds=jnp.int32(0),
        drafted=jnp.zeros((batch,), jnp.int32),
        accepted=jnp.zeros((batch,), jnp.int32),
    )


@partial(jax.jit, static_argnames=("graphdefs", "draft_graphdefs", "k", "width"), donate_argnames=("state",))
def _continue(
    graphdefs, arrays, draft_graphdefs, draft_arrays, state: SpecState, stop, max_new, params, eos, *, k, width
):
    """Rounds until every unfinished row holds ``stop`` new tokens (or every row has finished)."""

    def cond(carry):
        state = carry[0]
        return jnp.any(~state.finished & (state.length - width < stop))

    def body(carry):
        state, arrays, draft_arrays = carry
        model, periods = build(graphdefs[0], arrays[0], graphdefs[1], arrays[1])
        draft, draft_periods = None, None
        if draft_graphdefs is not None:
            draft, draft_periods = build(draft_graphdefs[0], draft_arrays[0], draft_graphdefs[1], draft_arrays[1])
        state = _round(model, periods, draft, draft_periods, state, params, eos, k, width, max_new)
        return state, arrays, draft_arrays

    return jax.lax.while_loop(cond, body, (state, arrays, draft_arrays))[0]


def speculative_stream(
    model,
    draft,
    request: Request,
    caller_ids: np.ndarray,
    seen: np.ndarray,
    params: SamplingParams,
    key,
    *,
    max_new_tokens: int,
    num_draft_tokens: int,
    chunk_size: int | None,
    statistics: dict | None,
) -> Iterator[np.ndarray]:
    """``loop.stream``'s chunks, decoded speculatively (``draft``: a checked GPT-Neo, or None for n-gram;
    ``seen``: the prompt's tokens for the repetition penalty, as ``stream`` marks them).
    ``statistics``, if given, is filled in as the rounds go: ``draft_tokens`` proposed, ``accepted_tokens``
    of them, ``rounds`` (verification passes) and ``tokens`` emitted by them."""
    k = num_draft_tokens
    batch, width = request.input_ids.shape
    sequence = np.full((batch, width), BEFORE, np.int32)
    sequence[:, width - caller_ids.shape[1] :] = caller_ids
    room = width + cache_bucket(max_new_tokens + k + 1)
    graphdefs, arrays = Weights.of(model).split()
    draft_graphdefs, draft_arrays = (None, None) if draft is None else Weights.of(draft).split()
    eos = jnp.int32(request.eos)
    mesh = sharding.model_mesh(model)
    with sharding.use_mesh(mesh):
        state = _start(
            graphdefs,
            arrays,
            draft_graphdefs,
            draft_arrays,
            jnp.asarray(request.input_ids),
            jnp.asarray(request.attention_mask),
            jnp.asarray(sequence),
            jnp.asarray(seen),
            params,
            key,
            eos,
            max_len=cache_bucket(width + max_new_tokens + k + 1),
            room=room,
            k=k,
        )
    yield _new(state, width, request.pad, 0, 1)
    done, chunk = 1, chunk_size or max_new_tokens
    while done < max_new_tokens and not to_host(state.finished).all():
        stop = min(done + chunk, max_new_tokens)
        with sharding.use_mesh(mesh):
            state = _continue(
                graphdefs,
                arrays,
                draft_graphdefs,
                draft_arrays,
                state,
                jnp.int32(stop),
                jnp.int32(max_new_tokens),
                params,
                eos,
                k=k,
                width=width,
            )
        if statistics is not None:
            emitted = to_host(state.length - width)
            statistics.update(
                draft_tokens=int(to_host(state.drafted).sum()),
                accepted_tokens=int(to_host(state.accepted).sum()),
                rounds=int(state.rounds),
                tokens=int(emitted.sum()) - batch,  # the first token of each row came from the prefill
            )
        yield _new(state, width, request.pad, done, stop)
        done = stop


def _new(state: SpecState, width: int, pad: int, start: int, stop: int) -> np.ndarray:
    """New tokens ``start..stop-1`` of every row (pad past a row's end)."""
    sequence, length = to_host(state.sequence), to_host(state.length)
    new = sequence[:, width + start : width + stop]
    filled = np.arange(start, stop)[None] < (length - width)[:, None]
    return np.where(filled, new, pad)


def catch_up(draft_graphdefs, draft_arrays, cache: KVCache, ids, start, count):
    """The server's draft cache, with each row's ``count`` tokens ``ids`` (``[slots, width]``) written at
    slots ``start..`` (rows with ``count`` 0 unchanged): the tokens its row holds that the draft has not seen
    (the prompt; tokens of steps that did not speculate)."""
    draft, periods = build(draft_graphdefs[0], draft_arrays[0], draft_graphdefs[1], draft_arrays[1])
    write = jnp.arange(ids.shape[1])[None, :] < count[:, None]
    _, cache = extend(draft, periods, ids, start, dataclasses.replace(cache, index=start), write)
    return dataclasses.replace(cache, index=jnp.where(count > 0, start + count, cache.index))


def serve_round(graphdefs, draft_graphdefs, arrays, draft_arrays, slots, draft_cache, sequence, *, k: int):
    """One speculative round for every decoding row of the server's slots (``batching.Slots``): ``k``
    proposals per row, from the draft model (its cache holds every row's tokens before ``last``:
    ``catch_up``) or, with no draft, by n-gram lookup in ``sequence`` (``[slots, room]``, each row's tokens
    up to ``last``); one verification pass of the target, with each row's adapter; each row's accepted run and
    the target's token after it.

    A row's token at each position is the one a plain step (``batching.step``) would choose there: its
    processors, then greedy or an inverse-CDF draw at the uniform number of its key and position
    (``fold_in(key, tokens so far)``). The draft proposes with the same number, and a proposal is accepted when
    it is that token. So every token follows the target's law, and a seeded request gets the same tokens
    whether its steps speculate or not (the server's off switch, prompts prefilling beside it, the other rows:
    none of them changes its output). For n-gram proposals the chance of acceptance is ``p(x)``, as under the
    rejection rule; for a draft model's sampled proposals it is that of the two draws coinciding, below the
    rejection rule's ``sum(min(p, q))``.

    Returns the slots and the draft's cache moved past the tokens emitted, and per row: the ``k + 1`` tokens,
    how many were emitted (0: not decoding), how many of them were accepted proposals, and the raw target's
    log-probabilities of each with its alternatives."""
    from neo_jax import lora
    from neo_jax.generation import batching

    model, periods = build(graphdefs[0], arrays[0], graphdefs[1], arrays[1])
    count = slots.last.shape[0]
    rows = jnp.arange(count)
    settings, active = slots.settings, slots.active
    positions = lambda j: jnp.minimum(slots.positions + j, model.config.max_position_embeddings - 1)
    # the token a plain step would choose at the row's j-th position of the round, the proposals before it seen
    choose = lambda logits, seen, history, j: batching.pick(
        batching.process(logits, seen, settings, slots.steps + j, history), settings, slots.steps + j
    )

    if draft_graphdefs is None:
        proposals = ngram_proposals(sequence, slots.cache.index + 1, k)
    else:
        draft, draft_periods = build(draft_graphdefs[0], draft_arrays[0], draft_graphdefs[1], draft_arrays[1])
        fed, seen, history, proposals = slots.last, slots.seen, slots.history, []
        for j in range(k + 1):  # the last step writes the last proposal
            logits, draft_cache = decode_step(draft, draft_periods, fed, positions(j), draft_cache)
            if j == k:
                break
            fed = choose(logits, seen, history, j)
            proposals.append(fed)
            seen, history = seen.at[rows, fed].set(True), batching.appended(history, fed)
        proposals = jnp.stack(proposals, 1)
    tokens = jnp.concatenate([slots.last[:, None], proposals], 1)
    lora.select(periods, jnp.broadcast_to(slots.adapter[:, None], tokens.shape))
    write = jnp.broadcast_to(active[:, None], tokens.shape)  # a row not decoding keeps its cache
    logits, cache = extend(model, periods, tokens, slots.positions, slots.cache, write)
    seen, history, chosen = slots.seen, slots.history, []
    for i in range(k + 1):  # the target's token at each position
        chosen.append(choose(logits[:, i], seen, history, i))
        if i < k:
            seen, history = seen.at[rows, proposals[:, i]].set(True), batching.appended(history, proposals[:, i])
    chosen = jnp.stack(chosen, 1)  # [slots, k + 1]
    n = jnp.cumprod(proposals == chosen[:, :k], axis=1).sum(axis=1)  # the accepted run's length
    j = jnp.arange(k + 1)
    emitted = jnp.where(j < n[:, None], jnp.concatenate([proposals, chosen[:, k:]], 1), chosen[rows, n][:, None])
    m = jnp.where(active, n + 1, 0)
    logprobs, top_ids, top = batching.top_logprobs(logits)
    logprob = jnp.take_along_axis(logprobs, emitted[..., None], axis=-1)[..., 0]
    kept = jnp.concatenate([slots.history, emitted], axis=1)  # the latest tokens end at the last one kept
    index = cache.index + m
    vocab = slots.seen.shape[1]
    slots = dataclasses.replace(
        slots,
        cache=dataclasses.replace(cache, index=index, valid=slots.cache.valid),
        last=jnp.where(active, emitted[rows, jnp.maximum(m - 1, 0)], slots.last),
        positions=slots.positions + m,
        seen=slots.seen.at[rows[:, None], jnp.where(j < m[:, None], emitted, vocab)].set(True, mode="drop"),
        history=jnp.take_along_axis(kept, m[:, None] + jnp.arange(slots.history.shape[1]), axis=1),
        steps=slots.steps + m,
    )
    if draft_cache is not None:
        draft_cache = dataclasses.replace(draft_cache, index=jnp.where(active, index, draft_cache.index))
    return slots, draft_cache, (emitted, m, jnp.where(active, n, 0), logprob, top_ids, top)
