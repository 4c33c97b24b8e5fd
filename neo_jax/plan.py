"""Memory planning: what one device holds when fine-tuning or generating on a mesh, before anything is launched.

Two ways to a figure:
- **compiled** (``compiled_train`` / ``compiled_generate``): the real programs of ``neo-jax train`` and
  ``neo-jax generate`` compiled for a named TPU slice through ``neo_jax.aot``; the memory is XLA:TPU's own
  per-chip figure.
- **estimated** (``plan`` / ``generation_estimate``): parameters, optimizer state, gradients and the KV cache
  counted exactly from the shapes and sharding rules (one device's shard of every array), plus an estimate
  of the activations calibrated against the compiler on the shipped configs (``tests/test_aot.py`` keeps
  it within 25%).

Both come with the FLOPs a step needs and a roofline lower bound on its time from the chip's published peak
FLOP/s and HBM bandwidth. The FLOPs are counted from the shapes: XLA's cost analysis counts the body of a
loop (the layer scan, gradient accumulation, the decode loop) once, whatever its trip count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import jax.numpy as jnp
from flax import nnx

from neo_jax.aot import check_train, matmul_params, train_flops
from neo_jax.attention import BLOCK, choose
from neo_jax.config import GPTNeoConfig
from neo_jax.embed import check_max_length
from neo_jax.generation.batching import DEFAULT_PREFILL_CHUNK
from neo_jax.generation.cache import cache_bytes
from neo_jax.model import GPTNeo
from neo_jax.shapes import bucket
from neo_jax.sharding import AXES, shard_shape, spec

GIB = 2**30
# The per-device byte counts a report prints, in order.
BYTES = (
    "parameters",
    "adapters",
    "optimizer_state",
    "gradients",
    "kv_cache",
    "draft_parameters",
    "draft_kv_cache",
    "activations",
    "arguments",
    "temporaries",
)
# Memory per chip of common accelerators, GiB.
DEVICES = {"TPU v4": 32, "TPU v5e": 16, "TPU v5p": 95, "TPU v6e": 32, "GPU 80 GB": 80}


def parameter_bytes(
    config: GPTNeoConfig,
    mesh: Mapping[str, int],
    param_dtype=jnp.float32,
    rules=None,
    lora=None,
    which=None,
    int8: bool = False,
) -> int:
    """Bytes of one device's shards of every parameter (with ``lora`` adapters; ``which``: an NNX filter,
    e.g. ``neo_jax.lora.LoRAParam`` for the adapters alone; ``int8``: int8 weights, ``neo_jax.quantize``)."""

    def create():
        model = GPTNeo(config, param_dtype=param_dtype, rngs=nnx.Rngs(0))
        if lora is not None:
            from neo_jax.lora import add

            add(model, lora)
        if int8:
            from neo_jax.quantize import to_int8

            to_int8(model)
        return model

    abstract = nnx.eval_shape(create)
    total = 0
    for _, variable in nnx.to_flat_state(nnx.state(abstract, which or nnx.Param)):
        value = variable.get_value()
        partition = spec(variable.get_metadata()["out_sharding"], value.shape, mesh, rules)
        total += math.prod(shard_shape(value.shape, partition, mesh)) * value.dtype.itemsize
    return total


def _split(size: int, parts: int) -> int:
    return parts if size % parts == 0 else 1


def activation_bytes(
    config: GPTNeoConfig,
    mesh: Mapping[str, int],
    batch: int,
    seq: int,
    *,
    remat: str = "none",
    dtype=jnp.bfloat16,
    attention: str = "dense",
) -> int:
    """Estimated bytes of the activations one device holds at the peak of a train step on ``batch`` rows
    (a micro-batch), calibrated against XLA:TPU on the shipped configs.

    Per token and layer the backward pass keeps the LayerNorm inputs and outputs and the residual stream
    (replicated over ``tensor``), q, k, v and the attention output (split by heads), the MLP's hidden layer
    before and after gelu (split by mlp), and dense attention's [seq, seq] scores: float32 probabilities
    and their ``dtype`` copy, per head (``blockwise``, ``splash`` and ``cudnn`` attention keep none: one block
    of queries' scores exists at a time). ``full`` remat keeps only each layer period's input and rebuilds one
    period at a time; ``dots`` keeps the Linear layers' outputs too. The LM head adds five float32 arrays
    per token and vocabulary entry (logits, softmax, their gradients and a copy XLA:TPU keeps at the peak)."""
    h, inner, heads, layers = config.hidden_size, config.inner_size, config.num_heads, config.num_layers
    e = jnp.dtype(dtype).itemsize
    t = mesh["tensor"]
    t_heads, t_mlp, t_vocab = _split(heads, t), _split(inner, t), _split(config.vocab_size, t)
    local_batch = batch // (mesh["data"] * mesh["fsdp"])
    scores = (4 + e) * heads / t_heads * seq  # per query: float32 probabilities and their compute-dtype copy
    held, transient = (scores, 0) if attention == "dense" else (0, scores * min(BLOCK, seq) / seq)
    linear = e * (4 * h / t_heads + 2 * h + inner / t_mlp)  # outputs of q, k, v, out_proj, c_fc, c_proj
    per_layer = e * (4 * h + 2 * inner / t_mlp) + linear + held
    period = len(config.layer_period)
    if remat == "full":
        per_token = layers / period * e * h + period * per_layer
    elif remat == "dots":
        per_token = layers * linear + period * per_layer
    else:
        per_token = layers * per_layer
    logits = 5 * 4 * config.vocab_size / t_vocab
    return int(local_batch * seq * (per_token + logits + transient))


def plan(
    config: GPTNeoConfig,
    mesh: Mapping[str, int],
    batch: int,
    seq: int,
    *,
    remat: str = "none",
    grad_accum: int = 1,
    dtype=jnp.bfloat16,
    param_dtype=jnp.float32,
    attention: str = "auto",
    rules=None,
    lora=None,
    int8: bool = False,
) -> dict:
    """Estimated per-device bytes of an AdamW fine-tuning step: parameters, optimizer state (two moments),
    gradients and activations (of one micro-batch of ``batch / grad_accum`` rows, with the ``attention``
    implementation it would run on a TPU), plus their total. With ``lora`` (a ``LoRAConfig``) the base is
    stored in ``dtype`` (``int8``: in int8, ``neo_jax.quantize``) and only the adapters have gradients and
    optimizer state."""
    if int8 and lora is None:
        raise ValueError("int8 weights train only as a LoRA run's frozen base: give lora")
    mesh = {axis: int(mesh[axis]) for axis in AXES}
    if any(size < 1 for size in mesh.values()):
        raise ValueError(f"mesh sizes must be positive, got {mesh}")
    check_train(config, mesh, batch, seq, remat, grad_accum)
    trained = params = parameter_bytes(config, mesh, param_dtype, rules)
    if lora is not None:
        from neo_jax.lora import LoRAParam

        params = parameter_bytes(config, mesh, dtype, rules, lora=lora, int8=int8)
        trained = parameter_bytes(config, mesh, dtype, rules, lora=lora, which=LoRAParam)
    result = {
        "parameters": params,
        "optimizer_state": 2 * trained,
        "gradients": trained,
        "activations": activation_bytes(
            config,
            mesh,
            batch // grad_accum,
            seq,
            remat=remat,
            dtype=dtype,
            attention=choose(attention, seq, dtype, on="tpu"),
        ),
    }
    result["total"] = sum(result.values())
    return result


def compiled_train(*args, **kwargs) -> dict:
    """The train step of ``neo-jax train`` compiled for a TPU slice (arguments as ``_compiled_train``), in a
    separate process (``isolated``)."""
    return isolated(_compiled_train, *args, **kwargs)


def compiled_generate(*args, **kwargs) -> dict:
    """Prefill and decode of ``neo-jax generate`` compiled for a TPU slice (arguments as
    ``_compiled_generate``), in a separate process (``isolated``)."""
    return isolated(_compiled_generate, *args, **kwargs)


def isolated(function, *args, **kwargs):
    """``function(*args, **kwargs)`` in a child process (arguments and result pickled). XLA:TPU aborts the process
    on some programs instead of raising (libtpu 0.0.42.1 on 2.7B with fsdp=4 on v4 and v5p): that becomes a
    ValueError here. The child is forked from multiprocessing's fork server, which imported JAX and neo_jax once
    (before any JAX backend starts, so forking it is safe): a second compile in the same process does not pay
    for a new interpreter and its imports again. The child's output (libtpu's log lines) is discarded."""
    import multiprocessing
    import pickle

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["neo_jax.plan"])
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_run_isolated, args=(send, function, args, kwargs), daemon=True)
    child.start()
    send.close()
    try:
        ok, value = pickle.loads(receive.recv_bytes())
    except EOFError:  # the child died without an answer
        raise ValueError(
            "XLA:TPU crashed while compiling this program (a compiler bug, not a memory verdict); "
            "try another --mesh, e.g. with tensor=2, or --no-compile for the estimate"
        ) from None
    finally:
        receive.close()
        child.join()
    if not ok:
        raise value
    return value


def _run_isolated(send, function, args, kwargs) -> None:
    """The child's side of ``isolated``."""
    import os
    import pickle

    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)
    os.dup2(quiet, 2)
    try:
        outcome = (True, function(*args, **kwargs))
    except Exception as e:  # noqa: BLE001 (every error is raised again in the parent)
        outcome = (False, e)
    try:
        data = pickle.dumps(outcome)
    except Exception:  # noqa: BLE001 (an error that does not pickle still comes back, as its text)
        data = pickle.dumps((False, RuntimeError(f"{type(outcome[1]).__name__}: {outcome[1]}")))
    send.send_bytes(data)
    send.close()


