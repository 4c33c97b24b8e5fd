"""Hugging Face GPT-Neo checkpoints: the name map between their tensors and neo_jax's parameters, the reader
of safetensors and ``pytorch_model.bin`` weight sets, the tokenizer, and the safetensors
writer.

One name map (``LAYER_PARAMS`` / ``TOP_PARAMS``) drives import, export and validation; tensors keep their
PyTorch layout (kernels are ``[out, in]`` on both sides), so a layer's tensor is a slice of a stacked one.
Tensors move one stacked parameter at a time, so host memory stays near one copy of the model.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from neo_jax.checkpoints import ORBAX_DIR
from neo_jax.config import GPTNeoConfig
from neo_jax.model import GPTNeo
from neo_jax.sharding import place

# ------------------------------------------------------------------------------------------- the name map
# Hugging Face name inside ``transformer.h.{i}.`` -> path inside one of our blocks.
LAYER_PARAMS = {
    "ln_1.weight": ("ln_1", "scale"),
    "ln_1.bias": ("ln_1", "bias"),
    "attn.attention.q_proj.weight": ("attn", "q_proj", "kernel"),
    "attn.attention.k_proj.weight": ("attn", "k_proj", "kernel"),
    "attn.attention.v_proj.weight": ("attn", "v_proj", "kernel"),
    "attn.attention.out_proj.weight": ("attn", "out_proj", "kernel"),
    "attn.attention.out_proj.bias": ("attn", "out_proj", "bias"),
    "ln_2.weight": ("ln_2", "scale"),
    "ln_2.bias": ("ln_2", "bias"),
    "mlp.c_fc.weight": ("mlp", "c_fc", "kernel"),
    "mlp.c_fc.bias": ("mlp", "c_fc", "bias"),
    "mlp.c_proj.weight": ("mlp", "c_proj", "kernel"),
    "mlp.c_proj.bias": ("mlp", "c_proj", "bias"),
}
TOP_PARAMS = {
    "transformer.wte.weight": ("wte", "embedding"),
    "transformer.wpe.weight": ("wpe", "embedding"),
    "transformer.ln_f.weight": ("ln_f", "scale"),
    "transformer.ln_f.bias": ("ln_f", "bias"),
}
# A task's head (config.task) -> its tensors, outside ``transformer.``.
HEAD_PARAMS = {
    "sequence-classification": {"score.weight": ("head", "kernel")},
    "token-classification": {"classifier.weight": ("head", "kernel"), "classifier.bias": ("head", "bias")},
    "question-answering": {"qa_outputs.weight": ("head", "kernel"), "qa_outputs.bias": ("head", "bias")},
}
# In checkpoints but not parameters: the tied head, and the mask buffers old checkpoints carry.
IGNORED = re.compile(r"lm_head\.weight|transformer\.h\.\d+\.attn\.attention\.(bias|masked_bias)")

# Files that travel with the weights: the tokenizer's and the generation defaults.
COMPANION_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_WEIGHTS, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


def param_layout(config: GPTNeoConfig) -> dict[tuple, list[str]]:
    """Our parameter path -> the Hugging Face tensors stacked into it, in stacking order."""
    layout: dict[tuple, list[str]] = {path: [name] for name, path in TOP_PARAMS.items()}
    layout.update({path: [name] for name, path in HEAD_PARAMS.get(config.task, {}).items()})
    period = len(config.layer_period)
    for slot in range(period):
        for suffix, path in LAYER_PARAMS.items():
            layers = range(slot, config.num_layers, period)
            layout[("periods", slot, *path)] = [f"transformer.h.{i}.{suffix}" for i in layers]
    return layout


def hf_shapes(layout: dict[tuple, list[str]], values: dict) -> dict[str, tuple[tuple, np.dtype]]:
    """Hugging Face tensor name -> (shape, dtype), from our parameters (arrays or ShapeDtypeStructs) by path."""
    shapes = {}
    for path, names in layout.items():
        value = values[path]
        shape = tuple(value.shape[1:] if path[0] == "periods" else value.shape)
        shapes.update({name: (shape, value.dtype) for name in names})
    return shapes


# ------------------------------------------------------------------------------------------- reading
class HFCheckpoint:
    """Lazy view of a Hugging Face weight set: tensor name -> shape, and one tensor loaded at a time.

    safetensors files are opened per read so that the memory map of a multi-gigabyte file is released
    again instead of staying resident; ``pytorch_model.bin`` is memory-mapped through torch.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        if (directory / SAFE_INDEX).exists() or (directory / SAFE_WEIGHTS).exists():
            self.kind = "safetensors"
            self.files, self.shapes = {}, {}
            for file in _weight_files(directory, SAFE_INDEX, SAFE_WEIGHTS):
                with self._open_safetensors(file) as f:
                    for name in f.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
                        self.files[name] = file
                        self.shapes[name] = tuple(f.get_slice(name).get_shape())
        elif (directory / BIN_INDEX).exists() or (directory / BIN_WEIGHTS).exists():
            self.kind = "bin"
            self.tensors = {}
            for file in _weight_files(directory, BIN_INDEX, BIN_WEIGHTS):
                self.tensors.update(self._load_bin(file))
            self.shapes = {name: tuple(t.shape) for name, t in self.tensors.items()}
        else:
            raise missing_weights(directory)
        if self.shapes and not any(name.startswith("transformer.") for name in self.shapes):
            # Saved from GPTNeoModel (no LM head): names lack the "transformer." prefix.
            self.renamed = {f"transformer.{name}": name for name in self.shapes}
            self.shapes = {f"transformer.{name}": shape for name, shape in self.shapes.items()}
        else:
            self.renamed = {name: name for name in self.shapes}

    @contextmanager
    def _open_safetensors(self, file: str):
        from safetensors import SafetensorError, safe_open

        path = self.directory / file
        if not path.exists():
            raise FileNotFoundError(f"weight file {path} is missing (listed in {SAFE_INDEX}); re-download it")
        try:
            handle = safe_open(path, framework="numpy")
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}); re-download or re-export it") from None
        with handle as f:
            yield f

    def _load_bin(self, file: str) -> dict:
        torch = import_torch("read pytorch_model.bin checkpoints")
        path = self.directory / file
        if not path.exists():
            raise FileNotFoundError(f"weight file {path} is missing (listed in {BIN_INDEX}); re-download it")
        try:
            # mmap reads only the zip format (torch >= 1.6); a legacy file is read whole, as transformers does
            return torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:
            raise ValueError(f"{path} is not a readable PyTorch checkpoint ({e}); re-download it") from None

    def load(self, name: str) -> np.ndarray:
        """One tensor as a numpy array in its stored dtype (bfloat16 via ml_dtypes), checked to hold only
        finite values as it is read."""
        stored = self.renamed[name]
        if self.kind == "safetensors":
            with self._open_safetensors(self.files[stored]) as f:
                tensor = f.get_tensor(stored)
        elif str(self.tensors[stored].dtype) == "torch.bfloat16":
            import torch

            tensor = self.tensors[stored].view(torch.int16).numpy().view(jnp.bfloat16)
        else:
            tensor = self.tensors[stored].numpy()
        if has_nonfinite(tensor):
            raise ValueError(
                f"{name} in {self.directory} holds NaN or infinite values; the weights are damaged: re-download "
                "or re-export them"
            )
        return tensor


