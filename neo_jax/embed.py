"""Sentence embeddings: one vector per text, pooled from the hidden states as sentence-transformers pools them.

- ``encode(model_or_src, texts)``: a NumPy ``[N, H]`` array, like sentence-transformers' ``encode``.
- ``embed_corpus(...)`` (``neo-jax embed``): every document of a corpus into a float32 ``.npy`` file, written as
  it goes (a memory map), resumable.
- ``Embedder``: the compiled pooled forward both use, and that ``neo-jax serve`` runs for ``/v1/embeddings``.

Poolings (``POOLINGS``), over a text's real tokens: ``mean``; ``weightedmean``, SGPT's position-weighted mean
(token ``i`` of a text weighs ``i + 1``); ``last``, the last token's state. A sentence-transformers checkpoint
(``modules.json`` beside the weights, as SGPT's are published) brings its own pooling (``1_Pooling/config.json``),
normalisation (a ``Normalize`` module) and maximum length (``sentence_bert_config.json``'s ``max_seq_length``, or
its tokenizer's ``model_max_length``); ``recipe_of`` reads them. Any other checkpoint pools by ``mean``.

Texts are tokenized without padding and sorted by length; each batch is padded on the right to a width of
``widths`` (four per doubling: at most a quarter of a batch is padding), with a fixed number of rows, so that a
corpus compiles a few programs. Padding changes no real token's state (the attention is causal).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neo_jax import sharding, validate
from neo_jax.model import GPTNeo

POOLINGS = ("mean", "weightedmean", "last")
_ST_POOLINGS = {"mean": "mean", "weightedmean": "weightedmean", "lasttoken": "last"}  # sentence-transformers' names
_ST_LEGACY = {  # sentence-transformers' older Pooling config: one boolean per mode
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a checkpoint's texts become vectors: ``pooling`` (``POOLINGS``), ``normalize`` (L2, each row) and
    ``max_length`` (tokens kept of a longer text)."""

    pooling: str
    normalize: bool
    max_length: int


def check_pooling(pooling: str, name: str = "pooling") -> str:
    if pooling not in POOLINGS:
        raise ValueError(f"{name} must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    return pooling


def recipe_of(directory: Path | None, config) -> Recipe:
    """A checkpoint's own recipe: a sentence-transformers layout's pooling, normalisation and ``max_seq_length``;
    otherwise ``mean``, not normalised, every position. A layout neo_jax cannot reproduce (a pooling it lacks,
    a ``Dense`` projection, weights in a sub-folder) is a one-line ValueError."""
    positions = config.max_position_embeddings
    modules_file = None if directory is None else Path(directory) / "modules.json"
    if modules_file is None or not modules_file.is_file():
        return Recipe("mean", False, positions)
    modules = _json(modules_file)
    pooling, normalize = "mean", False
    for module in modules if isinstance(modules, list) else []:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        where = Path(directory) / str(module.get("path", ""))  # pyright: ignore[reportArgumentType]
        if kind == "Transformer":
            if module.get("path", ""):
                raise ValueError(
                    f"{directory}: the Transformer module is in {module['path']!r}; load that folder's weights"
                )
        elif kind == "Pooling":
            pooling = _st_pooling(where / "config.json")
        elif kind == "Normalize":
            normalize = True
        else:
            raise ValueError(
                f"{directory}: its sentence-transformers module {kind!r} is not one neo_jax runs (Transformer, "
                "Pooling, Normalize)"
            )
    max_length = None
    settings = Path(directory) / "sentence_bert_config.json"  # pyright: ignore[reportArgumentType]
    if settings.is_file():
        max_length = _json(settings).get("max_seq_length")
    if max_length is None and (tokenizer := Path(directory) / "tokenizer_config.json").is_file():  # pyright: ignore[reportArgumentType]
        max_length = _json(tokenizer).get("model_max_length")
    if not isinstance(max_length, int) or not 0 < max_length < positions:
        max_length = positions
    return Recipe(pooling, normalize, max_length)


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} could not be read as JSON ({e}); fix or remove it") from None