def _compiled_train(
    config: GPTNeoConfig,
    topology: str,
    batch: int,
    seq: int,
    *,
    mesh: Mapping[str, int] | None = None,
    remat: str = "none",
    grad_accum: int = 1,
    dtype=jnp.bfloat16,
    attention: str = "auto",
    lora=None,
    int8: bool = False,
) -> dict:
    """The train step of ``neo-jax train`` compiled for a TPU slice: the exact parameter, optimizer and gradient
    bytes (as ``plan``), XLA:TPU's arguments and temporaries per chip, and their ``total``."""
    from neo_jax import aot

    device_mesh = aot.slice_mesh(topology, **(mesh or {}))  # default: every chip on fsdp
    sizes = dict(device_mesh.shape)
    exact = plan(config, sizes, batch, seq, remat=remat, grad_accum=grad_accum, dtype=dtype, lora=lora, int8=int8)
    compiled = aot.analyse(
        aot.train_program(
            config,
            device_mesh,
            batch=batch,
            seq=seq,
            dtype=dtype,
            remat=remat,
            grad_accum=grad_accum,
            attention=attention,
            lora=lora,
            int8=int8,
        )
    )
    result = {k: exact[k] for k in ("parameters", "optimizer_state", "gradients")}
    return result | {k: compiled[k] for k in ("arguments", "temporaries", "total", "compile_seconds")} | {"mesh": sizes}


