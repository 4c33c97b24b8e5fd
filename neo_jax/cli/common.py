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
    """JAX's persistent compilation cache, so a second run skips compiling (``--compilation-cache``,
    ``$NEO_JAX_COMPILATION_CACHE``, default ``~/.cache/neo_jax/jax``; ``none`` turns it off)."""
    import jax

    directory = directory or os.environ.get("NEO_JAX_COMPILATION_CACHE") or "~/.cache/neo_jax/jax"
    if directory.lower() != "none":
        jax.config.update("jax_compilation_cache_dir", str(Path(directory).expanduser()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