def _st_pooling(path: Path) -> str:
    config = _json(path) if path.is_file() else {}
    modes = config.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in _ST_LEGACY.items() if config.get(key)] or ["mean"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1 or modes[0] not in _ST_POOLINGS:
        raise ValueError(
            f"{path}: pooling {'+'.join(map(str, modes))} is not one neo_jax computes ({', '.join(_ST_POOLINGS)}); "
            "pass a pooling of your own"
        )
    return _ST_POOLINGS[modes[0]]


def widths(limit: int) -> list[int]:
    """The padded widths a batch may have, up to ``limit``: multiples of 8 up to 64, then four per doubling (80,
    96, 112, 128, 160, ...), and ``limit`` itself."""
    out, width = [], 8
    while width < limit:
        out.append(width)
        width += max(8, 2 ** (width.bit_length() - 1) // 4)
    return [*out, limit]


def width_of(length: int, limit: int) -> int:
    return next(w for w in widths(limit) if w >= length)


def pool(hidden, mask, pooling: str):
    """``[batch, seq, hidden]`` states pooled over ``mask``'s tokens (1) into float32 ``[batch, hidden]``, as
    sentence-transformers' ``Pooling`` does: a row without tokens pools to zeros."""
    hidden = hidden.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    if pooling == "last":
        seq = mask.shape[1]
        last = seq - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # the last token; the last position if none
        rows = jnp.arange(hidden.shape[0])
        return hidden[rows, last] * mask[rows, last][:, None]
    weights = mask
    if pooling == "weightedmean":  # 1, 2, ... from a row's first token
        first = jnp.argmax(mask, axis=1)
        weights = mask * (jnp.arange(1, mask.shape[1] + 1)[None, :] - first[:, None])
    total = jnp.einsum("bth,bt->bh", hidden, weights)
    return total / jnp.maximum(weights.sum(axis=1, keepdims=True), 1e-9)


def normalized(x):
    """Each row over its L2 norm (``torch.nn.functional.normalize``: at least 1e-12)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def from_sums(sums: np.ndarray, tokens: int, pooling: str, normalize: bool) -> np.ndarray:
    """A text's vector from its final states' sums (``[3, H]``: plain, weighted by position + 1, the last token's;
    the serving engine adds them up chunk by chunk): what ``pool`` gives for one text of ``tokens`` tokens."""
    if pooling == "mean":
        vector = sums[0] / tokens
    elif pooling == "weightedmean":
        vector = sums[1] / (tokens * (tokens + 1) / 2)
    else:
        vector = sums[2]
    vector = np.asarray(vector, np.float32)
    return vector / max(float(np.linalg.norm(vector)), 1e-12) if normalize else vector


def _pooled(graphdef, state, input_ids, attention_mask, *, pooling: str, layer: int | None, normalize: bool):
    model = nnx.merge(graphdef, state)
    hidden, layers, _ = model.features(input_ids, attention_mask, every_layer=layer is not None)
    if layer is not None:
        hidden = layers[layer]  # pyright: ignore[reportOptionalSubscript]
    out = pool(hidden, attention_mask, pooling)
    return sharding.constrain(normalized(out) if normalize else out, "batch", None)


def check_max_length(max_length: int, config, name: str = "max_length") -> int:
    """``max_length`` if it is a positive integer within the model's positions."""
    validate.integer(name, max_length, least=1)
    if max_length > config.max_position_embeddings:
        raise ValueError(f"{name} {max_length} is more than the model's {config.max_position_embeddings} positions")
    return max_length


def check_layer(layer: int | None, config) -> int | None:
    """``layer`` as an index into the hidden states (transformers' ``hidden_states``: 0 the embeddings, ``L`` the
    last block's output after the final LayerNorm; negative counts from the end); None: the last."""
    if layer is None:
        return None
    validate.integer("layer", layer)
    count = config.num_layers + 1
    if not -count <= layer < count:
        raise ValueError(f"layer must be in [{-count}, {count}) for this {config.num_layers}-layer model, got {layer}")
    return layer % count if layer % count != config.num_layers else None


class Embedder:
    """The pooled forward of ``model``, compiled once per padded width: ``embedder(token_lists)`` is a float32
    ``[len(token_lists), H]`` array, rows in the order given. ``batch_size`` rows run per call (a mesh's batch
    axes split them); shorter batches are padded with empty rows."""

    def __init__(
        self,
        model: GPTNeo,
        *,
        pooling: str = "mean",
        normalize: bool = False,
        layer: int | None = None,
        max_length: int | None = None,
        batch_size: int = 32,
    ):
        config = model.config
        self.pooling, self.normalize = check_pooling(pooling), normalize
        self.layer = check_layer(layer, config)
        validate.integer("batch_size", batch_size, least=1)
        self.max_length = check_max_length(config.max_position_embeddings if max_length is None else max_length, config)
        self.batch_size, self.width = batch_size, config.hidden_size
        self.mesh = sharding.model_mesh(model)
        graphdef, self.state = nnx.split(model)
        fn = partial(_pooled, graphdef, pooling=self.pooling, layer=self.layer, normalize=normalize)
        self._run = jax.jit(fn)

    def compile(self, width: int):
        """The program for batches padded to ``width`` (compiled now if it is not yet)."""
        ids = jax.ShapeDtypeStruct((self.batch_size, width), jnp.int32)
        with sharding.use_mesh(self.mesh):
            return self._run.lower(self.state, ids, ids).compile()

    def run(self, token_lists: Sequence[Sequence[int]]) -> jax.Array:
        """One batch (at most ``batch_size`` texts of at most ``max_length`` tokens), as a device array
        ``[batch_size, H]``, split over the mesh's batch axes; rows past the texts are zeros."""
        if len(token_lists) > self.batch_size:
            raise ValueError(f"a batch holds at most {self.batch_size} texts, got {len(token_lists)}")
        longest = max((len(t) for t in token_lists), default=1)
        if longest > self.max_length:
            raise ValueError(f"a text of {longest} tokens is longer than max_length {self.max_length}")
        width = width_of(max(longest, 1), self.max_length)
        ids = np.zeros((self.batch_size, width), np.int32)
        mask = np.zeros((self.batch_size, width), np.int32)
        for row, tokens in enumerate(token_lists):
            ids[row, : len(tokens)], mask[row, : len(tokens)] = tokens, 1
        with sharding.use_mesh(self.mesh):
            return self._run(self.state, *(sharding.place_batch(x, self.mesh) for x in (ids, mask)))

    def batches(self, token_lists: Sequence[Sequence[int]]) -> Iterator[tuple[list[int], jax.Array]]:
        """``(indices, run's output)`` for every ``batch_size`` texts, longest first: row k of the output is text
        ``indices[k]``'s."""
        order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))
        for start in range(0, len(order), self.batch_size):
            chosen = order[start : start + self.batch_size]
            yield chosen, self.run([token_lists[i] for i in chosen])

    def __call__(self, token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """Every text's vector, in the order given."""
        out = np.zeros((len(token_lists), self.width), np.float32)
        for chosen, rows in self.batches(token_lists):
            out[chosen] = np.asarray(rows)[: len(chosen)]
        return out


def _loaded(model_or_src, **loading) -> GPTNeo:
    from neo_jax.convert import from_pretrained

    if isinstance(model_or_src, GPTNeo):
        if loading:
            raise ValueError(f"{', '.join(loading)} apply when encode loads the model; this one is loaded")
        return model_or_src
    return from_pretrained(model_or_src, task="feature-extraction", progress=False, **loading)


def encode(
    model_or_src,
    texts: str | Iterable[str],
    pooling: str | None = None,
    normalize: bool | None = None,
    batch_size: int = 32,
    *,
    tokenizer=None,
    layer: int | None = None,
    max_length: int | None = None,
    **loading,
) -> np.ndarray:
    """Sentence embeddings of ``texts``, float32 ``[N, H]`` (``[H]`` for one string), as sentence-transformers'
    ``SentenceTransformer.encode`` computes them. ``model_or_src``: a loaded model, or anything
    ``from_pretrained`` reads (keywords such as ``dtype`` or ``mesh`` go to it). ``pooling``, ``normalize`` and
    ``max_length`` default to the checkpoint's own (``recipe_of``); ``layer`` takes an earlier layer's states."""
    from neo_jax.convert import source_of
    from neo_jax.hf import load_tokenizer

    model = _loaded(model_or_src, **loading)
    directory = source_of(model)
    recipe = recipe_of(directory, model.config)
    if tokenizer is None:
        if directory is None:
            raise ValueError("this model was not loaded from a directory: pass tokenizer=...")
        tokenizer = load_tokenizer(directory)
    one = isinstance(texts, str)
    texts = [texts] if isinstance(texts, str) else list(texts)
    for text in texts:
        if not isinstance(text, str):
            raise ValueError(f"encode takes strings, got {type(text).__name__}")
    embedder = Embedder(
        model,
        pooling=recipe.pooling if pooling is None else pooling,
        normalize=recipe.normalize if normalize is None else normalize,
        layer=layer,
        max_length=recipe.max_length if max_length is None else max_length,
        batch_size=batch_size,
    )
    tokens = tokenize(tokenizer, texts, embedder.max_length)[0] if texts else []
    out = embedder(tokens)
    return out[0] if one else out


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
    """Each text's token ids, cut to ``max_length``, and how many texts were cut."""
    # one token past the limit: enough to tell a cut text, and nothing longer is kept
    ids = tokenizer(texts, truncation=True, max_length=max_length + 1)["input_ids"] if texts else []
    cut = sum(len(t) > max_length for t in ids)
    return [t[:max_length] for t in ids], cut


# ------------------------------------------------------------------------------------------------ a corpus
WINDOW = 4096  # documents read, sorted and embedded together; the resume point


def output_path(output: str | os.PathLike, sources: Sequence, overwrite: bool) -> Path:
    """``output`` (absolute) if embeddings may be written there: a ``.npy`` name, not one of the sources, and
    new unless ``overwrite`` (or an unfinished run's, which continues)."""
    out = Path(output).expanduser().absolute()
    if out.suffix != ".npy":
        raise ValueError(f"--output {output} must name a .npy file (NumPy's format, which numpy.load maps)")
    if out.is_dir():
        raise ValueError(f"--output {output} is a directory: name a .npy file")
    for source in sources:
        if isinstance(source, Path) and (out == source.absolute() or source.absolute() in out.parents):
            raise ValueError(f"--output {output} is one of the sources: write elsewhere")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent} does not exist: create it first")
    return out