def generation_flops(config: GPTNeoConfig, batch: int, cache: int) -> float:
    """FLOPs of one decode step: 2 x matmul parameters per row plus attention over ``cache`` slots per layer
    (global layers; local ones over their window)."""
    slots = sum(cache if kind == "global" else min(config.window_size, cache) for kind in config.attention_layers)
    return float(batch * (2 * matmul_params(config) + 4 * slots * config.hidden_size))


def generation_estimate(
    config: GPTNeoConfig,
    mesh: Mapping[str, int],
    batch: int,
    max_len: int,
    prompt_len: int,
    *,
    dtype=jnp.bfloat16,
    int8: bool = False,
) -> dict:
    """Estimated per-device bytes of generation: the weights (stored in ``dtype``, or ``int8``), the KV cache of
    ``max_len`` slots, and the prefill's activations (one layer's over the prompt, with splash attention as on
    a TPU: no [prompt, prompt] scores, and the last position's logits)."""
    mesh = {axis: int(mesh[axis]) for axis in AXES}
    replicas = mesh["data"] * mesh["fsdp"]
    rows = batch // replicas if batch % replicas == 0 else batch  # a batch that does not divide is replicated
    width = bucket(prompt_len)
    e = jnp.dtype(dtype).itemsize
    prefill = rows * width * e * 6 * config.hidden_size + rows * 4 * config.vocab_size
    result = {
        "parameters": parameter_bytes(config, mesh, dtype, int8=int8),
        "kv_cache": cache_bytes(config, rows, max_len, dtype) // _split(config.num_heads, mesh["tensor"]),
        "activations": int(prefill),
    }
    result["total"] = sum(result.values())
    return result


