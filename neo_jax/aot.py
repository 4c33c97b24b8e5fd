"""Ahead-of-time compilation: the programs ``neo-jax train`` and ``neo-jax generate`` run, built from abstract
shapes (no weights read, nothing allocated) and compiled for a named TPU slice on any machine.

With ``libtpu`` installed (``pip install 'neo_jax[tpu]'``), ``jax.experimental.topologies`` describes the chips
of a slice, and ``jax.jit(...).lower(...).compile()`` runs the real XLA:TPU compiler here, on the CPU. What
``memory_analysis()`` reports is then XLA:TPU's own per-chip figure (``cost_analysis()`` too, but it counts
the body of a loop once, whatever its trip count)::

    from neo_jax import aot
    from neo_jax.config import GPTNeoConfig

    mesh = aot.slice_mesh("v5e-8")                     # every chip on fsdp, as neo-jax train runs
    step = aot.train_program(GPTNeoConfig.preset("1.3B"), mesh, batch=8, seq=2048, remat="full")
    print(aot.analyse(step))                            # per chip: temporaries, arguments, FLOPs, ...

The same functions take a mesh of real devices (``neo_jax.sharding.make_mesh``): on the CPU that is the fast
check of how memory scales in the tests.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from neo_jax import attention as attention_impls
from neo_jax import sharding
from neo_jax.config import GPTNeoConfig
from neo_jax.model import GPTNeo

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip's published figures: HBM, peak bfloat16 matmul FLOP/s, HBM bandwidth (bytes/s)."""

    name: str
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float


# Google Cloud's published per-chip figures (cloud.google.com/tpu/docs/system-architecture-tpu-vm).
CHIPS = {
    "v4": Chip("TPU v4", 32 * GIB, 275e12, 1228e9),
    "v5e": Chip("TPU v5e", 16 * GIB, 197e12, 819e9),
    "v5p": Chip("TPU v5p", 95 * GIB, 459e12, 2765e9),
    "v6e": Chip("TPU v6e", 32 * GIB, 918e12, 1640e9),
}
# Slice name -> the chip grid jax.experimental.topologies describes. v4 and v5p slices are named by
# TensorCores (two per chip) and run as megacore, one device per chip; v5e and v6e by chips.
_GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"}
TOPOLOGIES = {
    **{f"v5e-{n}": ("v5e", grid) for n, grid in _GRIDS_2D.items()},
    **{f"v6e-{n}": ("v6e", grid) for n, grid in _GRIDS_2D.items()},
    **{f"v4-{2 * n}": ("v4", grid) for n, grid in _GRIDS_3D.items()},
    **{f"v5p-{2 * n}": ("v5p", grid) for n, grid in _GRIDS_3D.items()},
}


def slice_chip(topology: str) -> Chip:
    """The chip of a named slice (``v5e-8`` -> TPU v5e)."""
    check_topology(topology)
    return CHIPS[TOPOLOGIES[topology][0]]


def slice_size(topology: str) -> int:
    """How many devices (chips) a named slice has: ``v5e-8`` -> 8, ``v4-8`` -> 4 (megacore)."""
    check_topology(topology)
    return math.prod(int(n) for n in TOPOLOGIES[topology][1].split("x"))


def check_topology(topology: str) -> None:
    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown TPU topology {topology!r}; known: {', '.join(TOPOLOGIES)}")


def require_libtpu() -> None:
    """Fail with the install command when libtpu (the XLA:TPU compiler) is missing."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ImportError(
            "compiling for a TPU needs libtpu: pip install 'neo_jax[tpu]' (or --no-compile for the estimate)"
        ) from None


def slice_devices(topology: str) -> list:
    """The (abstract) devices of a named slice, e.g. ``v5e-8``, ``v4-8`` (4 chips), ``v5e-256``."""
    check_topology(topology)
    require_libtpu()
    from jax.experimental import topologies

    generation, grid = TOPOLOGIES[topology]
    options = {}
    if generation in ("v4", "v5p"):
        options["chip_config_name"] = "megacore"
    if grid in ("1x1", "1x1x1"):
        options["chips_per_host_bounds"] = (1, 1, 1)
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology)  # quiets libtpu's probing for a local chip
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no lock: several processes may compile at once
    return list(topologies.get_topology_desc(topology_name=f"{generation}:{grid}", platform="tpu", **options).devices)


def slice_mesh(topology: str, data: int = 1, fsdp: int = -1, tensor: int = 1) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh over a named slice's chips (default: every chip on fsdp)."""
    devices = slice_devices(topology)
    try:
        return sharding.make_mesh(data, fsdp, tensor, devices=devices)
    except ValueError as e:
        raise ValueError(f"{e} (slice {topology} has {len(devices)} chips)") from None


