"""``from_pretrained`` and ``save_pretrained``: thin dispatchers over the formats, Hugging Face
(``neo_jax.hf``) and neo_jax's Orbax directories (``neo_jax.checkpoints``)."""

from __future__ import annotations

import logging
import os
import weakref
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neo_jax import lora, peft
from neo_jax.attention import check_implementation
from neo_jax.checkpoints import ORBAX_DIR, atomic_directory, check_destination, load_orbax, save_orbax
from neo_jax.config import TASKS, GPTNeoConfig
from neo_jax.hf import (
    HEAD_PARAMS,
    HFCheckpoint,
    copy_companion_files,
    has_nonfinite,
    load_hf,
    missing_weights,
    save_safetensors,
)
from neo_jax.model import GPTNeo, task_head
from neo_jax.quantize import check_weights, is_quantized, to_int8
from neo_jax.sharding import place, variable_sharding
from neo_jax.source import Adapter, Source, resolve

__all__ = ["abstract_model", "from_pretrained", "save_pretrained", "source_of"]
log = logging.getLogger(__name__)


def abstract_model(
    config: GPTNeoConfig, dtype=jnp.float32, param_dtype=jnp.float32, attention: str = "auto", *, int8: bool = False
):
    """(graphdef, param state of ShapeDtypeStructs): the model's structure without allocating it; ``int8``:
    with int8 block and embedding weights (``neo_jax.quantize``)."""

    def create():
        model = GPTNeo(config, dtype=dtype, param_dtype=param_dtype, attention=attention, rngs=nnx.Rngs(0))
        return to_int8(model) if int8 else model

    return nnx.split(nnx.eval_shape(create))


def from_pretrained(
    src: str | os.PathLike | Source,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    revision: str | None = None,
    mesh=None,
    rules=None,
    attention: str = "auto",
    progress: bool = True,
    adapter: str | os.PathLike | None = None,
    weights: str | None = None,
    task: str | None = None,
    num_labels: int | None = None,
) -> GPTNeo:
    """Load GPT-Neo from a hub id, a local Hugging Face directory, a neo_jax Orbax directory, a ``neo-jax
    train`` output, or a ``neo_jax.source.Source`` already resolved.

    ``task`` (``neo_jax.config.TASKS``: "causal-lm", "feature-extraction", "sequence-classification",
    "token-classification", "question-answering") is the head the model gets; by default the checkpoint's
    own, from its ``config.json``'s ``architectures``. Another task's checkpoint gets a freshly initialised
    head (and loses its own), each named in a one-line notice, as transformers does. ``num_labels``: a new
    classifier head's outputs (default 2); it must equal a classifier checkpoint's own.

    ``dtype`` is the compute dtype, ``param_dtype`` the dtype parameters are stored in. ``weights``
    ("float32", "bfloat16" or "int8", ``neo_jax.quantize``) is the weight format: the first two replace
    ``param_dtype``; "int8" quantizes the block matmuls' kernels and the token embedding as they load
    (weight-only, one scale per output channel or token), the rest staying in ``param_dtype``. With a ``mesh``
    (``neo_jax.make_mesh``) each tensor goes straight into its shards as it is read, by the logical-axis
    ``rules`` of ``neo_jax.sharding`` (default ``DEFAULT_RULES``): no device holds a full replicated copy.
    ``attention`` picks the attention implementation (``neo_jax.attention``: auto, dense, blockwise, cudnn).
    ``adapter``: a PEFT LoRA adapter directory (or hub id) to add, unmerged (``neo_jax.peft``); it is checked
    against the base model's shapes before any weights load.
    """
    check_implementation(attention)  # before anything is downloaded or read
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if weights is not None and check_weights(weights) != "int8":  # int8 leaves param_dtype to the rest
        param_dtype = jnp.dtype(weights)
    source = src if isinstance(src, Source) else resolve(src, revision)
    stored = (source.base or source).config  # what the weights hold; a LoRA run's own config may add a head
    config = source.config.with_task(task, num_labels)  # checked before any weights are read
    if adapter is not None:
        source = source.with_adapter(adapter)  # checked before the base's weights load
    placement = None if mesh is None else partial(variable_sharding, mesh=mesh, rules=rules)
    dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
    model = _load(source.base or source, placement, progress, dtype, param_dtype, attention, weights)
    if config.task != stored.task:  # a LoRA run's trained head comes with its adapters, below
        _new_head(model, config, source.name, placement, quiet=source.adapter is not None and config == source.config)
    if source.adapter is not None:
        _add_adapter(model, source.adapter, source.require_directory(), placement)
    _SOURCES[model] = source.directory
    return model


def _load(source: Source, placement, progress: bool, dtype, param_dtype, attention: str, weights) -> GPTNeo:
    """The weights of ``source`` (a LoRA run's base, itself a source without adapters), as stored."""
    if source.int8 and weights not in (None, "int8"):
        raise ValueError(
            f"{source.directory} holds int8 weights (saved from weights='int8'): load it with weights='int8', or "
            "save the model from its float weights instead"
        )
    if source.weights is None:  # a config alone: no weights to read
        raise missing_weights(source.require_directory())
    graphdef, state = abstract_model(source.config, dtype, param_dtype, attention, int8=source.int8)
    if source.format == "hf":
        state = load_hf(source.config, HFCheckpoint(source.weights), state, param_dtype, placement, progress)
    else:
        state = load_orbax(source.weights, state, placement)
        check_finite(state, source.require_directory())
    model = nnx.merge(graphdef, state)
    model.config = source.config  # with its label names
    return to_int8(model) if weights == "int8" and not source.int8 else model