def missing_weights(directory: Path) -> FileNotFoundError:
    """The error for a model directory without weights, naming what was looked for."""
    return FileNotFoundError(
        f"no weights in {directory}: expected {SAFE_WEIGHTS}, {SAFE_INDEX} (sharded), {BIN_WEIGHTS} "
        f"or {BIN_INDEX}, or a '{ORBAX_DIR}/' folder written by save_pretrained(format='orbax')"
    )


def _weight_files(directory: Path, index_name: str, single_name: str) -> list[str]:
    """The weight files of a checkpoint: those its index json lists, or its single file."""
    index = directory / index_name
    if not index.exists():
        return [single_name]
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index} is not a valid weight index ({e!r}); re-download it") from None


def import_torch(purpose: str):
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"PyTorch is needed to {purpose}. Install the CPU build, e.g. `pip install torch==2.13.0` "
            "(or `pip install 'neo_jax[test]'`), or use a safetensors checkpoint instead."
        ) from None
    return torch


def check_checkpoint(config: GPTNeoConfig, checkpoint: HFCheckpoint, layout: dict, abstract_state: dict) -> None:
    """Raise one error listing every missing, unexpected or wrongly shaped tensor, before loading any."""
    expected = {name: shape for name, (shape, _) in hf_shapes(layout, abstract_state).items()}
    problems = [
        f"missing tensor {name} (expected shape {shape})"
        for name, shape in expected.items()
        if name not in checkpoint.shapes
    ]
    problems += [
        f"tensor {name} has shape {checkpoint.shapes[name]} but the config needs {shape}"
        for name, shape in expected.items()
        if name in checkpoint.shapes and checkpoint.shapes[name] != shape
    ]
    problems += [
        f"unexpected tensor {name} {shape}"
        for name, shape in checkpoint.shapes.items()
        if name not in expected and not IGNORED.fullmatch(name)
    ]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(
            f"the weights in {checkpoint.directory} do not match its config.json "
            f"({config.num_layers} layers, hidden_size {config.hidden_size}, vocab_size {config.vocab_size}):\n  {shown}"
        )