def _compiled_generate(
    config: GPTNeoConfig,
    topology: str,
    batch: int,
    max_len: int,
    prompt_len: int,
    *,
    mesh: Mapping[str, int] | None = None,
    dtype=jnp.bfloat16,
    int8: bool = False,
) -> dict:
    """Prefill and decode of ``neo-jax generate`` compiled for a TPU slice: per chip, the weights and KV cache
    (exact), and XLA:TPU's temporaries and total of each program."""
    from neo_jax import aot

    device_mesh = aot.slice_mesh(topology, **(mesh or {}))  # default: every chip on fsdp
    sizes = dict(device_mesh.shape)
    start = time.perf_counter()
    programs = aot.generate_programs(
        config, device_mesh, batch=batch, max_len=max_len, prompt_len=prompt_len, dtype=dtype, int8=int8
    )
    estimate = generation_estimate(config, sizes, batch, max_len, prompt_len, dtype=dtype, int8=int8)
    result = {"parameters": estimate["parameters"], "kv_cache": estimate["kv_cache"], "mesh": sizes}
    for name, lowered in programs.items():
        compiled = aot.analyse(lowered)  # bytes_accessed: XLA's count, the decode loop's body once
        result[name] = {k: compiled[k] for k in ("arguments", "temporaries", "total", "bytes_accessed")}
    result["total"] = max(result["prefill"]["total"], result["decode"]["total"])
    result["compile_seconds"] = round(time.perf_counter() - start, 1)  # both programs
    return result


def roofline(flops_per_chip: float, bytes_per_chip: float, chip, model_flops_per_chip: float) -> dict:
    """A lower bound on the time of a program on ``chip`` (``neo_jax.aot.Chip``): the larger of its FLOPs at
    peak and its bytes at full HBM bandwidth; and the MFU that bound allows."""
    compute, memory = flops_per_chip / chip.peak_flops, bytes_per_chip / chip.hbm_bandwidth
    seconds = max(compute, memory)
    return {
        "seconds": seconds,
        "bound": "compute" if compute >= memory else "memory",
        "mfu_ceiling": model_flops_per_chip / (chip.peak_flops * seconds) if seconds else 0.0,
    }


def _mesh_sizes(topology: str | None, mesh: Mapping[str, int] | None) -> dict[str, int]:
    if topology:
        return slice_mesh_sizes(topology, mesh)
    if mesh is None:
        raise ValueError("give a topology (a TPU slice such as v5e-8) or the mesh sizes to plan for")
    return dict(mesh)