def _new_head(model: GPTNeo, config: GPTNeoConfig, name: str, placement, quiet: bool = False) -> None:
    """Give ``model`` the head of ``config``'s task, freshly initialised (in place), saying which of the
    checkpoint's weights were left out and which are new, in transformers' words (unless ``quiet``)."""
    left_out, new = ([] if quiet else list(HEAD_PARAMS.get(c.task, {})) for c in (model.config, config))
    if left_out:
        log.warning(
            f"Some weights of the model checkpoint at {name} were not used when initializing "
            f"{TASKS[config.task]}: {left_out}"
        )
    if new:
        log.warning(
            f"Some weights of {TASKS[config.task]} were not initialized from the model checkpoint at {name} "
            f"and are newly initialized: {new}; train them before using the model's outputs"
        )
    model.config = config
    head = task_head(config, param_dtype=model.wpe.embedding.get_value().dtype, rngs=nnx.Rngs(0))
    if head is not None and placement is not None:
        for _, variable in nnx.to_flat_state(nnx.state(head, nnx.Param)):
            variable.set_value(place(np.asarray(variable.get_value()), placement(variable)))
    model.head = nnx.data(head)


def _add_adapter(model: GPTNeo, adapter: Adapter, directory: Path, placement) -> None:
    """The adapters onto ``model``, in place: a PEFT directory's, or a LoRA run's (in ``directory``) latest
    checkpoint's."""
    if adapter.format == "peft":
        checked = None if adapter.tensors is None else (adapter.lora, adapter.tensors)
        peft.load(model, adapter.directory, checked)  # read again only if no tensors came with the source
        return
    lora.add(model, adapter.lora)
    adapters = load_orbax(adapter.directory, nnx.state(model, lora.trainable(model)), placement)  # and a head
    check_finite(adapters, directory)
    nnx.update(model, adapters)


def check_finite(state, directory: Path) -> None:
    """A ValueError naming the first parameter that holds NaN or an infinity, read shard by shard from where
    the weights are (``hf.has_nonfinite``: one pass, no program to compile). Hugging Face weights are checked
    as they are read (``HFCheckpoint.load``)."""
    for path, variable in nnx.to_flat_state(state):
        value = variable.get_value()
        parts = [shard.data for shard in value.addressable_shards] if isinstance(value, jax.Array) else [value]
        if any(has_nonfinite(np.asarray(part)) for part in parts):
            raise ValueError(
                f"{directory}: {'.'.join(map(str, path))} holds NaN or infinite values; the weights are damaged "
                "(or a training run diverged): restore them from a good copy"
            )


_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the directory it was read from


def source_of(model: GPTNeo) -> Path | None:
    """The directory ``from_pretrained`` read ``model`` from (where its tokenizer and generation-config files
    are), or None. Kept beside the model, not on it: the module holds architecture only, so two models of
    one shape from different directories share their compiled programs."""
    return _SOURCES.get(model)


def save_pretrained(
    model: GPTNeo,
    out_dir: str | os.PathLike,
    *,
    format: str = "hf",
    max_shard_size: int | str = "2GB",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write ``model`` to ``out_dir``.

    ``format="hf"``: ``config.json`` and ``model.safetensors`` (sharded with an index above
    ``max_shard_size``) that ``transformers.GPTNeoForCausalLM.from_pretrained`` loads, plus the tokenizer
    and generation-config files of the directory the model was loaded from, if it had any. ``format="orbax"``:
    an Orbax checkpoint of the parameters in ``params/`` plus ``config.json``; ``from_pretrained`` reads both.
    int8 weights (``neo_jax.quantize``) are saved as they are, in "orbax" only. In a multi-host run every
    process calls this and Orbax writes the shards collectively; "hf" is for a single process.
    """
    if format not in ("hf", "orbax"):
        raise ValueError(f"format must be 'hf' or 'orbax', got {format!r}")
    if is_quantized(model) and format != "orbax":
        raise ValueError(
            "int8 weights are saved in Orbax's format only (format='orbax', which from_pretrained reloads without "
            "quantizing again); for Hugging Face's format save the model loaded with float weights"
        )
    if lora.has_lora(model):
        raise ValueError(
            "this model has LoRA adapters: fold them in first (neo_jax.lora.merge), or write the adapters alone "
            "with neo_jax.peft.save"
        )
    if format == "hf" and jax.process_count() > 1:
        raise ValueError(
            "format='hf' writes from one process: save with format='orbax' (collective), then convert on one "
            "host with `neo-jax convert DIR OUT --to hf`"
        )
    source = source_of(model)
    out_dir = check_destination(out_dir, overwrite, source)
    with atomic_directory(out_dir) as tmp:
        if jax.process_index() == 0:
            model.config.to_json_file(tmp / "config.json")
            if source is not None:
                copy_companion_files(source, tmp)
        if format == "hf":
            save_safetensors(model, tmp, max_shard_size, progress and f"writing {out_dir.name}")
        else:
            save_orbax(model, tmp / ORBAX_DIR)
    return out_dir
