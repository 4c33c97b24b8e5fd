"""Weight formats for inference: ``float32``, ``bfloat16``, and ``int8`` weight-only.

``int8`` stores every block matmul's kernel (q, k, v, out_proj, c_fc, c_proj) as int8 with one float32 scale
per output channel, symmetric (``kernel ≈ int8 * scale``, the scale from the channel's absolute maximum), as
``qwix.quantize`` computes it. A layer then computes ``(x @ int8.T) * scale`` in its compute dtype:
activations and the KV cache keep the compute dtype. The token embedding, which is also the tied LM head,
is int8 too, with one scale per token row: a row's embedding is ``int8[token] * scale[token]``, and the
head's logit for a token is ``(h @ int8[token]) * scale[token]``, again one scale per output channel.
Without it the 125M model would keep 40 % of its bytes in the float32 table. The position embedding, the
LayerNorms and the biases keep their stored dtype: together they are about 1 % of the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from neo_jax.config import WEIGHTS


def check_weights(weights: str) -> str:
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    return weights


def _dense_layers(model):
    """The blocks' Dense layers (a task head keeps its float weights: it is tiny)."""
    from neo_jax.model import Dense

    return [module for _, module in nnx.iter_modules(model.periods) if isinstance(module, Dense)]


def is_quantized(model) -> bool:
    return model.wte_scale is not None


def to_int8(model):
    """Quantize ``model``'s block matmul kernels (a scale per output channel) and its token embedding (a scale
    per token) to int8, in place, one weight at a time so that each float weight is let go as it goes;
    returns ``model``. On a mesh the int8 arrays keep the float weights' shards and the scales follow the
    output axis."""
    import qwix

    from neo_jax.sharding import model_mesh, variable_sharding

    if is_quantized(model):
        raise ValueError("this model's weights are already int8")
    mesh = model_mesh(model)

    def int8(weight: nnx.Param) -> tuple[nnx.Param, nnx.Param]:
        """(int8 values, float32 scales) of ``weight``, per channel of all but its last axis."""
        axes = weight.get_metadata()["out_sharding"]
        channels = tuple(range(weight.ndim - 1))
        quantized = qwix.quantize(weight[...].astype(jnp.float32), jnp.int8, channelwise_axes=channels)
        values = nnx.Param(quantized.qvalue, out_sharding=axes, eager_sharding=False)
        scale = nnx.Param(quantized.scale[..., 0], out_sharding=axes[:-1], eager_sharding=False)
        if mesh is not None:
            for param in (values, scale):
                param.set_value(jax.device_put(param.get_value(), variable_sharding(param, mesh)))
        return values, scale

    for dense in _dense_layers(model):  # kernels [layers, out, in]: one scale per layer and output channel
        dense.kernel, dense.scale = int8(dense.kernel)
    model.wte.embedding, model.wte_scale = int8(model.wte.embedding)  # [vocab, embed]: one per token
    return model
