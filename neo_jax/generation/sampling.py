"""Logit processors and token choice, in the order transformers applies them, and the checks of the
sampling settings."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from neo_jax import validate

NEG_INF = -jnp.inf
FLOAT32_MAX, FLOAT32_TINY = float(np.finfo(np.float32).max), float(np.finfo(np.float32).tiny)


def seed_key(seed: int) -> jax.Array:
    """The PRNG key of a seed in [-2**63, 2**64), all 64 bits of it: ``jax.random.key(seed)`` keeps only the
    low 32 bits unless 64-bit mode is on, so seeds 5 and 2**32 + 5 would draw the same samples. Equal to
    ``jax.random.key(seed)`` for seeds in [0, 2**31)."""
    validate.integer("seed", seed)
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must be in [-2**63, 2**64), got {seed}")
    seed %= 2**64
    return jax.random.wrap_key_data(jnp.asarray([seed >> 32, seed & 0xFFFFFFFF], jnp.uint32), impl="threefry2x32")


# Small pure functions on float32 logits [batch, vocab], in the order transformers applies them.
def repetition_penalty(logits, seen, penalty):
    """Divide positive (multiply negative) logits of tokens already in the sequence by ``penalty``; kept
    finite (a tiny penalty would send a logit to infinity)."""
    penalized = jnp.clip(jnp.where(logits < 0, logits * penalty, logits / penalty), -FLOAT32_MAX, FLOAT32_MAX)
    return jnp.where(seen, penalized, logits)


def temperature(logits, t):
    """``logits / t``, finite for every accepted ``t`` > 0: the logits are first shifted so that the largest
    is 0 (softmax, and so sampling, is unchanged), and ``t`` is taken as at least float32's smallest normal
    number. A tiny temperature then gives the most likely token (a tie is sampled between its tokens) where a
    plain division would overflow to ``inf - inf`` and sample garbage."""
    return (logits - logits.max(axis=-1, keepdims=True)) / jnp.maximum(t, FLOAT32_TINY)


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


STATIC = {"static": True}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How each next token is chosen: the one place the sampling keywords are spelled.

    Build it with ``SamplingParams.of(**keywords)`` (checked, normalised). Which processors run is static
    (metadata fields: part of the compiled program); their values are data (traced), so settings that differ
    only in values share one program.
    """

    temperature: jax.Array | np.float32  # NumPy's when built by ``of``: checking settings compiles nothing
    top_p: jax.Array | np.float32
    min_p: jax.Array | np.float32
    repetition_penalty: jax.Array | np.float32
    do_sample: bool = dataclasses.field(default=False, metadata=STATIC)
    top_k: int = dataclasses.field(default=0, metadata=STATIC)  # 0: off
    use_top_p: bool = dataclasses.field(default=False, metadata=STATIC)
    use_min_p: bool = dataclasses.field(default=False, metadata=STATIC)
    use_repetition_penalty: bool = dataclasses.field(default=False, metadata=STATIC)

    @classmethod
    def of(
        cls,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        *,
        vocab_size: int | None = None,
    ) -> SamplingParams:
        """From transformers' ``generate`` keywords: greedy unless ``do_sample``; ``temperature`` 0 is greedy,
        ``top_k`` 0, ``top_p`` 1 and ``min_p`` 0 are off, ``repetition_penalty`` 1 is none. Every value is
        checked (a one-line ValueError names the first that is wrong)."""
        for name, value in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p)):
            validate.real(name, value)
        validate.real("repetition_penalty", repetition_penalty)
        validate.integer("top_k", top_k)
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
        sample = bool(do_sample) and temperature != 0  # the limit of temperature -> 0 is greedy
        return cls(
            temperature=np.float32(temperature or 1.0),
            top_p=np.float32(top_p),
            min_p=np.float32(min_p),
            repetition_penalty=np.float32(repetition_penalty),
            do_sample=sample,
            top_k=min(top_k, vocab_size or top_k) if sample else 0,
            use_top_p=sample and top_p < 1.0,
            use_min_p=sample and min_p > 0.0,
            use_repetition_penalty=repetition_penalty != 1.0,
        )

    def process(self, logits, seen):
        """The logits after the processors that are on, in transformers' order."""
        if self.use_repetition_penalty:
            logits = repetition_penalty(logits, seen, self.repetition_penalty)
        if self.do_sample:
            logits = temperature(logits, self.temperature)
            if self.top_k:
                logits = top_k(logits, self.top_k)
            if self.use_top_p:
                logits = top_p(logits, self.top_p)
            if self.use_min_p:
                logits = min_p(logits, self.min_p)
        return logits

    def choose(self, logits, key):
        """The next token of every row: a sample, or the most likely."""
        if self.do_sample:
            return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def check_beams(params: SamplingParams, num_beams: int) -> None:
    """Beam search is deterministic and takes no repetition penalty."""
    validate.integer("num_beams", num_beams)
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if num_beams > 1 and params.do_sample:
        raise ValueError("num_beams > 1 is beam search, which is deterministic: drop do_sample (or use num_beams=1)")
    if num_beams > 1 and params.use_repetition_penalty:
        raise ValueError("repetition_penalty is not supported with beam search; use num_beams=1 to combine them")
