"""What the generation programs share: the model split for them (``Weights``, rebuilt inside a program by
``build``), a validated and bucketed request (``prepare``), and results brought to the host (``to_host``)."""

from __future__ import annotations

import dataclasses
import weakref

import jax
import numpy as np
from flax import nnx

from neo_jax import validate
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

    def split(self) -> tuple[tuple, tuple]:
        """``(graphdefs, arrays)``: what a program takes as its static argument, and as its arrays (``build``
        puts them together again inside it)."""
        return (self.graphdef, self.period_graphdef), (self.params, self.periods)


_UNSTACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _unstack(stacked, n: int) -> list:
    return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n)]


_unstack_copy = jax.jit(_unstack, static_argnums=1)  # one dispatch instead of one per tensor


def build(graphdef, params, period_graphdef, periods):
    """Inside a program: the model and its list of per-period block modules."""
    model = nnx.merge(graphdef, params)
    if periods is None:
        periods = _unstack(nnx.state(model.periods), model.config.num_periods)
    return model, [nnx.merge(period_graphdef, state) for state in periods]


def to_host(array) -> np.ndarray:
    """A result on the host; in a multi-host run, rows other hosts hold are gathered first."""
    if array.is_fully_addressable or array.is_fully_replicated:
        return np.asarray(array)
    from neo_jax.distributed import gather

    return np.asarray(gather(array))


@dataclasses.dataclass
class Request:
    """A validated, bucketed generation request."""

    input_ids: np.ndarray  # [batch, bucketed prompt] left-padded
    attention_mask: np.ndarray
    eos: int  # -1: never stop early
    pad: int


def prepare(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id) -> Request:
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
    pad = pad_id(eos_token_id, pad_token_id)
    eos = -1 if eos_token_id is None else eos_token_id
    width = bucket(input_ids.shape[1])
    left = width - input_ids.shape[1]
    return Request(
        input_ids=np.pad(input_ids, ((0, 0), (left, 0)), constant_values=pad).astype(np.int32),
        attention_mask=np.pad(mask, ((0, 0), (left, 0))).astype(np.int32),
        eos=eos,
        pad=pad,
    )


def pad_id(eos_token_id, pad_token_id) -> int:
    return pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
