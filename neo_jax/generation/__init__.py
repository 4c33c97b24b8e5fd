"""Text generation: KV cache, prefill, one jitted decode loop, samplers, beam search, ``TextGenerator``.

Shape of a call: the prompt is left-padded to a bucketed length and run through the model once (prefill),
which fills the KV cache; the tokens then come from one jitted ``lax.while_loop`` over single-token decode
steps that stops as soon as every row has finished. Positions come from the attention mask, as
transformers' ``generate`` derives them, so greedy output equals ``GPTNeoForCausalLM.generate``.

The cache holds keys and values per layer in ring buffers indexed by ``slot % length``: global layers keep
every slot (length = the whole sequence), local layers only their last ``window_size`` slots.

One concern per module: ``cache`` (KV cache, prefill, decode step), ``sampling`` (logit processors),
``loop`` (``stream``, ``generate``), ``beam`` (beam search), ``text`` (``TextGenerator``).
"""

from neo_jax.generation.beam import beam_search
from neo_jax.generation.cache import KVCache, cache_bucket, cache_bytes, cache_lengths, decode_step, init_cache, prefill
from neo_jax.generation.loop import compiled_programs, generate, stream
from neo_jax.generation.sampling import SamplingParams, check_beams, min_p, repetition_penalty, top_k, top_p
from neo_jax.generation.text import TextGenerator, check_stop

__all__ = [
    "KVCache",
    "SamplingParams",
    "TextGenerator",
    "beam_search",
    "cache_bucket",
    "cache_bytes",
    "cache_lengths",
    "check_beams",
    "check_stop",
    "compiled_programs",
    "decode_step",
    "generate",
    "init_cache",
    "min_p",
    "prefill",
    "repetition_penalty",
    "stream",
    "top_k",
    "top_p",
]