def _place(tree, mesh: Mesh, rules=None):
    """Give every abstract leaf of an NNX object its sharding on ``mesh`` (from its logical axis names,
    replicated where it has none), in place."""
    for _, variable in nnx.to_flat_state(nnx.state(tree)):
        value = variable.get_value()
        names = variable.get_metadata().get("out_sharding") or (None,) * len(value.shape)
        placed = NamedSharding(mesh, sharding.spec(names, value.shape, mesh, rules))
        variable.set_value(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=placed))
    return tree


def abstract_model(
    config: GPTNeoConfig,
    mesh: Mesh,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    attention="auto",
    rules=None,
    int8: bool = False,
):
    """A ``GPTNeo`` whose parameters are ``ShapeDtypeStruct`` s placed on ``mesh`` as ``from_pretrained(...,
    mesh=mesh)`` would place them; ``attention`` is checked against the slice's platform, not this host's;
    ``int8``: int8 weights, as ``from_pretrained(..., weights="int8")`` loads them."""
    from neo_jax.convert import abstract_model as unplaced

    with attention_impls.compiling_for(_platform(mesh)):
        return _place(nnx.merge(*unplaced(config, dtype, param_dtype, attention, int8=int8)), mesh, rules)


def _platform(mesh: Mesh) -> str:
    return mesh.devices.flat[0].platform


def _input(shape, dtype, mesh: Mesh, names=("batch",)):
    names = tuple(names) + (None,) * (len(shape) - len(names))
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, sharding.spec(names, shape, mesh)))


