"""LoRA adapters on GPT-Neo's linear layers, in Hugging Face PEFT's own format.

An adapter on a ``Dense`` layer adds ``scale * (x @ A.T) @ B.T`` to its output, with ``A`` ``[r, in]`` and
``B`` ``[out, r]`` stored as PEFT stores ``lora_A.weight`` and ``lora_B.weight`` (no transposes), and
``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``). Initialisation is PEFT's default:
A Kaiming-uniform (``a = sqrt(5)``, i.e. uniform in ``±1/sqrt(in)``), B zero, so a new adapter changes
nothing. Adapters are ``LoRAParam``s, a ``Param`` subtype, so that a filter can select them alone; they carry
logical axes (``layers``, and the layer's own input or output axis) and shard like the weights they adapt.

``save_peft`` writes ``adapter_config.json`` and ``adapter_model.safetensors`` that
``peft.PeftModel.from_pretrained`` loads; ``load_peft`` reads them back (from PEFT or from here), refusing
any PEFT setting this module does not implement; ``merge`` folds the adapters into the weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neo_jax import validate
from neo_jax.config import GPTNeoConfig
from neo_jax.hf import LAYER_PARAMS

# PEFT's module names -> where the layer sits in a block.
TARGETS = {
    "q_proj": ("attn", "q_proj"),
    "k_proj": ("attn", "k_proj"),
    "v_proj": ("attn", "v_proj"),
    "out_proj": ("attn", "out_proj"),
    "c_fc": ("mlp", "c_fc"),
    "c_proj": ("mlp", "c_proj"),
}
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


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


def _layers(model):
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
    for i, (name, dense) in enumerate(_layers(model)):
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
    for i, (_, dense) in enumerate(_layers(model)):
        if dense.lora is not None and dense.lora.config.dropout:
            layers = dense.lora.a.shape[0]
            dense.lora.keys = DropoutKey(jax.random.split(jax.random.fold_in(key, i), layers))
    return model


def has_dropout(model) -> bool:
    return any(dense.lora is not None and dense.lora.config.dropout for _, dense in _layers(model))


def has_lora(model) -> bool:
    return any(dense.lora is not None for _, dense in _layers(model))


def trainable(model):
    """What trains (and what a training checkpoint holds): the adapters alone if the model has any, else
    every parameter."""
    return LoRAParam if has_lora(model) else nnx.Param


def merge(model):
    """Fold every adapter into its layer's weight (``W + scale * B @ A``) and remove it, in place."""
    from neo_jax.quantize import is_quantized

    if is_quantized(model):
        raise ValueError(
            "this model's weights are int8: merge the adapters into the float base instead (load it with "
            "weights='float32' or 'bfloat16' and the same adapters)"
        )
    for _, dense in _layers(model):
        if dense.lora is None:
            continue
        lora = dense.lora
        delta = jnp.einsum("lor,lri->loi", lora.b[...], lora.a[...]) * lora.config.scale
        dense.kernel.set_value((dense.kernel[...].astype(jnp.float32) + delta).astype(dense.kernel.dtype))
        dense.lora = nnx.data(None)
    return model


# ---- PEFT's format -----------------------------------------------------------------------------------------
def _names(config: GPTNeoConfig, target: str) -> list[str]:
    """PEFT's tensor name stem of each layer's adapter on ``target``, in layer order."""
    suffix = next(s for s, path in LAYER_PARAMS.items() if path == (*TARGETS[target], "kernel"))
    return [f"{PREFIX}transformer.h.{i}.{suffix.removesuffix('.weight')}" for i in range(config.num_layers)]


