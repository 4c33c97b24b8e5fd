"""Hugging Face PEFT's LoRA adapter format: read a PEFT directory (refusing any PEFT setting neo_jax does not
implement), check it against a base model before the base loads, and write one that
``peft.PeftModel.from_pretrained`` loads. The adapter layer itself is ``neo_jax.lora``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from neo_jax.checkpoints import atomic_directory, check_destination
from neo_jax.config import GPTNeoConfig
from neo_jax.hf import HEAD_PARAMS, LAYER_PARAMS
from neo_jax.lora import TARGETS, LoRAConfig, adapted_layers, add

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
TASK_TYPES = {  # neo_jax's tasks as PEFT's task_type
    "causal-lm": "CAUSAL_LM",
    "feature-extraction": "FEATURE_EXTRACTION",
    "sequence-classification": "SEQ_CLS",
    "token-classification": "TOKEN_CLS",
    "question-answering": "QUESTION_ANS",
}
PREFIX = "base_model.model."


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


def check_adapter(directory: str | os.PathLike, config: GPTNeoConfig) -> tuple[LoRAConfig, dict[str, np.ndarray]]:
    """Read a PEFT adapter's settings and check that its tensors fit a model of ``config`` (names, shapes and
    floating-point dtypes, from the safetensors header) and hold sound values (finite, within ±``LARGEST``),
    before any weights of the base load: adapters are small. Returns the ``LoRAConfig`` and the tensors by
    name (float32)."""
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
    return lora, values


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


def by_target(config: GPTNeoConfig, checked: tuple[LoRAConfig, dict[str, np.ndarray]]) -> dict:
    """A checked adapter's tensors (``check_adapter``) as ``{target: (a, b)}``, each stacked over every layer
    of the model (``[layers, r, in]``, ``[layers, out, r]``): what ``lora.add_many`` takes."""
    lora, tensors = checked
    stack = lambda target, which: np.stack([tensors[f"{stem}.{which}.weight"] for stem in _names(config, target)])
    return {target: (stack(target, "lora_A"), stack(target, "lora_B")) for target in lora.targets}


def load(model, directory: str | os.PathLike, checked: tuple[LoRAConfig, dict[str, np.ndarray]] | None = None):
    """Add the adapters of a PEFT directory to ``model`` (in place) and return it. ``checked``: what
    ``check_adapter(directory, model.config)`` already returned, so the file is not read again."""
    lora, tensors = checked or check_adapter(directory, model.config)
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

    layers = [(name, dense) for name, dense in adapted_layers(model) if dense.lora is not None]
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
    head = HEAD_PARAMS.get(model.config.task, {})  # a task head trains whole: PEFT's modules_to_save
    for name, path in head.items():
        value = nnx.to_flat_state(nnx.state(model, nnx.Param))
        tensors[PREFIX + name] = np.ascontiguousarray(jax.device_get(dict(value)[path].get_value()), np.float32)
    config = {
        "peft_type": "LORA",
        "task_type": TASK_TYPES[model.config.task],
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
        "modules_to_save": sorted({name.split(".")[0] for name in head}) or None,
        "inference_mode": True,
    }
    with atomic_directory(out) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out