def load_tokenizer(directory: str | os.PathLike, **options):
    """The Hugging Face tokenizer saved beside a model (``transformers.AutoTokenizer``, with ``options``)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), **options)
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())
        raise ValueError(f"no usable tokenizer in {directory} ({reason}); pass tokenizer=... explicitly") from None
    if not tokenizer("hello")["input_ids"]:  # transformers builds an empty one from config.json without files
        raise ValueError(f"no tokenizer files in {directory}: save the model's tokenizer there, or pass tokenizer=...")
    return tokenizer


# 16-bit floats: (unsigned view, exponent bits); all exponent bits set is an infinity or NaN.
_EXPONENT_BITS = {np.dtype(np.float16): (np.uint16, 0x7C00), np.dtype(jnp.bfloat16): (np.uint16, 0x7F80)}


def has_nonfinite(tensor: np.ndarray) -> bool:
    """Whether a float tensor holds NaN or an infinity, in one pass: float32/64 by their sum (finite values
    that sum past the range are looked at again), 16-bit floats by their exponent bits."""
    if tensor.dtype in (np.float32, np.float64):
        return not np.isfinite(np.add.reduce(tensor, axis=None)) and not np.isfinite(tensor).all()
    if tensor.dtype in _EXPONENT_BITS:
        view, exponent = _EXPONENT_BITS[tensor.dtype]
        return bool(((tensor.view(view) & exponent) == exponent).any())
    return False


def load_hf(config, checkpoint: HFCheckpoint, state, param_dtype, placement, progress: bool):
    layout = param_layout(config)
    flat = nnx.to_flat_state(state)
    abstract = {path: variable.get_value() for path, variable in flat}
    check_checkpoint(config, checkpoint, layout, abstract)
    # Largest first: the transient host buffer then shares the peak with as little loaded model as possible.
    by_size = sorted(flat, key=lambda item: -abstract[item[0]].size)
    for path, variable in tqdm(
        by_size, desc=f"loading {checkpoint.directory.name}", unit="param", disable=not progress
    ):
        names = layout[path]
        if path[0] == "periods":
            buffer = np.empty(abstract[path].shape, param_dtype)
            for i, name in enumerate(names):
                buffer[i] = checkpoint.load(name)
        else:
            buffer = checkpoint.load(names[0]).astype(param_dtype, copy=False)
        variable.set_value(place(buffer, placement and placement(variable)))
        del buffer
    return nnx.from_flat_state(flat)


def hf_tensors(model: GPTNeo) -> dict[str, Callable[[], np.ndarray]]:
    """Hugging Face tensor name -> function giving that tensor as a numpy array (on the CPU, a view)."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    tensors = {}
    for path, names in param_layout(model.config).items():
        value = flat[path].get_value()
        if path[0] == "periods":
            for i, name in enumerate(names):
                tensors[name] = lambda value=value, i=i: np.asarray(value[i])
        else:
            tensors[names[0]] = lambda value=value: np.asarray(value)
    return tensors


def copy_companion_files(source: Path, destination: Path) -> None:
    """The tokenizer and generation-config files of ``source`` that exist, into ``destination``."""
    for name in COMPANION_FILES:
        if (source / name).exists():
            shutil.copy(source / name, destination / name)


def save_safetensors(model: GPTNeo, directory: Path, max_shard_size, progress: str | bool) -> None:
    from huggingface_hub import split_state_dict_into_shards_factory

    # transformers' GPTNeoModel saves its tensors without the "transformer." of the classes with a head
    stored = (lambda name: name.removeprefix("transformer.")) if model.config.task == "feature-extraction" else str
    tensors = {stored(name): tensor for name, tensor in hf_tensors(model).items()}
    values = {path: v.get_value() for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    shapes = {
        stored(name): jax.ShapeDtypeStruct(*spec)
        for name, spec in hf_shapes(param_layout(model.config), values).items()
    }
    split = split_state_dict_into_shards_factory(
        shapes,
        get_storage_size=lambda s: s.size * s.dtype.itemsize,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    bar = tqdm(
        total=len(tensors), desc=progress if isinstance(progress, str) else None, unit="tensor", disable=not progress
    )
    for filename, names in split.filename_to_tensors.items():
        write_safetensors(directory / filename, {name: shapes[name] for name in names}, tensors, bar.update)
    bar.close()
    if split.is_sharded:
        index = {
            "metadata": {"total_size": sum(s.size * s.dtype.itemsize for s in shapes.values())},
            "weight_map": split.tensor_to_filename,
        }
        (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}


def write_safetensors(path: Path, specs: dict[str, jax.ShapeDtypeStruct], tensors: dict, on_tensor=None) -> None:
    """Write a safetensors file one tensor at a time.

    ``safetensors.numpy.save_file`` needs every tensor of a file in memory at once, which would double
    the host memory of an export; the format (8-byte header length, JSON header, raw little-endian data)
    lets us stream instead. ``metadata.format = "pt"`` is what transformers expects.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, spec in specs.items():
        size = spec.size * spec.dtype.itemsize
        dtype = SAFETENSORS_DTYPES[spec.dtype.name]
        header[name] = {"dtype": dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in specs:
            tensors[name]().tofile(f)
            if on_tensor:
                on_tensor()
