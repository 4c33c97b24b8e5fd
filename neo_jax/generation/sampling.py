"""Logit processors and token choice, in the order transformers applies them, and the checks of the
sampling settings."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from neo_jax import validate

NEG_INF = -jnp.inf


# Small pure functions on float32 logits [batch, vocab], in the order transformers applies them.
def repetition_penalty(logits, seen, penalty):
    """Divide positive (multiply negative) logits of tokens already in the sequence by ``penalty``."""
    return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def top_k(logits, k):
    """Keep the ``k`` largest logits (ties at the k-th value are kept)."""
    kth = jax.lax.top_k(logits, k)[0][:, -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p(logits, p):
    """Keep the smallest set of tokens whose probability reaches ``p`` (nucleus), at least one."""
    order = jnp.argsort(logits, axis=-1)  # ascending, as transformers does
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove = (cumulative <= 1 - p).at[:, -1].set(False)
    remove = jnp.zeros_like(remove).at[jnp.arange(logits.shape[0])[:, None], order].set(remove)
    return jnp.where(remove, NEG_INF, logits)


def min_p(logits, p):
    """Drop tokens whose probability is below ``p`` times the most likely token's."""
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.where(probs < p * probs.max(axis=-1, keepdims=True), NEG_INF, logits)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Which processors run (static: part of the compiled program); their values are traced arguments."""

    do_sample: bool = False
    repetition_penalty: bool = False
    top_k: int = 0
    top_p: bool = False
    min_p: bool = False


def process_logits(logits, seen, values: dict, sampling: Sampling):
    if sampling.repetition_penalty:
        logits = repetition_penalty(logits, seen, values["repetition_penalty"])
    if sampling.do_sample:
        logits = logits / values["temperature"]
        if sampling.top_k:
            logits = top_k(logits, sampling.top_k)
        if sampling.top_p:
            logits = top_p(logits, values["top_p"])
        if sampling.min_p:
            logits = min_p(logits, values["min_p"])
    return logits


def choose(logits, key, sampling: Sampling):
    if sampling.do_sample:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def check_sampling(do_sample, temperature, top_k, top_p, min_p, repetition_penalty, num_beams):
    for name, value in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p)):
        validate.real(name, value)
    validate.real("repetition_penalty", repetition_penalty)
    validate.integer("top_k", top_k)
    validate.integer("num_beams", num_beams)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if num_beams > 1 and do_sample:
        raise ValueError("num_beams > 1 is beam search, which is deterministic: drop do_sample (or use num_beams=1)")
    if num_beams > 1 and repetition_penalty != 1.0:
        raise ValueError("repetition_penalty is not supported with beam search; use num_beams=1 to combine them")