# adapter_config.json keys read or harmless; every other key must hold a "not used" value (None, False, an
# empty container, bias "none"), so a PEFT feature neo_jax lacks (DoRA, modules_to_save, layer patterns,
# PiSSA-style inits that change the base weights, ...) is refused by name rather than silently dropped.
_READ = {"peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "init_lora_weights"}
_HARMLESS = {
    "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "megatron_core", "qalora_group_size", "loftq_config", "ensure_weight_tying",
}  # fmt: skip


def read_config(directory: str | os.PathLike) -> LoRAConfig:
    """The ``LoRAConfig`` of a PEFT adapter directory; a PEFT setting that neo_jax does not implement, or a
    malformed file, is a one-line ValueError naming the file."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise ValueError(f"{directory} is not a PEFT adapter directory: it has no {ADAPTER_CONFIG}")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-save the adapter") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object of LoRA settings, not {type(data).__name__}")
    if data.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {data['peft_type']!r} is not supported; neo_jax reads LORA adapters")
    for key, value in data.items():
        unused = value in (None, False, {}, []) or (key == "bias" and value == "none")
        if key not in _READ | _HARMLESS and not unused:
            raise ValueError(f"{path}: {key}={value!r} is not supported by neo_jax (plain LoRA on linear layers)")
    if data.get("init_lora_weights", True) not in (True, False, "gaussian"):
        raise ValueError(
            f"{path}: init_lora_weights={data['init_lora_weights']!r} changes the base weights; convert the adapter "
            "to a plain LoRA first (PEFT's path_initial_model_for_weight_conversion)"
        )
    targets = data.get("target_modules") or ["q_proj", "v_proj"]
    if targets == "all-linear":
        targets = list(TARGETS)
    if isinstance(targets, str):
        raise ValueError(f"{path}: target_modules as a pattern ({targets!r}) is not supported; list module names")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{path}: target_modules must be a list of module names, got {targets!r}")
    use_rslora = data.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise ValueError(f"{path}: use_rslora must be true or false, got {use_rslora!r}")
    try:
        return LoRAConfig(
            r=data.get("r", 8),
            alpha=data.get("lora_alpha", 8),
            dropout=data.get("lora_dropout", 0.0),
            targets=tuple(targets),
            use_rslora=use_rslora,
        )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}  # safetensors' names
LARGEST = 65504.0  # float16's largest value: no trained adapter holds anything near it


def _open_weights(directory: str | os.PathLike):
    """The adapter's safetensors file, opened (safetensors checks its header against the file's size)."""
    from safetensors import SafetensorError, safe_open

    weights = Path(directory) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ValueError(f"{directory} has no {ADAPTER_WEIGHTS} (adapters saved as .bin are not read)")
    try:
        return safe_open(weights, "np")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights} is not a readable safetensors file ({e}); re-save the adapter") from None


def check_adapter(directory: str | os.PathLike, config: GPTNeoConfig, *, tensors: bool = False):
    """Read a PEFT adapter's settings and check that its tensors fit a model of ``config`` (names, shapes and
    floating-point dtypes, from the safetensors header) and hold sound values (finite, within ±``LARGEST``),
    before any weights of the base load: adapters are small. Returns the ``LoRAConfig``, and with
    ``tensors`` also the tensors by name (float32)."""
    lora = read_config(directory)
    weights = Path(directory) / ADAPTER_WEIGHTS
    with _open_weights(directory) as f:
        header = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118
        shapes = {name: tuple(part.get_shape()) for name, part in header.items()}
        dtypes = {name: part.get_dtype() for name, part in header.items()}
        _check_names_and_shapes(directory, config, lora, shapes, dtypes)
        values = {}
        for name in shapes:
            value = f.get_tensor(name).astype(np.float32)
            if not np.isfinite(value).all() or np.abs(value).max(initial=0) > LARGEST:
                worst = value.flat[np.argmax(np.where(np.isnan(value), np.inf, np.abs(value)))]
                raise ValueError(
                    f"{weights}: {name} holds {worst:g}; adapter weights must be finite and within ±{LARGEST:g}: "
                    "the adapter is damaged (or diverged in training)"
                )
            values[name] = value
    return (lora, values) if tensors else lora


def _check_names_and_shapes(directory, config: GPTNeoConfig, lora: LoRAConfig, shapes: dict, dtypes: dict) -> None:
    weights = Path(directory) / ADAPTER_WEIGHTS
    expected = _shapes(config, lora)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{directory}: adapter tensors do not match GPT-Neo's layers: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise ValueError(
                f"{directory}: {name} has shape {shapes[name]} but this base model needs {shape}: "
                "the adapter was trained for another base model"
            )
        if dtypes[name] not in FLOAT_DTYPES:
            raise ValueError(f"{weights}: {name} is {dtypes[name]}; adapter weights are floating point")


def _shapes(config: GPTNeoConfig, lora: LoRAConfig) -> dict[str, tuple[int, ...]]:
    sizes = {"c_fc": (config.inner_size, config.hidden_size), "c_proj": (config.hidden_size, config.inner_size)}
    shapes = {}
    for target in lora.targets:
        d_out, d_in = sizes.get(target, (config.hidden_size, config.hidden_size))
        for stem in _names(config, target):
            shapes[f"{stem}.lora_A.weight"] = (lora.r, d_in)
            shapes[f"{stem}.lora_B.weight"] = (d_out, lora.r)
    return shapes


def load(model, directory: str | os.PathLike, checked: tuple | None = None):
    """Add the adapters of a PEFT directory to ``model`` (in place) and return it. ``checked``: what
    ``check_adapter(directory, model.config, tensors=True)`` already returned, so the file is not read again."""
    lora, tensors = checked or check_adapter(directory, model.config, tensors=True)
    add(model, lora)
    period = len(model.config.layer_period)
    for slot, dense_of in enumerate(model.periods):
        for target in lora.targets:
            dense = getattr(getattr(dense_of, TARGETS[target][0]), TARGETS[target][1])
            stems = _names(model.config, target)[slot::period]
            for param, which in ((dense.lora.a, "lora_A"), (dense.lora.b, "lora_B")):
                stacked = np.stack([tensors[f"{stem}.{which}.weight"] for stem in stems])
                old = param.get_value()
                param.set_value(jax.device_put(stacked, getattr(old, "sharding", None)))
    return model


def save(model, directory: str | os.PathLike, *, base_model: str | None = None, overwrite: bool = False) -> Path:
    """Write ``model``'s adapters as a PEFT adapter directory (``adapter_config.json`` and
    ``adapter_model.safetensors``); ``base_model`` goes into ``base_model_name_or_path``."""
    from safetensors.numpy import save_file

    from neo_jax.checkpoints import atomic_directory, check_destination

    layers = [(name, dense) for name, dense in _layers(model) if dense.lora is not None]
    if not layers:
        raise ValueError("this model has no LoRA adapters to save")
    settings = layers[0][1].lora.config
    targets = [t for t in TARGETS if t in {name for name, _ in layers}]
    out = check_destination(directory, overwrite=overwrite)
    period = len(model.config.layer_period)
    tensors = {}
    for slot, period_blocks in enumerate(model.periods):
        for target in targets:
            dense = getattr(getattr(period_blocks, TARGETS[target][0]), TARGETS[target][1])
            stems = _names(model.config, target)[slot::period]
            a, b = np.asarray(jax.device_get(dense.lora.a[...])), np.asarray(jax.device_get(dense.lora.b[...]))
            for i, stem in enumerate(stems):
                tensors[f"{stem}.lora_A.weight"] = np.ascontiguousarray(a[i], np.float32)
                tensors[f"{stem}.lora_B.weight"] = np.ascontiguousarray(b[i], np.float32)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "use_rslora": settings.use_rslora,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    with atomic_directory(out) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out
