"""What several commands share: help texts and the compilation cache."""

from __future__ import annotations

import os
from pathlib import Path

WEIGHTS_HELP = "weight format: float32, bfloat16, or int8 weight-only (neo_jax.quantize); default: --dtype"
ATTENTION_HELP = "attention implementation: auto, dense, blockwise, splash (TPU) or cudnn (GPU); see neo_jax.attention"
MODEL_HELP = "hub id, Hugging Face directory, Orbax directory or train output"
ADAPTER_HELP = "a PEFT LoRA adapter directory to apply (unmerged)"
CACHE_HELP = "JAX compilation cache directory ('none' to disable)"


def enable_compilation_cache(directory: str | None) -> None:
    """JAX's persistent compilation cache, so a second run skips compiling: ``--compilation-cache``, else
    ``$NEO_JAX_COMPILATION_CACHE``, else a cache JAX was already given (``$JAX_COMPILATION_CACHE_DIR``, kept
    with its own settings), else ``~/.cache/neo_jax/jax``; ``none`` turns it off."""
    import jax

    directory = directory or os.environ.get("NEO_JAX_COMPILATION_CACHE")
    if directory is None and jax.config.jax_compilation_cache_dir:  # pyright: ignore[reportAttributeAccessIssue]
        return
    directory = directory or "~/.cache/neo_jax/jax"
    if directory.lower() == "none":
        jax.config.update("jax_compilation_cache_dir", None)
        return
    jax.config.update("jax_compilation_cache_dir", str(Path(directory).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
