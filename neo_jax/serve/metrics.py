"""The server's Prometheus metrics, in a registry of their own (so that two engines in one process, as in
tests, never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds: from a fast CPU step to a slow prefill behind a long queue.
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_length = Gauge("neo_jax_queue_length", "Requests waiting for a slot", registry=r)
        self.active_slots = Gauge("neo_jax_active_slots", "Slots generating a request", registry=r)
        self.generated_tokens = Counter("neo_jax_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("neo_jax_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.embedding_requests = Counter("neo_jax_embedding_requests", "Inputs embedded", registry=r)
        self.embedding_tokens = Counter("neo_jax_embedding_tokens", "Tokens of the inputs embedded", registry=r)
        self.requests = Counter("neo_jax_requests", "Finished sequences", ["finish_reason"], registry=r)
        self.prefix_cache_hits = Counter(
            "neo_jax_prefix_cache_hits", "Requests that reused cached prompt blocks", registry=r
        )
        self.prefix_cache_misses = Counter(
            "neo_jax_prefix_cache_misses", "Requests that found no cached prompt block", registry=r
        )
        self.prefix_cache_tokens = Counter(
            "neo_jax_prefix_cache_tokens", "Prompt tokens taken from the prefix cache, not prefilled", registry=r
        )
        self.prefix_cache_blocks = Gauge("neo_jax_prefix_cache_blocks", "Blocks held by the prefix cache", registry=r)
        self.spec_decode_drafts = Counter(
            "neo_jax_spec_decode_drafts", "Speculative proposals: one per decoding row per round", registry=r
        )
        self.spec_decode_draft_tokens = Counter(
            "neo_jax_spec_decode_draft_tokens", "Draft tokens proposed to the model", registry=r
        )
        self.spec_decode_accepted_tokens = Counter(
            "neo_jax_spec_decode_accepted_tokens", "Draft tokens the model accepted", registry=r
        )
        self.time_to_first_token = Histogram(
            "neo_jax_time_to_first_token_seconds", "From submission to the first token", buckets=_LATENCY, registry=r
        )
        self.inter_token_latency = Histogram(
            "neo_jax_inter_token_latency_seconds",
            "Between consecutive tokens of a sequence",
            buckets=_LATENCY,
            registry=r,
        )
