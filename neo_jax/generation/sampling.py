"""Logit processors and token choice, in the order transformers applies them, and the checks of the
sampling settings."""

from __future__ import annotations

import dataclasses
from typing import Any

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
    return seed_keys([seed])[0]


def seed_keys(seeds) -> jax.Array:
    """``seed_key`` of each of ``seeds``, as one array of keys (built on the host: no program per count)."""
    data = np.zeros((len(seeds), 2), np.uint32)
    for i, seed in enumerate(seeds):
        validate.integer("seed", seed)
        if not -(2**63) <= seed < 2**64:
            raise ValueError(f"seed must be in [-2**63, 2**64), got {seed}")
        seed %= 2**64
        data[i] = seed >> 32, seed & 0xFFFFFFFF
    return jax.random.wrap_key_data(jnp.asarray(data), impl="threefry2x32")


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


def min_new_tokens(logits, step, minimum, eos):
    """No EOS while fewer than ``minimum`` tokens have been generated (``step`` of them so far)."""
    return jnp.where((jnp.arange(logits.shape[-1]) == eos) & (step < minimum), NEG_INF, logits)


def bad_words(logits, history, words):
    """Ban the last token of each sequence in ``words`` (``[words, length]`` for every row, or ``[batch, words,
    length]`` per row; right-aligned, -1 before a shorter one, all -1 for none) whose earlier tokens are the end
    of a row's ``history`` (``[batch, length - 1]``): a one-token word always."""
    words = jnp.broadcast_to(words, (logits.shape[0], *words.shape[-2:]))
    prefix, last = words[..., :-1], words[..., -1]
    match = ((prefix == -1) | (prefix == history[:, None, :])).all(axis=-1) & (last >= 0)  # [batch, words]
    rows = jnp.arange(logits.shape[0])[:, None]
    banned = jnp.zeros(logits.shape, bool).at[rows, jnp.maximum(last, 0)].max(match)
    return jnp.where(banned, NEG_INF, logits)


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
    min_new: jax.Array | np.int32  # no EOS before this many new tokens
    logit_bias: jax.Array | np.ndarray  # [vocab] added to the logits first ([1] when off)
    bad_words: jax.Array | np.ndarray  # [words, length] banned sequences, right-aligned after -1 ([1, 1] when off)
    do_sample: bool = dataclasses.field(default=False, metadata=STATIC)
    top_k: int = dataclasses.field(default=0, metadata=STATIC)  # 0: off
    use_top_p: bool = dataclasses.field(default=False, metadata=STATIC)
    use_min_p: bool = dataclasses.field(default=False, metadata=STATIC)
    use_repetition_penalty: bool = dataclasses.field(default=False, metadata=STATIC)
    use_min_new: bool = dataclasses.field(default=False, metadata=STATIC)
    use_logit_bias: bool = dataclasses.field(default=False, metadata=STATIC)
    use_bad_words: bool = dataclasses.field(default=False, metadata=STATIC)

    @classmethod
    def of(
        cls,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        min_length: int = 0,
        min_new_tokens: int = 0,
        bad_words_ids=None,
        logit_bias=None,
        *,
        vocab_size: int | None = None,
        prompt_length: int = 0,
        eos_token_id: int | None = None,
    ) -> SamplingParams:
        """From transformers' ``generate`` keywords: greedy unless ``do_sample``; ``temperature`` 0 is greedy,
        ``top_k`` 0, ``top_p`` 1 and ``min_p`` 0 are off, ``repetition_penalty`` 1 is none.

        ``min_length`` (prompt included: its ``prompt_length``, padding too, as transformers counts) and
        ``min_new_tokens`` hold EOS back; ``bad_words_ids`` (lists of token ids) are never generated;
        ``logit_bias`` (OpenAI's: token id -> a number added to its logit before anything else, as
        transformers' ``sequence_bias`` of one-token sequences). Every value is checked (a one-line ValueError
        names the first that is wrong)."""
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
        minimum = max(
            validate.integer("min_new_tokens", min_new_tokens, least=0),
            validate.integer("min_length", min_length, least=0) - prompt_length,
        )
        bias = check_logit_bias(logit_bias, vocab_size)
        words = check_bad_words(bad_words_ids, vocab_size, eos_token_id)
        sample = bool(do_sample) and temperature != 0  # the limit of temperature -> 0 is greedy
        return cls(
            temperature=np.float32(temperature or 1.0),
            top_p=np.float32(top_p),
            min_p=np.float32(min_p),
            repetition_penalty=np.float32(repetition_penalty),
            min_new=np.int32(minimum),
            logit_bias=np.zeros(1, np.float32) if bias is None else bias,
            bad_words=np.full((1, 1), -1, np.int32) if words is None else words,
            do_sample=sample,
            top_k=min(top_k, vocab_size or top_k) if sample else 0,
            use_top_p=sample and top_p < 1.0,
            use_min_p=sample and min_p > 0.0,
            use_repetition_penalty=repetition_penalty != 1.0,
            use_min_new=minimum > 0 and eos_token_id is not None,
            use_logit_bias=bias is not None,
            use_bad_words=words is not None,
        )

    @property
    def history(self) -> int:
        """How many of a row's latest tokens the banned sequences look back at."""
        return self.bad_words.shape[1] - 1 if self.use_bad_words else 0

    def process(self, logits, seen, step: Any = 0, history=None, eos: Any = -1):
        """The logits after the processors that are on, in transformers' order: ``step`` tokens have been
        generated, ``history`` ([batch, ``self.history``]) are a row's latest tokens, ``eos`` the EOS id."""
        if self.use_logit_bias:
            logits = logits + self.logit_bias
        if self.use_repetition_penalty:
            logits = repetition_penalty(logits, seen, self.repetition_penalty)
        if self.use_bad_words:
            logits = bad_words(logits, history, self.bad_words)
        if self.use_min_new:
            logits = min_new_tokens(logits, step, self.min_new, eos)
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