def _state_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.embed-state.json")


def _partial_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial")


def embed_corpus(
    embedder: Embedder,
    tokenizer,
    documents: Callable[[], Iterable[str]],
    out: Path,
    settings: dict,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Embed every document of ``documents()`` (called twice: once to count them) into ``out``, row i for
    document i, and return the summary. Rows go into a hidden memory-mapped ``.npy`` beside ``out``, a window of
    ``WINDOW`` documents at a time; after each window the progress file records it, so a run stopped midway
    continues (the same ``settings`` and sources) from its last whole window. The finished file is renamed into
    place. With several processes every one reads the corpus and embeds its rows of each global batch into the
    one file (which must then be on storage they share)."""
    from tqdm.auto import tqdm

    from neo_jax import distributed

    state_file, partial_file = _state_path(out), _partial_path(out)
    state = None
    if state_file.is_file() and partial_file.is_file():
        state = json.loads(state_file.read_text())
        if state.get("settings") != settings:
            changed = sorted(
                k for k in {**settings, **state.get("settings", {})} if state["settings"].get(k) != settings.get(k)
            )
            raise ValueError(
                f"{out} has an unfinished run with other settings ({', '.join(changed)}): run it again as it was, "
                f"or remove {partial_file.name} and {state_file.name} beside it to start over"
            )
        log(f"continuing {out.name}: {state['done']} of {state['count']} documents were embedded")
    main = distributed.is_main_process()
    if state is None:
        count = sum(1 for _ in documents())
        if count == 0:
            raise ValueError("the sources hold no documents")
        state = {"settings": settings, "count": count, "done": 0, "cut": 0, "tokens": 0, "empty": 0}
        if main:
            np.lib.format.open_memmap(partial_file, mode="w+", dtype=np.float32, shape=(count, embedder.width)).flush()
            _write_state(state_file, state)
    distributed.barrier(f"created {out}")
    rows = np.lib.format.open_memmap(partial_file, mode="r+")
    if rows.shape != (state["count"], embedder.width):
        raise ValueError(f"{partial_file} holds {rows.shape}, not {(state['count'], embedder.width)}: remove it")
    bar = tqdm(
        total=state["count"], initial=state["done"], unit="doc", disable=not (progress and main), dynamic_ncols=True
    )
    stream = iter(documents())
    if sum(1 for _ in itertools.islice(stream, state["done"])) < state["done"]:
        raise ValueError(f"the sources now hold fewer than the {state['done']} documents embedded: they changed")
    first, seen, tokens_before = state["done"], 0, state["tokens"]
    while first < state["count"]:
        texts = [text for _, text in zip(range(WINDOW), stream, strict=False)]
        if not texts:
            raise ValueError(f"the sources now hold {first} documents, not {state['count']}: they changed; start over")
        tokens, cut = tokenize(tokenizer, texts, embedder.max_length)
        for chosen, out_rows in embedder.batches(tokens):
            for shard in out_rows.addressable_shards:  # this process's rows (replicas write the same values)
                lo = shard.index[0].start or 0
                values = np.asarray(shard.data)
                for k in range(values.shape[0]):
                    if lo + k < len(chosen):
                        rows[first + chosen[lo + k]] = values[k]
            seen += sum(len(tokens[i]) for i in chosen)
            bar.update(len(chosen))
            bar.set_postfix_str(_rates(bar, seen), refresh=False)
        rows.flush()
        distributed.barrier(f"window {first} of {out}")
        first += len(texts)
        state.update(
            done=first,
            tokens=tokens_before + seen,
            cut=state["cut"] + cut,
            empty=state["empty"] + sum(not t for t in tokens),
        )
        if main:
            _write_state(state_file, state)
    bar.close()
    del rows
    distributed.barrier(f"embedded {out}")
    if main:
        os.replace(partial_file, out)
        state_file.unlink()
    return {key: state[key] for key in ("count", "tokens", "cut", "empty")}


def _rates(bar, tokens: int) -> str:
    elapsed = bar.format_dict.get("elapsed") or 0
    if not elapsed:
        return ""
    return f"{tokens / elapsed:,.0f} tokens/s"  # beside tqdm's own documents/s


def _write_state(path: Path, state: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(state))
    os.replace(temporary, path)
