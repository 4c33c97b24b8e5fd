"""neo_jax: GPT-Neo in JAX / Flax NNX, exact to transformers' PyTorch model.

The names below are imported on first use, so that a process needing one module (a data-preparation worker,
say) does not import JAX and Flax with the package.
"""

import importlib

_EXPORTS = {
    "GPTNeo": "neo_jax.model",
    "GPTNeoConfig": "neo_jax.config",
    "TextGenerator": "neo_jax.generation",
    "encode": "neo_jax.embed",
    "from_pretrained": "neo_jax.convert",
    "generate": "neo_jax.generation",
    "init_model": "neo_jax.model",
    "make_mesh": "neo_jax.sharding",
    "pipeline": "neo_jax.pipelines",
    "save_pretrained": "neo_jax.convert",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'neo_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return sorted([*globals(), *_EXPORTS])