def check_logit_bias(bias, vocab_size: int | None) -> np.ndarray | None:
    """``{token id: bias}`` as a ``[vocab]`` vector (None for none); ids may be strings of digits, as in JSON."""
    if bias is None or (isinstance(bias, dict) and not bias):
        return None
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must map token ids to numbers, e.g. {{50256: -100}}; got {bias!r}")
    if vocab_size is None:
        raise ValueError("logit_bias needs the model's vocab_size")
    vector = np.zeros(vocab_size, np.float32)
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.strip().lstrip("-").isdigit() else key
        token = validate.integer(f"logit_bias key {key!r}", token, 0, vocab_size - 1)
        vector[token] = validate.real(f"logit_bias[{key!r}]", value)
    return vector


def check_bad_words(words, vocab_size: int | None, eos_token_id: int | None) -> np.ndarray | None:
    """transformers' ``bad_words_ids`` (a list of non-empty lists of token ids) as ``[words, length]``, each
    right-aligned after -1s; a lone EOS is dropped, as transformers drops it. None for none."""
    if words is None or (isinstance(words, list | tuple) and not words):
        return None
    shape = "bad_words_ids must be a list of non-empty lists of token ids, e.g. [[1234], [55, 66]]"
    if not isinstance(words, list | tuple) or not all(isinstance(w, list | tuple) and w for w in words):
        raise ValueError(f"{shape}; got {words!r}")
    for word in words:
        for token in word:
            validate.integer("bad_words_ids token", token, 0, None if vocab_size is None else vocab_size - 1)
    kept = [list(w) for w in words if list(w) != [eos_token_id]]
    if not kept:
        return None
    length = max(len(w) for w in kept)
    return np.array([[-1] * (length - len(w)) + w for w in kept], np.int32)


def check_beams(params: SamplingParams, num_beams: int) -> None:
    """Beam search is deterministic and takes no repetition penalty."""
    validate.integer("num_beams", num_beams)
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if num_beams > 1 and params.do_sample:
        raise ValueError("num_beams > 1 is beam search, which is deterministic: drop do_sample (or use num_beams=1)")
    for name, used in (
        ("repetition_penalty", params.use_repetition_penalty),
        ("min_length / min_new_tokens", params.use_min_new),
        ("bad_words_ids", params.use_bad_words),
        ("logit_bias", params.use_logit_bias),
    ):
        if num_beams > 1 and used:
            raise ValueError(f"{name} is not supported with beam search; use num_beams=1 to combine them")
