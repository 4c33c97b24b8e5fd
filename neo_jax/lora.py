"""LoRA adapters on GPT-Neo's linear layers: the adapter layer, ``trainable`` and ``merge`` (PEFT's file
format is ``neo_jax.peft``).

An adapter on a ``Dense`` layer adds ``scale * (x @ A.T) @ B.T`` to its output, with ``A`` ``[r, in]`` and
``B`` ``[out, r]`` stored as PEFT stores ``lora_A.weight`` and ``lora_B.weight`` (no transposes), and
``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``). Initialisation is PEFT's default:
A Kaiming-uniform (``a = sqrt(5)``, i.e. uniform in ``±1/sqrt(in)``), B zero, so a new adapter changes
nothing. Adapters are ``LoRAParam``s, a ``Param`` subtype, so that a filter can select them alone; they carry
logical axes (``layers``, and the layer's own input or output axis) and shard like the weights they adapt.

``merge`` folds the adapters into the weights.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neo_jax import validate

# PEFT's module names -> where the layer sits in a block.
TARGETS = {
    "q_proj": ("attn", "q_proj"),
    "k_proj": ("attn", "k_proj"),
    "v_proj": ("attn", "v_proj"),
    "out_proj": ("attn", "out_proj"),
    "c_fc": ("mlp", "c_fc"),
    "c_proj": ("mlp", "c_proj"),
}


class LoRAParam(nnx.Param):
    """A LoRA adapter weight: with LoRA on, the only parameters that train."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Rank ``r``, ``alpha`` scaling (``use_rslora``: divided by ``sqrt(r)`` instead of ``r``), dropout on
    the adapter's input during training, and the layers adapted (PEFT's names; PEFT's default for GPT-Neo
    is q_proj and v_proj)."""

    r: int
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    use_rslora: bool = False

    def __post_init__(self):
        validate.integer("lora rank", self.r, least=1)
        validate.real("lora alpha", self.alpha)
        if self.alpha <= 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha}")
        validate.real("lora dropout", self.dropout)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")
        targets = tuple(self.targets)
        unknown = [t for t in targets if t not in TARGETS]
        if unknown or not targets or len(set(targets)) != len(targets):
            raise ValueError(
                f"lora targets must be distinct names among {', '.join(TARGETS)}; got {', '.join(targets) or 'none'}"
            )
        object.__setattr__(self, "targets", targets)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class DropoutKey(nnx.Variable):
    """The PRNG key (one per stacked layer) of an adapter's dropout, set only for a training step's forward
    pass (``with_dropout``)."""


class LoRA(nnx.Module):
    """``scale * (dropout(x) @ a.T) @ b.T``, computed in the layer's compute dtype; ``config`` (static) says
    how it was made. Dropout, as PEFT's on the adapter's input, applies only while ``keys`` is set (training);
    otherwise the adapter is deterministic."""

    def __init__(self, a: LoRAParam, b: LoRAParam, config: LoRAConfig):
        self.a, self.b, self.config = a, b, config
        self.keys = nnx.data(None)

    def __call__(self, x, dtype):
        x = x.astype(dtype)
        if self.keys is not None:
            keep = jax.random.bernoulli(self.keys[...], 1 - self.config.dropout, x.shape)
            x = jnp.where(keep, x / jnp.asarray(1 - self.config.dropout, dtype), jnp.zeros((), dtype))
        h = jnp.einsum("...i,ri->...r", x, self.a[...].astype(dtype))
        return jnp.einsum("...r,or->...o", h, self.b[...].astype(dtype)) * jnp.asarray(self.config.scale, dtype)


class AdapterRows(nnx.Variable):
    """Which adapter each token uses (``Adapters``), set inside a serving program (``select``)."""


class Adapters(nnx.Module):
    """Several adapters on one layer, each token choosing its own (S-LoRA's and Punica's batched LoRA):
    ``a`` ``[adapters, r, in]`` and ``b`` ``[adapters, out, r]``, ranks padded with zeros to the largest and
    each adapter's scale folded into its ``b``. ``rows`` (``select``) holds each token's adapter index, -1
    for none. Every token's input goes through every adapter's ``a`` (``adapters * r`` columns, a few percent
    of the layer's own), and the one-hot of its index keeps only its own before ``b``."""

    def __init__(self, a: LoRAParam, b: LoRAParam):
        self.a, self.b = a, b
        self.rows: AdapterRows | None = nnx.data(None)

    def __call__(self, x, dtype):
        if self.rows is None:
            raise ValueError("these layers hold several LoRA adapters: pick each token's with lora.select")
        pick = jax.nn.one_hot(self.rows[...], self.a.shape[-3], dtype=dtype)
        h = jnp.einsum("...i,nri->...nr", x.astype(dtype), self.a[...].astype(dtype)) * pick[..., None]
        return jnp.einsum("...nr,nor->...o", h, self.b[...].astype(dtype))


def add_many(model, adapters: list[tuple[LoRAConfig, dict]]):
    """Put several adapters on ``model``'s layers at once (``Adapters``), in place; returns ``model``. Each
    adapter is its config and, per target name, ``(a, b)`` stacked over every layer of the model
    (``[layers, r, in]``, ``[layers, out, r]``, as ``add`` stores one adapter); a layer no adapter targets
    stays plain. On a mesh the adapters are placed in shards like the weights they adapt."""
    from neo_jax.sharding import model_mesh, variable_sharding

    if has_lora(model):
        raise ValueError("this model already has LoRA adapters")
    mesh = model_mesh(model)
    rank = max(config.r for config, _ in adapters)
    period = len(model.config.layer_period)
    for i, (name, dense) in enumerate(adapted_layers(model)):
        if not any(name in config.targets for config, _ in adapters):
            continue
        slot = i // len(TARGETS)
        layers, d_out, d_in = dense.kernel.shape
        a = np.zeros((layers, len(adapters), rank, d_in), np.float32)
        b = np.zeros((layers, len(adapters), d_out, rank), np.float32)
        for n, (config, tensors) in enumerate(adapters):
            if name in config.targets:
                stacked_a, stacked_b = tensors[name]
                a[:, n, : config.r] = stacked_a[slot::period]
                b[:, n, :, : config.r] = stacked_b[slot::period] * config.scale
        dense.lora = nnx.data(_adapters_of(dense, jnp.asarray(a), jnp.asarray(b)))
        if mesh is not None:
            for param in (dense.lora.a, dense.lora.b):
                param.set_value(jax.device_put(param.get_value(), variable_sharding(param, mesh)))
    return model


def add_abstract(model, count: int, config: LoRAConfig):
    """``count`` adapters of ``config``'s rank and targets on an abstract model (``ShapeDtypeStruct``
    weights, as ``neo_jax.aot`` compiles), laid out as ``add_many`` lays them out; returns ``model``."""
    for name, dense in adapted_layers(model):
        if name in config.targets:
            layers, d_out, d_in = dense.kernel.shape
            a = jax.ShapeDtypeStruct((layers, count, config.r, d_in), jnp.float32)
            b = jax.ShapeDtypeStruct((layers, count, d_out, config.r), jnp.float32)
            dense.lora = nnx.data(_adapters_of(dense, a, b))
    return model


def _adapters_of(dense, a, b) -> Adapters:
    """``Adapters`` for ``dense``: stacked ``a`` and ``b`` with the logical axes of the weight they adapt."""
    out_axis, in_axis = dense.kernel.get_metadata()["out_sharding"][1:]
    a = LoRAParam(a, out_sharding=("layers", None, None, in_axis), eager_sharding=False)
    b = LoRAParam(b, out_sharding=("layers", None, out_axis, None), eager_sharding=False)
    return Adapters(a, b)


def select(periods, rows) -> None:
    """Inside a program, give every multi-adapter layer (``Adapters``) of ``periods`` (``build``'s per-period
    block lists) each token's adapter index ``rows`` (shaped like the token ids), in place."""
    for blocks in periods:
        for block in blocks:
            for block_part, layer in TARGETS.values():
                dense = getattr(getattr(block, block_part), layer)
                if isinstance(dense.lora, Adapters):
                    dense.lora.rows = AdapterRows(rows)


def adapted_layers(model):
    """(target name, Dense module) of every adapted position in the layer period."""
    for period in model.periods:
        for name, (block_part, layer) in TARGETS.items():
            yield name, getattr(getattr(period, block_part), layer)


def add(model, config: LoRAConfig, *, seed: int = 0):
    """Give ``model``'s target layers new adapters (A Kaiming-uniform, B zero), in place; returns ``model``.
    On a mesh the adapters are placed in shards like the weights they adapt."""
    from neo_jax.sharding import model_mesh, variable_sharding

    if has_lora(model):
        raise ValueError("this model already has LoRA adapters")
    mesh = model_mesh(model)
    key = jax.random.key(seed)
    for i, (name, dense) in enumerate(adapted_layers(model)):
        if name not in config.targets:
            continue
        layers, d_out, d_in = dense.kernel.shape
        out_axis, in_axis = dense.kernel.get_metadata()["out_sharding"][1:]
        bound = 1 / math.sqrt(d_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), (layers, config.r, d_in), jnp.float32, -bound, bound)
        a = LoRAParam(a, out_sharding=("layers", None, in_axis), eager_sharding=False)
        b = jnp.zeros((layers, d_out, config.r), jnp.float32)
        b = LoRAParam(b, out_sharding=("layers", out_axis, None), eager_sharding=False)
        if mesh is not None:
            for param in (a, b):
                param.set_value(jax.device_put(param.get_value(), variable_sharding(param, mesh)))
        dense.lora = nnx.data(LoRA(a, b, config))
    return model


