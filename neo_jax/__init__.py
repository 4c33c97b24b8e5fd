"""neo_jax: GPT-Neo in JAX / Flax NNX, exact to transformers' PyTorch model."""

from neo_jax.config import GPTNeoConfig
from neo_jax.convert import from_pretrained, save_pretrained
from neo_jax.generation import TextGenerator, generate
from neo_jax.model import GPTNeo, init_model
from neo_jax.sharding import make_mesh

__all__ = [
    "GPTNeo",
    "GPTNeoConfig",
    "TextGenerator",
    "from_pretrained",
    "generate",
    "init_model",
    "make_mesh",
    "save_pretrained",
]
__version__ = "0.1.0"