def slice_mesh_sizes(topology: str, mesh: Mapping[str, int] | None = None) -> dict[str, int]:
    """The mesh sizes on a named slice: ``mesh`` (one size may be -1; default every chip on fsdp), checked
    against the slice's chip count."""
    from neo_jax import aot

    chips = aot.slice_size(topology)
    mesh = dict(mesh or {"data": 1, "fsdp": -1, "tensor": 1})
    known = math.prod(size for size in mesh.values() if size != -1)
    if -1 in mesh.values():
        mesh = {axis: chips // known if size == -1 else size for axis, size in mesh.items()}
    if math.prod(mesh.values()) != chips:
        raise ValueError(f"the mesh {mesh} has {math.prod(mesh.values())} devices; {topology} has {chips}")
    return mesh


def train_report(
    config: GPTNeoConfig,
    *,
    batch: int,
    seq: int,
    topology: str | None = None,
    mesh: Mapping[str, int] | None = None,
    remat: str = "none",
    grad_accum: int = 1,
    dtype="bfloat16",
    attention: str = "auto",
    compile: bool = True,
    lora=None,
    int8: bool = False,
) -> dict:
    """Everything ``neo-jax plan`` says of a train step: memory per device (compiled for ``topology`` when
    ``compile``, else estimated), and on a slice the FLOPs, the roofline and whether it fits. ``lora``: a
    ``LoRAConfig`` (adapters train, the base is frozen in ``dtype``, or with ``int8`` in int8)."""
    mesh = _mesh_sizes(topology, mesh)
    options = {
        "remat": remat,
        "grad_accum": grad_accum,
        "dtype": jnp.dtype(dtype),
        "attention": attention,
        "lora": lora,
        "int8": int8,
    }
    estimate = plan(config, mesh, batch, seq, **options)
    result = compiled_train(config, topology, batch, seq, mesh=mesh, **options) if topology and compile else estimate
    model, hardware = train_flops(config, batch, seq, remat)
    # Bytes a step cannot avoid: the weights read in the compute dtype for the forward pass, the backward pass
    # and any recomputation (all-gathered, so whole on every data-parallel device), and the AdamW update.
    passes = 3 if remat == "full" else 2
    weights = config.num_params() * jnp.dtype(dtype).itemsize * passes * grad_accum * mesh["data"] * mesh["fsdp"]
    update = 7 * estimate["gradients"] * math.prod(mesh.values())  # what trains: everything, or the adapters
    return _on_slice(result | {"mesh": mesh}, topology, model, hardware, weights + update)


def generate_report(
    config: GPTNeoConfig,
    *,
    batch: int,
    max_len: int | None = None,
    prompt_len: int | None = None,
    topology: str | None = None,
    mesh: Mapping[str, int] | None = None,
    dtype="bfloat16",
    compile: bool = True,
    int8: bool = False,
) -> dict:
    """Everything ``neo-jax plan --task generate`` says: weights, KV cache and the prefill and decode programs'
    memory per device, and on a slice the roofline of a decode step at a full cache. Weights are stored in
    ``dtype``, or with ``int8`` as ``from_pretrained(..., weights="int8")`` stores them."""
    from neo_jax.aot import generation_lengths

    max_len, prompt_len = generation_lengths(config, batch, max_len, prompt_len)
    mesh = _mesh_sizes(topology, mesh)
    dtype = jnp.dtype(dtype)
    if topology and compile:
        result = compiled_generate(config, topology, batch, max_len, prompt_len, mesh=mesh, dtype=dtype, int8=int8)
    else:
        result = generation_estimate(config, mesh, batch, max_len, prompt_len, dtype=dtype, int8=int8)
    flops = generation_flops(config, batch, max_len)
    # A step reads every weight once (all-gathered over fsdp: whole but for the tensor split on every chip)
    # and the whole cache.
    step_bytes = (result["parameters"] * mesh["fsdp"] + result["kv_cache"]) * math.prod(mesh.values())
    result |= {"mesh": mesh, "max_len": max_len, "prompt_len": prompt_len}
    result = _on_slice(result, topology, flops, flops, step_bytes)
    if topology:
        result["roofline"]["tokens_per_s"] = batch / result["roofline"]["seconds"]
    return result


def serve_report(
    config: GPTNeoConfig,
    *,
    slots: int,
    max_len: int | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    adapters: int = 0,
    lora=None,
    topology: str | None = None,
    mesh: Mapping[str, int] | None = None,
    dtype="bfloat16",
    compile: bool = True,
    draft: GPTNeoConfig | str | None = None,
    num_draft_tokens: int = 4,
) -> dict:
    """Everything ``neo-jax plan --task serve`` says: weights, ``adapters`` LoRA adapters (``lora``: their rank
    and targets), the slots' KV cache, and on a slice XLA:TPU's memory of the server's decode step and its
    step with a prefill chunk, per chip; else the estimate (weights, adapters, cache and one chunk's
    activations). With a ``draft`` (a config, or ``"ngram"``), as ``serve --draft`` runs it: the draft's
    weights and cache, both caches ``num_draft_tokens + 1`` slots longer, and the speculative round (and the
    draft's catch-up) compiled beside the steps; the total is the largest program with the draft's weights and
    cache resident beside it."""
    from neo_jax import lora as lora_layers
    from neo_jax.generation.batching import check_slots, clamped_chunk

    max_len = check_slots(config, slots, max_len)  # as the server checks them
    prefill_chunk = clamped_chunk(prefill_chunk, max_len)  # as the server clamps it
    mesh = _mesh_sizes(topology, mesh)
    dtype = jnp.dtype(dtype)
    lora = lora or lora_layers.LoRAConfig(r=16)
    lookahead = 0 if draft is None else num_draft_tokens + 1
    estimate = generation_estimate(config, mesh, slots, max_len + lookahead, prefill_chunk, dtype=dtype)
    # float32 A [r, in] and B [out, r] per layer and target (on one device: the upper bound under sharding)
    per_adapter = sum(config.num_layers * lora.r * sum(_dense_shape(config, target)) * 4 for target in lora.targets)
    result = {
        "parameters": estimate["parameters"],
        "adapters": adapters * per_adapter,
        "kv_cache": estimate["kv_cache"],
        "mesh": mesh,
        "max_len": max_len,
        "prefill_chunk": prefill_chunk,
    }
    if draft is not None and not isinstance(draft, str):
        drafted = generation_estimate(draft, mesh, slots, max_len + lookahead, prefill_chunk, dtype=dtype)
        result |= {"draft_parameters": drafted["parameters"], "draft_kv_cache": drafted["kv_cache"]}
    if topology and compile:
        from neo_jax import aot

        device_mesh = aot.slice_mesh(topology, **mesh)
        programs = aot.serve_programs(
            config, device_mesh, slots=slots, max_len=max_len, prefill_chunk=prefill_chunk, dtype=dtype,
            adapters=adapters, lora=lora, draft=draft, num_draft_tokens=num_draft_tokens,
        )  # fmt: skip
        for name, lowered in programs.items():
            compiled = aot.analyse(lowered)
            result[name] = {k: compiled[k] for k in ("arguments", "temporaries", "total")}
        # the draft's weights and cache stay on the chip while the steps run: the round's arguments beyond theirs
        resident = result["spec"]["arguments"] - result["step"]["arguments"] if "catch" in result else 0
        result["total"] = max(
            result["step"]["total"] + resident,
            result["mixed"]["total"] + resident,
            result.get("spec", {}).get("total", 0),
        )
    else:
        result["activations"] = estimate["activations"]
        resident = result.get("draft_parameters", 0) + result.get("draft_kv_cache", 0)
        result["total"] = (
            result["parameters"] + result["adapters"] + result["kv_cache"] + result["activations"] + resident
        )
    if topology:
        from neo_jax import aot

        chip = aot.slice_chip(topology)
        result["chip"] = {"name": chip.name, "hbm_gib": chip.hbm_bytes / GIB}
    return result


def embed_report(
    config: GPTNeoConfig,
    *,
    batch: int,
    seq: int,
    topology: str | None = None,
    mesh: Mapping[str, int] | None = None,
    dtype="bfloat16",
    compile: bool = True,
) -> dict:
    """Everything ``neo-jax plan --task embed`` says of ``neo-jax embed`` on batches of ``batch`` documents of
    ``seq`` tokens: weights in ``dtype`` and, on a slice, XLA:TPU's memory of the pooled forward per chip (else an
    estimate: the weights, one layer's activations at a time, the hidden states), its FLOPs, the roofline and
    the documents per second it bounds."""
    mesh = _mesh_sizes(topology, mesh)
    dtype = jnp.dtype(dtype)
    rows = mesh["data"] * mesh["fsdp"]
    if batch % rows:
        raise ValueError(f"batch {batch} must be a multiple of the mesh's data x fsdp ({rows})")
    check_max_length(seq, config, "seq")
    result = {"parameters": parameter_bytes(config, mesh, dtype), "mesh": mesh, "seq": seq}
    if topology and compile:
        from neo_jax import aot

        compiled = aot.analyse(
            aot.embed_program(config, aot.slice_mesh(topology, **mesh), batch=batch, seq=seq, dtype=dtype)
        )
        result |= {k: compiled[k] for k in ("arguments", "temporaries")} | {"total": compiled["total"]}
    else:
        h, inner, t = config.hidden_size, config.inner_size, mesh["tensor"]
        scores = (4 + dtype.itemsize) * config.num_heads / _split(config.num_heads, t) * seq
        per_token = dtype.itemsize * (4 * h + 2 * inner / _split(inner, t)) + scores
        result["activations"] = int(batch // rows * seq * per_token)
        result["total"] = result["parameters"] + result["activations"]
    # the forward pass without the LM head: 2 x the blocks' matmul parameters, and q @ k^T and p @ v, per token
    blocks = matmul_params(config) - config.vocab_size * config.hidden_size
    flops = batch * seq * (2 * blocks + 4 * config.num_layers * seq * config.hidden_size)
    step_bytes = result["parameters"] * mesh["fsdp"] * math.prod(mesh.values())  # every weight read once
    result = _on_slice(result, topology, flops, flops, step_bytes)
    if topology:
        result["roofline"]["documents_per_s"] = batch / result["roofline"]["seconds"]
    return result


def _dense_shape(config: GPTNeoConfig, target: str) -> tuple[int, int]:
    """(out, in) of a LoRA target layer."""
    d, inner = config.hidden_size, config.inner_size
    return {"c_fc": (inner, d), "c_proj": (d, inner)}.get(target, (d, d))


def _on_slice(result: dict, topology: str | None, model_flops: float, flops: float, step_bytes: float) -> dict:
    """Add the chip, the FLOPs per chip, the roofline and whether the total fits, for a named slice."""
    if topology is None:
        return result
    from neo_jax import aot

    chip, devices = aot.slice_chip(topology), math.prod(result["mesh"].values())
    return result | {
        "flops_per_chip": flops / devices,
        "roofline": roofline(flops / devices, step_bytes / devices, chip, model_flops / devices),
        "chip": {
            "name": chip.name,
            "hbm_gib": chip.hbm_bytes / GIB,
            "peak_tflops_bf16": chip.peak_flops / 1e12,
            "hbm_gb_per_s": chip.hbm_bandwidth / 1e9,
        },
        "fits": result["total"] <= chip.hbm_bytes,
    }


def describe(result: dict) -> str:
    """``report``'s table, plus the roofline line on a slice."""
    printable = {k: result[k] for k in BYTES if k in result}
    for name in ("prefill", "decode", "step", "mixed", "spec", "catch"):
        if name in result:
            printable |= {f"{name} temporaries": result[name]["temporaries"], f"{name} total": result[name]["total"]}
    chip = result.get("chip")
    lines = [report(printable | {"total": result["total"]}, None if chip is None else int(chip["hbm_gib"] * GIB))]
    if chip is not None and "roofline" in result:
        line = result["roofline"]
        rate = f", at most {line['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in line else ""
        rate += f", at most {line['documents_per_s']:,.0f} documents/s" if "documents_per_s" in line else ""
        step = "decode step at a full cache" if "kv_cache" in result else "train step"
        lines.append(
            f"{'embedding batch' if 'documents_per_s' in line else step}: "
            f"{result['flops_per_chip'] / 1e12:.3f} TFLOP per chip; roofline lower bound {line['seconds'] * 1e3:.1f} ms "
            f"({line['bound']}-bound{rate}), MFU ceiling {line['mfu_ceiling']:.0%}; peaks used: {chip['name']} "
            f"{chip['peak_tflops_bf16']:.0f} TFLOP/s bf16, {chip['hbm_gb_per_s']:.0f} GB/s HBM"
        )
    return "\n".join(lines)


def report(result: dict, hbm: int | None = None) -> str:
    """A small table in GiB, and which devices the total fits on (``hbm``: just that one, in bytes)."""
    lines = [
        f"{name.replace('_', ' '):>16}  {value / GIB:8.2f} GiB"
        for name, value in result.items()
        if isinstance(value, int) and name not in ("flops",)
    ]
    if hbm is not None:
        fits = f"{'yes' if result['total'] <= hbm else 'no'}: {result['total'] / hbm:.0%} of {hbm / GIB:.0f} GiB"
    else:
        fits = ", ".join(
            f"{device} ({gib} GiB): {'yes' if result['total'] <= gib * GIB else 'no'}"
            for device, gib in DEVICES.items()
        )
    return "\n".join(["per device:", *lines, f"fits: {fits}"])
