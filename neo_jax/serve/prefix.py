"""The prefix cache's bookkeeping (vLLM's automatic prefix caching, block-granular): which pool block holds
the keys and values of which prompt block, found by a hash of the block's tokens chained to its prefix's
(so a block's hash names its position and everything before it, and the adapter that computed it), evicted
least recently used when the pool is full. The device side (the pool, its writes and reads) is in
``neo_jax.generation.batching``.

A block can also keep the log-probabilities of its tokens (``echo`` with ``logprobs``), filled by the first
request that asked for them: a cache hit then returns the same ``token_logprobs`` and ``top_logprobs`` as
the prefill it saves.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import numpy as np

from neo_jax.generation.batching import BLOCK


@dataclasses.dataclass
class Block:
    index: int  # in the pool
    logprobs: list | None = None  # per token of the block: (logprob, top ids, top logprobs); None for token 0


def hashes(prompt: list[int], adapter: int) -> list[bytes]:
    """The chained hash of each whole block of ``prompt`` computed with ``adapter``."""
    out, parent = [], np.int64(adapter).tobytes()
    for start in range(0, len(prompt) - BLOCK + 1, BLOCK):
        parent = hashlib.blake2b(parent + np.asarray(prompt[start : start + BLOCK], np.int64).tobytes()).digest()
        out.append(parent)
    return out


class PrefixCache:
    """``capacity`` pool blocks, kept by hash, least recently used first out."""

    def __init__(self, capacity: int, metrics=None):
        self.capacity, self.metrics = capacity, metrics
        self.blocks: collections.OrderedDict[bytes, Block] = collections.OrderedDict()
        self.free = list(range(capacity))

    def lookup(self, chain: list[bytes], with_logprobs: bool) -> list[Block]:
        """The longest run of ``chain``'s blocks from the first that are cached (with their log-probabilities
        if ``with_logprobs``), marked as just used."""
        found = []
        for key in chain:
            block = self.blocks.get(key)
            if block is None or (with_logprobs and block.logprobs is None):
                break
            self.blocks.move_to_end(key)
            found.append(block)
        return found

    def allocate(self, key: bytes) -> int | None:
        """A pool block for ``key`` (the least recently used one if none is free), or None if it is cached."""
        if key in self.blocks:
            self.blocks.move_to_end(key)
            return None
        if self.free:
            index = self.free.pop()
        else:
            index = self.blocks.popitem(last=False)[1].index
        self.blocks[key] = Block(index)
        if self.metrics:
            self.metrics.prefix_cache_blocks.set(len(self.blocks))
        return index

    def record(self, reused: int) -> None:
        """Count one request that found ``reused`` prompt tokens in the cache."""
        if self.metrics:
            (self.metrics.prefix_cache_hits if reused else self.metrics.prefix_cache_misses).inc()
            self.metrics.prefix_cache_tokens.inc(reused)