def check_train(config: GPTNeoConfig, mesh: dict, batch: int, seq: int, remat: str, grad_accum: int) -> None:
    """A train step's shapes against the mesh sizes: the micro-batch divides over data x fsdp, seq fits."""
    from neo_jax.model import REMAT_POLICIES

    replicas = mesh["data"] * mesh["fsdp"]
    if remat != "none" and remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of none, {', '.join(REMAT_POLICIES)}; got {remat!r}")
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    if batch < 1 or batch % grad_accum or (batch // grad_accum) % replicas:
        accumulated = f" times grad_accum = {grad_accum}" if grad_accum > 1 else ""
        raise ValueError(f"batch {batch} must be a positive multiple of data x fsdp = {replicas}{accumulated}")
    if not 2 <= seq <= config.max_position_embeddings:
        raise ValueError(f"seq {seq} must be in [2, max_position_embeddings={config.max_position_embeddings}]")


def train_program(
    config: GPTNeoConfig,
    mesh: Mesh,
    *,
    batch: int,
    seq: int,
    dtype=jnp.bfloat16,
    remat: str = "none",
    grad_accum: int = 1,
    optimizer=None,
    attention: str = "auto",
    lora=None,
    int8: bool = False,
) -> Lowered:
    """The full train step ``neo-jax train`` runs (float32 parameters and AdamW state, ``dtype`` compute,
    ``remat``, gradient accumulation, donation), lowered for ``mesh`` with a global batch of ``batch``
    sequences of ``seq`` tokens. ``optimizer``: a ``neo_jax.settings.OptimizerConfig`` (default settings);
    ``attention``: the implementation (``neo_jax.attention``); ``lora``: a ``neo_jax.lora.LoRAConfig`` to train
    adapters only, the frozen base stored in ``dtype`` as ``neo-jax train`` stores it (``int8``: in int8, as
    ``--lora-base int8`` stores it). A classifier config (``config.task``) trains its head on labels."""
    from neo_jax.train import compiled_train_step, make_optimizer

    check_train(config, dict(mesh.shape), batch, seq, remat, grad_accum)

    def create():
        param_dtype = jnp.float32 if lora is None else dtype
        model = GPTNeo(config, dtype=dtype, param_dtype=param_dtype, attention=attention, rngs=nnx.Rngs(0))
        if int8:
            from neo_jax.quantize import to_int8

            to_int8(model)
        if lora is not None:
            from neo_jax.lora import add

            add(model, lora)
        return model, make_optimizer(model, optimizer)

    with attention_impls.compiling_for(_platform(mesh)):  # which attention implementations may run
        model, opt = (_place(tree, mesh) for tree in nnx.eval_shape(create))
    ids = _input((batch, seq), jnp.int32, mesh)
    rng = _input((), jax.random.key(0).dtype, mesh, names=()) if lora is not None and lora.dropout else None
    # a classifier's labels (one per sequence, or per token): its head's loss, the ids doubling as the mask
    shape = {"sequence-classification": (batch,), "token-classification": (batch, seq)}.get(config.task)
    labels = None if shape is None else _input(shape, jnp.int32, mesh)
    with jax.set_mesh(mesh):
        return compiled_train_step.lower(model, opt, ids, ids, rng, labels, grad_accum=grad_accum, remat=remat)


def generation_lengths(config: GPTNeoConfig, batch: int, max_len: int | None, prompt_len: int | None):
    """(max_len, prompt_len) of a generation to compile: by default every position, half of them prompt."""
    max_len = config.max_position_embeddings if max_len is None else max_len
    prompt_len = max_len // 2 if prompt_len is None else prompt_len
    if not 1 <= prompt_len < max_len <= config.max_position_embeddings:
        raise ValueError(
            f"need 1 <= prompt_len ({prompt_len}) < max_len ({max_len}) <= {config.max_position_embeddings} "
            "(max_position_embeddings)"
        )
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return max_len, prompt_len


def generate_programs(
    config: GPTNeoConfig,
    mesh: Mesh,
    *,
    batch: int,
    max_len: int | None = None,
    prompt_len: int | None = None,
    dtype=jnp.bfloat16,
    param_dtype=None,
    attention: str = "auto",
    int8: bool = False,
) -> dict[str, Lowered]:
    """The two programs ``neo-jax generate`` runs, lowered for ``mesh``: ``prefill`` (a left-padded prompt of
    ``prompt_len`` tokens, default half of ``max_len``, into a new KV cache, and the first token) and
    ``decode`` (the jitted loop of single-token steps over that cache, up to ``max_len`` positions in all).
    Weights are stored in ``param_dtype`` (default: ``dtype``, as ``neo-jax generate --dtype`` loads them);
    ``int8``: the block and embedding weights in int8 (``neo_jax.quantize``), the rest in ``param_dtype``."""
    from neo_jax.generation.cache import cache_bucket
    from neo_jax.generation.loop import _continue, _start
    from neo_jax.generation.sampling import SamplingParams
    from neo_jax.shapes import bucket

    max_len, prompt_len = generation_lengths(config, batch, max_len, prompt_len)
    model = abstract_model(config, mesh, dtype=dtype, param_dtype=param_dtype or dtype, attention=attention, int8=int8)
    graphdefs = (nnx.graphdef(model), nnx.graphdef(model.periods))
    arrays = (nnx.state(model), None)  # on an accelerator the layers are sliced inside the program
    width, new = bucket(prompt_len), max_len - prompt_len
    scalar = lambda dtype: _input((), dtype, mesh, ())
    params = jax.tree.map(lambda _: scalar(jnp.float32), SamplingParams.of())  # greedy; values abstract
    key = jax.ShapeDtypeStruct(
        (), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=NamedSharding(mesh, PartitionSpec())
    )
    ids = _input((batch, width), jnp.int32, mesh)
    seen = _input((batch, 1), jnp.bool_, mesh)
    prompt_tail = _input((batch, 0), jnp.int32, mesh)  # no banned sequences
    with jax.set_mesh(mesh):
        prefill = _start.lower(
            graphdefs,
            arrays,
            ids,
            ids,
            seen,
            prompt_tail,
            params,
            key,
            scalar(jnp.int32),
            scalar(jnp.int32),
            max_len=cache_bucket(width + new),
            max_new=cache_bucket(new),
        )
        state = jax.tree.map(
            lambda info, placed: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=placed),
            prefill.out_info,
            prefill.compile().output_shardings,
        )
        decode = _continue.lower(
            graphdefs, arrays, state, scalar(jnp.int32), params, scalar(jnp.int32), scalar(jnp.int32)
        )
    return {"prefill": prefill, "decode": decode}


