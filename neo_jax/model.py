"""GPT-Neo in Flax NNX, numerically mirroring transformers' PyTorch ``GPTNeoForCausalLM``.

Read top to bottom: attention, MLP, block, then the model, which runs its blocks as one ``scan``
over the repeating period of the layer pattern (``("global", "local")`` for every released model).

Numerics that differ from a textbook transformer, all as in the reference:
- attention logits ``q @ k^T`` are *not* scaled by ``1/sqrt(head_dim)``;
- q and k are upcast to float32, softmax runs in float32, masked logits get ``finfo(float32).min``,
  and the probabilities are cast to the value dtype before ``@ v``;
- "local" layers see the current token and the previous ``window_size - 1`` tokens;
- the LM head is tied to the token embedding; logits come out in float32.

The attention itself (dense, blockwise, splash or cuDNN, with these numerics in each) is ``neo_jax.attention``.

Every parameter carries logical axis names (``vocab``, ``embed``, ``heads``, ``mlp``, ``position``
and, for the stacked blocks, ``layers``) in its ``out_sharding`` metadata, and the activations are
constrained by logical names too (``batch``, ``heads``, ``mlp``, ``vocab``: see ``neo_jax.sharding``); with
no mesh both are inert.
"""

from __future__ import annotations

import dataclasses
import weakref
from functools import partial
from typing import Any, Protocol, cast

import jax
import jax.numpy as jnp
from flax import nnx
from jax.core import Tracer

from neo_jax import attention as attention_impls
from neo_jax import validate
from neo_jax.config import GPTNeoConfig
from neo_jax.sharding import constrain


class LayerAttention(Protocol):
    """What ``GPTNeo.transform`` calls once per layer to mix the heads: ``layer`` is the layer's index (traced
    inside the layer scan), ``kind`` "global" or "local", q, k, v ``[batch, heads, T, head_dim]``; ``state``
    (a KV cache in generation, None in a forward pass) is threaded through the layers in order."""

    def __call__(self, layer, kind: str, q, k, v, state: Any, /) -> tuple[jax.Array, Any]: ...


class BlockAttention(Protocol):
    """``LayerAttention`` with its layer bound: what a ``Block`` (and its ``Attention``) calls."""

    def __call__(self, kind: str, q, k, v, state: Any, /) -> tuple[jax.Array, Any]: ...


# Rematerialisation: what the backward pass keeps of each layer period ("none": everything).
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # only the period's input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # also the Linear layers' outputs
}