def with_dropout(model, key):
    """Give every adapter with dropout its own key for each layer, derived from ``key``, so that the next
    forward pass drops its inputs (in place, on a model built for one training step); returns ``model``."""
    for i, (_, dense) in enumerate(adapted_layers(model)):
        if dense.lora is not None and dense.lora.config.dropout:
            layers = dense.lora.a.shape[0]
            dense.lora.keys = DropoutKey(jax.random.split(jax.random.fold_in(key, i), layers))
    return model


def has_dropout(model) -> bool:
    return any(isinstance(dense.lora, LoRA) and dense.lora.config.dropout for _, dense in adapted_layers(model))


def has_lora(model) -> bool:
    return any(dense.lora is not None for _, dense in adapted_layers(model))


def trainable(model):
    """What trains (and what a training checkpoint holds): the adapters and a task head, if the model has
    adapters, else every parameter."""
    if not has_lora(model):
        return nnx.Param
    return LoRAParam if model.head is None else nnx.Any(LoRAParam, nnx.All(nnx.Param, nnx.PathContains("head")))


def merge(model):
    """Fold every adapter into its layer's weight (``W + scale * B @ A``) and remove it, in place."""
    from neo_jax.quantize import is_quantized

    if is_quantized(model):
        raise ValueError(
            "this model's weights are int8: merge the adapters into the float base instead (load it with "
            "weights='float32' or 'bfloat16' and the same adapters)"
        )
    for _, dense in adapted_layers(model):
        if dense.lora is None:
            continue
        if isinstance(dense.lora, Adapters):
            raise ValueError("this model holds several adapters for serving: merge each into its own base instead")
        lora = dense.lora
        delta = jnp.einsum("lor,lri->loi", lora.b[...], lora.a[...]) * lora.config.scale
        dense.kernel.set_value((dense.kernel[...].astype(jnp.float32) + delta).astype(dense.kernel.dtype))
        dense.lora = nnx.data(None)
    return model