def serve_programs(
    config: GPTNeoConfig,
    mesh: Mesh,
    *,
    slots: int,
    max_len: int,
    prefill_chunk: int,
    dtype=jnp.bfloat16,
    adapters: int = 0,
    lora=None,
    draft: GPTNeoConfig | str | None = None,
    num_draft_tokens: int = 4,
) -> dict[str, Lowered]:
    """The step programs ``neo-jax serve`` runs, lowered for ``mesh``: ``step`` (one token for each of ``slots``
    rows of ``max_len`` cache positions) and ``mixed`` (the same plus one lane of ``prefill_chunk`` prompt
    tokens, the echo branch included). Weights stored in ``dtype``; with ``adapters``, that many LoRA adapters
    of ``lora`` (a ``LoRAConfig``: rank and targets; default rank 16 on q_proj and v_proj) on every step's
    tokens, as ``--adapter NAME=DIR`` serves them. With a ``draft`` (a GPT-Neo's config, or ``"ngram"``), as
    ``--draft`` serves it: also ``spec``, a speculative round of ``num_draft_tokens``, and for a draft model
    ``catch``, its cache catching up on a chunk of every row."""
    from neo_jax import lora as lora_layers
    from neo_jax.generation import batching, speculative

    model = abstract_model(config, mesh, dtype=dtype, param_dtype=dtype)
    if adapters:
        _place(lora_layers.add_abstract(model, adapters, lora or lora_layers.LoRAConfig(r=16)), mesh)
    graphdefs = (nnx.graphdef(model), nnx.graphdef(model.periods))
    arrays = (nnx.state(model), None)
    replicated = NamedSharding(mesh, PartitionSpec())
    settings = batching.RowSampling.of([batching.NEUTRAL])  # on this host: only the shapes are used
    host_lanes = batching.Lanes(**batching.empty_lanes(1, prefill_chunk, slots), settings=settings)
    lookahead = 0 if draft is None else num_draft_tokens + 1
    draft_graphdefs = draft_arrays = None
    if draft is not None and not isinstance(draft, str):
        drafter = abstract_model(draft, mesh, dtype=dtype, param_dtype=dtype)
        draft_graphdefs = (nnx.graphdef(drafter), nnx.graphdef(drafter.periods))
        draft_arrays = (nnx.state(drafter), None)
    given = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    def created(fn, *static):  # the abstract output of fn(*static), placed as the compiler places it
        lowered = jax.jit(fn, static_argnums=tuple(range(len(static)))).lower(*static)
        placed = lowered.compile().output_shardings
        return jax.tree.map(lambda x, at: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=at), lowered.out_info, placed)

    with jax.set_mesh(mesh), attention_impls.compiling_for(_platform(mesh)):
        state = created(batching.empty_slots, config, slots, max_len, dtype, prefill_chunk, lookahead)
        lanes = jax.tree.map(lambda x: given(x.shape, x.dtype), host_lanes)
        echo = given((), jnp.bool_)
        step = jax.jit(functools.partial(batching.step, graphdefs), donate_argnums=(1,))
        programs: dict[str, Lowered] = {
            "step": step.lower(arrays, state, None, None, echo),
            "mixed": step.lower(arrays, state, None, lanes, echo),
        }
        if draft is None:
            return programs
        cache = sequence = None
        if isinstance(draft, str):  # n-gram lookup in every row's tokens
            sequence = given((slots, max_len + lookahead), jnp.int32)
        else:
            cache = created(batching.slot_cache, draft, slots, max_len, dtype, prefill_chunk, lookahead)
            catch = jax.jit(functools.partial(speculative.catch_up, draft_graphdefs), donate_argnums=(1,))
            rows = given((slots,), jnp.int32)
            programs["catch"] = catch.lower(draft_arrays, cache, given((slots, prefill_chunk), jnp.int32), rows, rows)
        round_ = functools.partial(speculative.serve_round, graphdefs, draft_graphdefs, k=num_draft_tokens)
        programs["spec"] = jax.jit(round_, donate_argnums=(2, 3)).lower(arrays, draft_arrays, state, cache, sequence)
        return programs