ACTIVATIONS = {
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "gelu": partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def _axes(*names):
    """Variable metadata naming a parameter's logical axes. Placement on a mesh is done by
    ``neo_jax.sharding`` from these names, so the model itself never needs a mesh."""
    return {"out_sharding": names, "eager_sharding": False}


class Dense(nnx.Module):
    """``x @ kernel.T + bias`` with the kernel stored ``[out, in]``, as PyTorch's ``nn.Linear`` stores it:
    checkpoints convert without transposes, and XLA:CPU runs small-batch (decode) matmuls faster in this
    layout. ``names`` are the logical axes of the output and input dimensions."""

    def __init__(self, d_in, d_out, names, *, use_bias, config, dtype, param_dtype, rngs):
        init = nnx.initializers.normal(config.initializer_range)
        self.kernel = nnx.Param(init(rngs.params(), (d_out, d_in), param_dtype), **_axes(*names))
        self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype), **_axes(names[0])) if use_bias else None
        self.dtype = dtype
        self.scale: nnx.Param | None = nnx.data(None)  # int8 weights (neo_jax.quantize): one scale per output channel
        self.lora: nnx.Module | None = nnx.data(None)  # a LoRA adapter (neo_jax.lora.add), if any

    def __call__(self, x):
        y = jnp.einsum("...i,oi->...o", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        y = y if self.scale is None else y * self.scale[...].astype(self.dtype)
        y = y if self.bias is None else y + self.bias[...].astype(self.dtype)
        return y if self.lora is None else y + self.lora(x, self.dtype)


def _known(x) -> bool:
    """Whether ``x``'s values can be read here: not a tracer, not partly on other hosts."""
    return not isinstance(x, Tracer) and getattr(x, "is_fully_addressable", True)


def _layer_norm(config, dtype, param_dtype, rngs):
    return nnx.LayerNorm(
        config.hidden_size,
        epsilon=config.layer_norm_epsilon,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_metadata=_axes("embed"),
        bias_metadata=_axes("embed"),
        rngs=rngs,
    )


def _lookup(embed: nnx.Embed, ids):
    """``embed(ids)``, the rows kept split along ``embed`` as the fsdp-split table gives them, with the batch split
    over ``data`` only (a local slice); the constraint after the lookup then moves the fsdp split onto the batch
    (an all-to-all). Asked for the batch over data x fsdp straight away, XLA replicates the whole activation to
    re-split it on meshes with tensor > 1 (its "involuntary full rematerialization"); gathering the whole table
    instead avoids that too, but costs a full-size table gradient (+0.4 GiB per chip for 1.3B on a v4-8)."""
    rows = jnp.take(embed.embedding[...].astype(embed.dtype), ids, axis=0)
    return constrain(rows, "lookup_batch", *(None,) * (rows.ndim - 2), "embed")


class Attention(nnx.Module):
    """Multi-head self-attention; q, k, v without bias, out_proj with bias."""

    def __init__(self, config: GPTNeoConfig, kind: str, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.kind = kind
        self.num_heads = config.num_heads
        d = config.hidden_size
        dense = partial(Dense, config=config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = dense(d, d, ("heads", "embed"), use_bias=False)
        self.k_proj = dense(d, d, ("heads", "embed"), use_bias=False)
        self.v_proj = dense(d, d, ("heads", "embed"), use_bias=False)
        self.out_proj = dense(d, d, ("embed", "heads"), use_bias=True)

    def split_heads(self, x):
        """[b, t, h*d] -> [b, h, t, d]: heads-major, so attention's matmuls need no transposes."""
        return constrain(x.reshape(*x.shape[:-1], self.num_heads, -1).swapaxes(1, 2), "batch", "heads", None, None)

    def __call__(self, x, attention: BlockAttention, state):
        """``attention(kind, q, k, v, state) -> (out, state)`` mixes the heads: plain masked attention
        in a forward pass, or cache reads and writes during generation (see ``GPTNeo.transform``)."""
        q, k, v = (self.split_heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out, state = attention(self.kind, q, k, v, state)
        out = constrain(out, "batch", "heads", None, None)
        return self.out_proj(out.swapaxes(1, 2).reshape(x.shape)), state


class MLP(nnx.Module):
    def __init__(self, config: GPTNeoConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        dense = partial(Dense, config=config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, use_bias=True)
        self.c_fc = dense(config.hidden_size, config.inner_size, ("mlp", "embed"))
        self.c_proj = dense(config.inner_size, config.hidden_size, ("embed", "mlp"))
        self.activation = config.activation_function

    def __call__(self, x):
        hidden = constrain(self.c_fc(x), "batch", None, "mlp")
        return self.c_proj(ACTIVATIONS[self.activation](hidden))


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: GPTNeoConfig, kind: str, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(config, dtype, param_dtype, rngs)
        self.attn = Attention(config, kind, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln_2 = _layer_norm(config, dtype, param_dtype, rngs)
        self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, attention: BlockAttention, state=None):
        h, state = self.attn(self.ln_1(x), attention, state)
        x = constrain(x + h, "batch", None, None)
        return constrain(x + self.mlp(self.ln_2(x)), "batch", None, None), state


# What a call with output_hidden_states / output_attentions returns, with transformers' field names: every
# layer's input (hidden_states[0] is the embeddings' sum), the last one after ln_f; attention probabilities
# [batch, heads, query, key] per layer. Pytrees, so jitted functions return them.
@partial(
    jax.tree_util.register_dataclass, data_fields=["last_hidden_state", "hidden_states", "attentions"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class BaseModelOutput:
    """A feature-extraction model's (transformers' ``BaseModelOutputWithPast``)."""

    last_hidden_state: jax.Array
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@partial(jax.tree_util.register_dataclass, data_fields=["logits", "hidden_states", "attentions"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class LogitsOutput:
    """A causal LM's, a sequence classifier's or a token classifier's (``CausalLMOutputWithPast``,
    ``SequenceClassifierOutputWithPast``, ``TokenClassifierOutput``)."""

    logits: jax.Array
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@partial(
    jax.tree_util.register_dataclass,
    data_fields=["start_logits", "end_logits", "hidden_states", "attentions"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class QuestionAnsweringOutput:
    """A question-answering model's (``QuestionAnsweringModelOutput``)."""

    start_logits: jax.Array
    end_logits: jax.Array
    hidden_states: tuple | None = None
    attentions: tuple | None = None


def task_head(config: GPTNeoConfig, *, param_dtype, rngs: nnx.Rngs) -> Dense | None:
    """The task's head on the final hidden states, as transformers builds it: sequence classification's
    ``score`` (no bias), token classification's ``classifier`` and question answering's ``qa_outputs`` (with
    bias); None for a causal LM (its head is the token embedding) and for features. It runs in float32."""
    if not config.head_outputs:
        return None
    bias = config.task != "sequence-classification"
    return Dense(
        config.hidden_size,
        config.head_outputs,
        ("labels", "embed"),
        use_bias=bias,
        config=config,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class GPTNeo(nnx.Module):
    """GPT-Neo with the head of ``config.task``: a causal language model (the default), features alone, or
    transformers' sequence classification, token classification or question answering head.

    ``periods`` holds one period of the layer pattern (a list of blocks, e.g. a global then a local
    block) with every parameter stacked along a leading ``layers`` axis of length ``num_periods``:
    layer ``i`` is ``periods[i % period][...][i // period]``.
    """

    def __init__(
        self,
        config: GPTNeoConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        attention: str = "auto",
        rngs: nnx.Rngs,
    ):
        self.config = config  # its architecture in the module, its label names beside it (see ``config``)
        self.dtype = jnp.dtype(dtype)
        self.attention = attention_impls.check_implementation(attention)  # see neo_jax.attention
        embed = partial(
            nnx.Embed,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(config.initializer_range),
            rngs=rngs,
        )
        self.wte = embed(config.vocab_size, config.hidden_size, embedding_metadata=_axes("vocab", "embed"))
        self.wpe = embed(
            config.max_position_embeddings,
            config.hidden_size,
            embedding_metadata=_axes("position", "embed"),
        )

        @nnx.split_rngs(splits=config.num_periods)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked_period(rngs):
            return nnx.List(
                [Block(config, kind, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for kind in config.layer_period]
            )

        self.periods = stacked_period(rngs)
        self.ln_f = _layer_norm(config, dtype, param_dtype, rngs)
        self.head: Dense | None = nnx.data(task_head(config, param_dtype=param_dtype, rngs=rngs))
        self.wte_scale = nnx.data(None)  # int8 token embedding (neo_jax.quantize): one scale per token row

    @property
    def config(self) -> GPTNeoConfig:
        """The model's config. The module holds ``architecture`` (its config with placeholder label names), a
        static part of every compiled program; the label names are kept beside the module, so classifiers that
        differ only in them share their programs (Flax NNX hands a cached program's static values back to the
        model that runs it, so names inside the module could be swapped for another model's). A model rebuilt
        from its graph (``nnx.merge``, inside a program) has the architecture's placeholder names."""
        full = _CONFIGS.get(self)
        return full if full is not None and full.architecture() == self.architecture else self.architecture

    @config.setter
    def config(self, config: GPTNeoConfig) -> None:
        self.architecture = config.architecture()
        _CONFIGS[self] = config

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        *,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> Any:
        """The task's output, float32:

        - causal-lm: logits ``[batch, seq, vocab]``;
        - feature-extraction: the last hidden state ``[batch, seq, embed]`` (in the compute dtype);
        - sequence-classification: logits ``[batch, num_labels]`` at each row's last token that is not
          ``config.pad_token_id`` (the last token when there is none; then a batch must be one row);
        - token-classification: logits ``[batch, seq, num_labels]``;
        - question-answering: ``(start_logits, end_logits)``, each ``[batch, seq]``.

        With ``output_hidden_states`` or ``output_attentions`` the output is an object with transformers' field
        names (``BaseModelOutput``, ``LogitsOutput``, ``QuestionAnsweringOutput``): ``hidden_states`` holds
        ``num_layers + 1`` states (the embeddings' sum, each block's output, the last after ``ln_f``) and
        ``attentions`` each layer's probabilities ``[batch, heads, seq, seq]``, which are computed densely
        whatever the attention implementation.

        Without ``position_ids`` positions are ``0..seq-1`` for every row, as in the reference forward.
        ``attention_mask`` ([batch, seq], 1 = token, 0 = padding, on either side) hides padded keys.

        Called with concrete arrays, ids outside ``[0, vocab_size)`` and a mask that is not 0/1 are a
        ``ValueError``. Inside ``jit`` the values are not known, so nothing is checked: an out-of-range id reads
        a NaN embedding (JAX's gather fills out-of-bounds rows with NaN) and its row's outputs are NaN from that
        position on.
        """
        everything = output_hidden_states or output_attentions
        hidden, layers, attentions = self.features(
            input_ids, attention_mask, position_ids, every_layer=output_hidden_states, attentions=output_attentions
        )
        outputs = self.head_outputs(hidden, input_ids)
        if not everything:
            return outputs
        if self.config.task == "question-answering":
            start, end = outputs
            return QuestionAnsweringOutput(start, end, layers, attentions)
        if self.config.task == "feature-extraction":
            return BaseModelOutput(outputs, layers, attentions)
        return LogitsOutput(outputs, layers, attentions)

    def head_outputs(self, hidden, input_ids) -> Any:
        """The task's output (see ``__call__``) from the final hidden states."""
        task = self.config.task
        if task == "causal-lm":
            return self.logits(hidden)
        if task == "feature-extraction":
            return hidden
        head = cast(Dense, self.head)
        if task == "sequence-classification":  # the head of one position per row, as transformers pools
            return head(hidden[jnp.arange(hidden.shape[0]), self.last_tokens(input_ids)])
        logits = head(hidden)
        if task == "question-answering":
            return logits[..., 0], logits[..., 1]
        return constrain(logits, "batch", None, None)

    def last_tokens(self, input_ids):
        """Each row's last position whose token is not ``pad_token_id`` (0 if all are), as transformers'
        sequence classifier finds it: left and right padding alike."""
        input_ids = jnp.asarray(input_ids)
        pad = self.config.pad_token_id
        if pad is None:
            if input_ids.shape[0] != 1:
                raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
            return jnp.full((1,), input_ids.shape[1] - 1)
        return jnp.argmax(jnp.arange(input_ids.shape[1]) * (input_ids != pad), axis=-1)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, *, remat: str = "none"):
        """The final hidden states ``[batch, seq, embed]`` (after ``ln_f``), before the LM head: the loss
        takes the head of only the positions that predict a token. ``remat`` (training: "full" or "dots",
        ``REMAT_POLICIES``) recomputes each layer period's activations in the backward pass."""
        return self.features(input_ids, attention_mask, position_ids, remat=remat)[0]

    def features(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        *,
        remat: str = "none",
        every_layer: bool = False,
        attentions: bool = False,
    ) -> tuple[jax.Array, tuple | None, tuple | None]:
        """``(final hidden states, every layer's hidden states or None, every layer's attention probabilities
        or None)`` of a forward pass over whole sequences (see ``__call__``)."""
        if _known(input_ids):  # on the host; inside jit see __call__
            validate.token_ids(input_ids, self.config.vocab_size)
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        if attention_mask is not None and _known(attention_mask):
            validate.attention_mask(attention_mask, input_ids.shape, left_padded=False)
        batch, seq_len = input_ids.shape
        if seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_position_embeddings "
                f"({self.config.max_position_embeddings}); shorten or split the input"
            )
        if position_ids is None:
            position_ids = jnp.arange(seq_len)[None, :]
        mask = None if attention_mask is None else jnp.asarray(attention_mask)
        window = self.config.window_size

        def attention(layer, kind, q, k, v, state):
            return attention_impls.self_attention(q, k, v, kind, window, mask, self.attention), state

        def with_probabilities(layer, kind, q, k, v, state):  # always dense: it forms [seq, seq] anyway
            out, probs = attention_impls.dense_self_attention(q, k, v, kind, window, mask)
            return out, jax.lax.dynamic_update_index_in_dim(state, probs, layer, 0)

        state = None
        if attentions:
            shape = (self.config.num_layers, batch, self.config.num_heads, seq_len, seq_len)
            state = constrain(jnp.zeros(shape, self.dtype), None, "batch", "heads", None, None)
        x = self.embed(input_ids, position_ids)
        last, state, outputs = self.blocks(
            x, with_probabilities if attentions else attention, state, remat=remat, every_layer=every_layer
        )
        hidden = self.ln_f(last)
        layers = None if outputs is None else (x, *(outputs[i] for i in range(self.config.num_layers - 1)), hidden)
        probabilities = None if state is None else tuple(state[i] for i in range(self.config.num_layers))
        return hidden, layers, probabilities

    def transform(
        self,
        input_ids,
        position_ids,
        attention: LayerAttention,
        state: Any = None,
        periods=None,
        *,
        remat: str = "none",
    ) -> tuple[jax.Array, Any]:
        """Embeddings, every block, final LayerNorm: ``(hidden [batch, seq, embed], state)``.

        ``attention(layer, kind, q, k, v, state) -> (out, state)`` is called once per layer, where
        ``layer`` is the layer's index (traced inside the scan); ``state`` (e.g. a KV cache) is threaded
        through every layer in order.

        By default the blocks run as one ``scan`` over ``self.periods``. ``periods``, a list of one
        unstacked period per entry (see ``unstack_periods``), runs them in a Python loop instead, with a
        static layer index: decoding uses it, because XLA:CPU copies every weight it slices out of a
        stacked array, which would double the memory traffic of a single-token step.
        """
        x, state, _ = self.blocks(self.embed(input_ids, position_ids), attention, state, periods, remat=remat)
        return self.ln_f(x), state

    def embed(self, input_ids, position_ids):
        """The token and position embeddings' sum, the first block's input."""
        tokens = _lookup(self.wte, input_ids)
        if self.wte_scale is not None:
            tokens = tokens * self.wte_scale[...][input_ids][..., None].astype(tokens.dtype)
        return constrain(tokens + _lookup(self.wpe, position_ids), "batch", None, None)

    def blocks(
        self, x, attention: LayerAttention, state: Any = None, periods=None, *, remat="none", every_layer=False
    ) -> tuple[jax.Array, Any, jax.Array | None]:
        """Every block over ``x`` (see ``transform``): ``(the last block's output, state, every block's output
        stacked [layers, ...] if ``every_layer``, else None)``."""
        size = len(self.config.layer_period)

        def run(x, state, index, period):
            outputs = []
            for slot, block in enumerate(period):
                x, state = block(x, partial(attention, index * size + slot), state)
                outputs.append(x)
            return x, state, jnp.stack(outputs) if every_layer else None

        if periods is None:

            def run_period(carry, period):
                x, state, index = carry
                x, state, outputs = run(x, state, index, period)
                return (x, state, index + 1), outputs

            if remat != "none":  # recompute a period's activations in the backward pass
                run_period = nnx.remat(run_period, policy=REMAT_POLICIES[remat])
            run_period = nnx.scan(run_period, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
            (x, state, _), outputs = run_period((x, state, jnp.int32(0)), self.periods)
        else:
            outputs = []
            for index, period in enumerate(periods):
                x, state, out = run(x, state, index, period)
                outputs.append(out)
            outputs = jnp.stack(outputs) if every_layer else None
        if outputs is not None:  # [periods, period, ...] -> [layers, ...]: layer i is period i // size, slot i % size
            outputs = outputs.reshape(-1, *outputs.shape[2:])
        return x, state, outputs

    def logits(self, hidden):
        """The tied LM head, accumulated and returned in float32."""
        embedding = self.wte.embedding[...].astype(hidden.dtype)
        logits = jnp.einsum("btd,vd->btv", hidden, embedding, preferred_element_type=jnp.float32)
        if self.wte_scale is not None:
            logits = logits * self.wte_scale[...].astype(jnp.float32)
        return constrain(logits, "batch", None, "vocab")


_CONFIGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its config, label names included

INITS = ("gpt-neo", "hf")


def gpt_neo_stds(config: GPTNeoConfig) -> dict[str, float]:
    """The standard deviation of each weight's plain normal in GPT-Neo's own init (EleutherAI/gpt-neo's
    mesh-tensorflow code): q folds in the attention scale GPT-Neo's logits leave out, and ``c_proj`` shrinks
    with depth. Biases are 0, LayerNorms 1 and 0."""
    d, heads, head_dim = config.hidden_size, config.num_heads, config.head_dim
    return {
        "wte": 0.02,
        "wpe": 0.01,
        "q_proj": (d * head_dim) ** -0.5,
        "k_proj": d**-0.5,
        "v_proj": d**-0.5,
        "out_proj": (heads * head_dim) ** -0.5,
        "c_fc": 0.02,
        "c_proj": 0.02 / config.num_layers**0.5,
    }


def _reinit_gpt_neo(model: GPTNeo, key) -> None:
    """Draw every weight matrix and embedding again from ``gpt_neo_stds`` (in place)."""
    stds = gpt_neo_stds(model.config)
    for number, (path, param) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        if path[-1] in ("kernel", "embedding"):
            std = next(stds[str(name)] for name in path if str(name) in stds)
            value = param.get_value()
            noise = jax.random.normal(jax.random.fold_in(key, number), value.shape, jnp.float32)
            param.set_value((std * noise).astype(value.dtype))


def init_model(
    config: GPTNeoConfig,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    seed: int = 0,
    mesh=None,
    rules=None,
    init: str = "gpt-neo",
    attention: str = "auto",
) -> GPTNeo:
    """A randomly initialised model, for pretraining. ``init="gpt-neo"`` (the default) is GPT-Neo's own
    (``gpt_neo_stds``), under which attention logits start with a standard deviation near 1; ``"hf"`` is
    transformers' (every weight normal(0, initializer_range), 0.02), under which they start near 2.5 for 125M
    and 9-12 for 1.3B and 2.7B, since GPT-Neo does not scale its logits.

    With a ``mesh`` (see ``neo_jax.sharding``) every parameter is created directly in its shards.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")

    def create():
        key = jax.random.key(seed)
        model = GPTNeo(config, dtype=dtype, param_dtype=param_dtype, attention=attention, rngs=nnx.Rngs(params=key))
        if init == "gpt-neo":
            _reinit_gpt_neo(model, jax.random.fold_in(key, 1))
        return model

    if mesh is None:
        return create()
    from neo_jax.sharding import param_shardings

    graphdef, state = nnx.split(nnx.eval_shape(create))
    pure = jax.jit(lambda: nnx.to_pure_dict(nnx.state(create())), out_shardings=param_shardings(state, mesh, rules))()
    nnx.replace_by_pure_dict(state, pure)
    model = nnx.merge(graphdef, state)
    model.config = config
    return model