def embed_program(
    config: GPTNeoConfig, mesh: Mesh, *, batch: int, seq: int, dtype=jnp.bfloat16, pooling: str = "mean"
) -> Lowered:
    """The program ``neo-jax embed`` runs on ``batch`` documents padded to ``seq`` tokens, lowered for ``mesh``
    (weights stored and computed in ``dtype``)."""
    from neo_jax import embed

    model = abstract_model(config, mesh, dtype=dtype, param_dtype=dtype)
    graphdef, state = nnx.split(model)
    ids = _input((batch, seq), jnp.int32, mesh)
    program = jax.jit(functools.partial(embed._pooled, graphdef, pooling=pooling, layer=None, normalize=False))
    with jax.set_mesh(mesh), attention_impls.compiling_for(_platform(mesh)):
        return program.lower(state, ids, ids)


class Lowered(Protocol):
    """A lowered program, from ``jax.jit`` or ``nnx.jit``: what ``analyse`` compiles."""

    def compile(self) -> Any: ...


def analyse(lowered: Lowered) -> dict:
    """Compile ``lowered`` and return XLA's per-device figures: bytes of ``arguments``, ``outputs`` (less
    what aliases the donated arguments), ``temporaries`` and their ``total``; ``flops`` and ``bytes_accessed``
    from the cost analysis; and ``compile_seconds``. Raises ``ValueError`` naming the shortfall when the
    program cannot fit the device (XLA:TPU's RESOURCE_EXHAUSTED)."""
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" in str(e):
            raise ValueError(f"does not fit: {str(e).splitlines()[0]}") from None
        raise
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    outputs = memory.output_size_in_bytes - memory.alias_size_in_bytes
    result = {
        "arguments": int(memory.argument_size_in_bytes),
        "outputs": int(outputs),
        "temporaries": int(memory.temp_size_in_bytes),
    }
    result["total"] = sum(result.values())
    result |= {
        "flops": float(cost.get("flops", 0.0)),
        "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "compile_seconds": round(seconds, 1),
    }
    return result


# ---- FLOPs: the MFU numerator (counted from the shapes) and denominator (a chip's peak) ----
def matmul_params(config: GPTNeoConfig) -> int:
    """Parameters that take part in a matmul: every block's Linear kernels and the tied LM head."""
    h = config.hidden_size
    return config.num_layers * (4 * h * h + 2 * h * config.inner_size) + config.vocab_size * h


def train_flops(config: GPTNeoConfig, batch: int, seq: int, remat: str = "none") -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one train step on ``batch`` sequences of ``seq`` tokens, over all
    devices. Model FLOPs are the usual 6 x matmul parameters x tokens plus attention's ``q @ k^T`` and
    ``p @ v`` (12 x layers x seq x hidden per token), the MFU numerator; hardware FLOPs add what remat
    recomputes (``full``: the layers' forward pass again; ``dots``: the attention matmuls)."""
    h, layers, tokens = config.hidden_size, config.num_layers, batch * seq
    matmuls = matmul_params(config)
    layer_forward = 2 * (matmuls - config.vocab_size * h) + 4 * layers * seq * h
    model = tokens * (6 * matmuls + 12 * layers * seq * h)
    recompute = {"none": 0, "full": layer_forward, "dots": 4 * layers * seq * h}[remat]
    return float(model), float(model + tokens * recompute)


# jax's device_kind of each TPU generation -> CHIPS
TPU_KINDS = {
    "TPU v4": "v4",
    "TPU v5 lite": "v5e",
    "TPU v5e": "v5e",
    "TPU v5": "v5p",
    "TPU v5p": "v5p",
    "TPU v6 lite": "v6e",
}


def peak_flops(devices, dtype: str = "bfloat16") -> float:
    """The peak matmul FLOP/s of ``devices`` together, the MFU denominator: a TPU chip's published bfloat16
    figure (``CHIPS``) times the chips; elsewhere measured, as the best of a few square matmuls in
    ``dtype`` on one device, times the devices (CPU devices share the host's cores: one measurement for all)."""
    devices = list(devices)
    kind = devices[0].device_kind
    if kind in TPU_KINDS:
        return CHIPS[TPU_KINDS[kind]].peak_flops * len(devices)
    platform = devices[0].platform
    return _measured_peak(platform, str(dtype)) * (1 if platform == "cpu" else len(devices))


@functools.cache
def _measured_peak(platform: str, dtype: str) -> float:
    n = 2048 if platform == "cpu" else 8192
    device = jax.devices(platform)[0]
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    matmul = jax.jit(lambda a: a @ a)
    matmul(a).block_until_ready()
    best = math.inf
    for _ in range(5):
        began = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - began)
    return 2 * n**3 / best
