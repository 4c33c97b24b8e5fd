"""Training data: documents from text files, JSONL or Hugging Face datasets, tokenized once into flat token
shards (``neo_jax.prepare``, ``neo-jax data prepare``), then memory-mapped and served as batches by step number.

Sources (any mix, in order):

- a text file or glob: each file is one document;
- a ``.jsonl`` file or glob: each line's text field is one document;
- a directory written by ``datasets.Dataset.save_to_disk``: each row's text field;
- ``hf:NAME`` or ``hf:NAME:CONFIG``: ``datasets.load_dataset`` on a hub dataset (streamed, so nothing but
  the text is kept) or a local dataset directory, the split given by ``split``.

A prepared directory holds ``manifest.json`` and its shards: each shard is the raw little-endian token array
(uint16, or uint32 for vocabularies above 65536) of whole documents, each followed by EOS. ``TokenData`` maps
them; the training split is one stream cut into windows of ``seq_len`` tokens, and ``Batches`` picks the rows of
step ``k`` through a keyed permutation of the windows (a new one each epoch) that needs O(1) memory, so the
batch of step ``k`` depends only on the manifest, the seed and ``k``: a resumed run continues on exactly the
batch it would have seen, on any number of hosts. ``Loader`` places each step's batch on the mesh, every process
reading only the rows of its own devices, a few steps ahead in a background thread.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import queue
import re
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from neo_jax import corpus

HUB_PREFIX = "hf:"
SAVED_DATASET_FILES = ("dataset_info.json", "dataset_dict.json", "state.json")
PIECE_CHARS = 1 << 20  # the most text the tokenizer is given at once: longer documents are cut into pieces


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in SAVED_DATASET_FILES)


def expand_paths(patterns: Sequence[str]) -> list[Path | str]:
    """The sources named by ``patterns``: files of paths or globs (sorted within each glob), URLs (their globs
    expanded by fsspec, ``neo_jax.corpus``), saved-dataset directories, and ``hf:`` names as they are. A pattern
    matching nothing is an error, raised before any data is read."""
    sources = []
    for pattern in patterns:
        if corpus.is_url(pattern):
            sources.extend(corpus.expand_url(pattern))
            continue
        if pattern.startswith(HUB_PREFIX):
            if not pattern[len(HUB_PREFIX) :]:
                raise ValueError(f"{pattern!r} names no dataset: write hf:NAME or hf:NAME:CONFIG")
            sources.append(pattern)
            continue
        matches = _glob(pattern)
        datasets = [m for m in matches if is_saved_dataset(m)]
        files = [m for m in matches if m.is_file()]
        if not datasets and not files:
            hint = " (a directory: pass a glob of its files, e.g. DIR/*.txt)" if Path(pattern).is_dir() else ""
            raise FileNotFoundError(f"no data file matches {pattern!r}{hint}")
        sources.extend(datasets + files)
    return sources


def _glob(pattern: str) -> list[Path]:
    """What ``glob.glob(pattern, recursive=True)`` matches, sorted, except that ``**`` does not descend into
    symlinked directories (a link cycle such as ``sub/self -> .`` would otherwise never end: pathlib's walk)
    and a file reached twice through links is read once."""
    path = Path(pattern).expanduser()
    parts = path.parts
    first = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), None)
    if first is None:
        return [path] if path.exists() else []
    root, rest = Path(*parts[:first]) if first else Path(), Path(*parts[first:])
    dotted = any(part.startswith(".") for part in rest.parts)  # as glob: '*' does not match hidden names
    matches, seen = [], set()
    for match in sorted(root.glob(str(rest))):
        if not dotted and any(part.startswith(".") for part in match.relative_to(root).parts):
            continue
        if (real := match.resolve()) not in seen:
            seen.add(real)
            matches.append(match)
    return matches


def pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """``text`` in pieces of at most ``size`` characters, so that a tokenizer's memory does not grow with a
    document. Each cut is made just before a space that precedes a non-space: where the pre-tokenizers of
    byte-level BPE (GPT-2's, GPT-Neo's: ``' ?\\p{L}+'`` and the like, with ``'\\s+(?!\\S)'`` leaving a run's last
    space to the next word) and SentencePiece start a new word, so the pieces' tokens, joined, are the whole
    text's. A stretch of ``size / 2`` characters with no such space is cut where the size runs out."""
    out, start = [], 0
    while len(text) - start > size:
        low, cut = start + size // 2, text.rfind(" ", start + size // 2, start + size)
        while cut > low and text[cut + 1].isspace():
            cut = text.rfind(" ", low, cut)
        cut = cut if cut > low else start + size
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def _dataset_texts(source: Path | str, split: str, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading {source} needs Hugging Face datasets: pip install 'neo_jax[train]'") from None
    if isinstance(source, Path):
        dataset = datasets.load_from_disk(str(source))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"{source} has splits {sorted(dataset)}, not {split!r}: choose one with --split")
            dataset = dataset[split]
    else:
        name, _, config = source[len(HUB_PREFIX) :].partition(":")
        dataset = datasets.load_dataset(name, config or None, split=split, streaming=True)
    for number, row in enumerate(dataset):
        if text_field not in row:
            raise ValueError(
                f"{source} row {number} has no column {text_field!r} (it has {sorted(row)}): set --text-field"
            )
        if not isinstance(row[text_field], str):
            kind = type(row[text_field]).__name__
            raise ValueError(f"{source} row {number}: column {text_field!r} holds {kind}, not a string")
        yield row[text_field]


def read_documents(patterns: Sequence[str], text_field: str = "text", split: str = "train") -> Iterator[str]:
    """Documents, in order: each line's ``text_field`` of ``.jsonl`` files, each row's ``text_field`` of
    Hugging Face datasets (their ``split``), each other file whole. A file that is not UTF-8 text, a line that
    is not JSON and a text with a lone surrogate are ValueErrors naming the file and line or byte."""
    yield from read_sources(expand_paths(patterns), text_field, split)


def read_sources(sources: Sequence[Path | str], text_field: str = "text", split: str = "train") -> Iterator[str]:
    """``read_documents`` of sources already expanded (``expand_paths``)."""
    for path in sources:
        yield from _documents_of(path, text_field, split)


def _documents_of(path, text_field: str, split: str) -> Iterator[str]:
    if (isinstance(path, str) and not corpus.is_url(path)) or (isinstance(path, Path) and path.is_dir()):
        yield from _dataset_texts(path, split, text_field)
    else:
        yield from corpus.documents(path, text_field)


def tokenized_documents(
    patterns: Sequence[str], tokenizer, text_field: str = "text", split: str = "train"
) -> Iterator[list[int]]:
    """The token ids of each document of ``patterns`` (``read_documents``), encoded a thousand at a time (fast
    tokenizers encode a list in parallel); a document longer than ``PIECE_CHARS`` in ``pieces``."""
    texts = read_documents(patterns, text_field, split)
    for chunk in iter(lambda: list(itertools.islice(texts, 1000)), []):
        if all(len(text) <= PIECE_CHARS for text in chunk):
            yield from tokenizer(chunk, verbose=False)["input_ids"]
            continue
        for text in chunk:  # a long document is encoded a piece at a time
            yield [token for piece in pieces(text) for token in tokenizer(piece, verbose=False)["input_ids"]]


MANIFEST = "manifest.json"
STATE = ".prepare-state.json"  # an unfinished prepare's progress (a part's: .part-I-of-N-state.json)
FORMAT = 1  # the manifest's layout version
SPLITS = ("train", "validation")
MAX_PARTS = 99_999  # --shard I/N: parts are named with five digits
_PART = re.compile(r"part-(\d{5,})-of-(\d{5,})\.json")


def is_prepared(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by ``neo-jax data prepare`` (whole, some of its parts, or an
    unfinished prepare, which ``read_manifest`` then names as such)."""
    path = Path(path).expanduser()
    return path.is_dir() and (
        (path / MANIFEST).is_file() or any(path.glob("part-*-of-*.json")) or bool(progress_files(path))
    )


def progress_files(directory: Path) -> list[Path]:
    """The progress files of unfinished prepares in ``directory`` (a whole one's, and each part's)."""
    return [*directory.glob(STATE), *directory.glob(".part-*-of-*-state.json")]


def part_manifests(directory: Path) -> list[Path]:
    return sorted(directory.glob("part-*-of-*.json"))


def union(directory: Path, manifests: list[dict]) -> dict:
    """One manifest for the parts of a ``--shard I/N`` preparation (all N, in order), which must agree."""
    first = manifests[0]
    named = lambda m: [(s["name"], s["size"]) for s in m["sources"]]
    for other in manifests[1:]:
        for key in ("dtype", "eos_token_id", "vocab_size", "tokenizer", "settings", "sources"):
            differ = named(other) != named(first) if key == "sources" else other.get(key) != first.get(key)
            if differ:
                raise ValueError(
                    f"the parts in {directory} differ in {key}: prepare them with the same sources and settings"
                )
    return first | {
        "parts": list(range(len(manifests))),
        # parts that took whole files each hashed only their own: each source's hash from the part that has it
        "sources": [
            next((m["sources"][i] for m in manifests if m["sources"][i]["sha256"] is not None), source)
            for i, source in enumerate(first["sources"])
        ],
        "shards": [shard for m in manifests for shard in m["shards"]],
        "tokens": {k: sum(m["tokens"][k] for m in manifests) for k in first["tokens"]},
        "documents": {k: sum(m["documents"][k] for m in manifests) for k in first["documents"]},
    }


def read_manifest(directory: Path) -> dict:
    """``directory``'s manifest, checked for form: ``manifest.json``, or the union of all N part manifests of a
    ``--shard I/N`` preparation (copied together from several machines, say). Missing parts are named."""
    path = directory / MANIFEST
    if path.is_file():
        return _checked(path, _load(path))
    parts = part_manifests(directory)
    if not parts:
        if progress_files(directory):
            raise ValueError(
                f"{directory} holds an incomplete prepare (no {MANIFEST} yet): run the same prepare command again "
                "to finish it"
            )
        raise FileNotFoundError(
            f"{directory} is not a prepared data directory (no {MANIFEST}): see neo-jax data prepare"
        )
    numbers = []
    for part in parts:
        match = _PART.fullmatch(part.name)
        if match is None or not int(match[1]) < int(match[2]) <= MAX_PARTS:
            raise ValueError(f"{part} is not a part manifest of at most {MAX_PARTS:,} parts: remove it")
        numbers.append((int(match[1]), int(match[2])))
    totals = {total for _, total in numbers}
    if len(totals) > 1:
        raise ValueError(f"{directory} holds parts of preparations into {sorted(totals)} parts: keep one of them")
    total, have = totals.pop(), {index for index, _ in numbers}
    if len(have) < total:
        missing = [i for i in range(total) if i not in have]
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise ValueError(
            f"{directory} holds {len(have)} of {total} parts and no {MANIFEST}: prepare the missing part(s) "
            f"[{shown}] into it (neo-jax data prepare --shard I/{total})"
        )
    return _checked(directory / parts[0].name, union(directory, [_checked(p, _load(p)) for p in parts]))


def _load(path: Path) -> dict:
    manifest = corpus.parse_json(corpus.text(path.read_bytes(), str(path), "byte"), str(path))
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} is not a neo_jax data manifest: prepare the data again")
    return manifest


def _checked(path: Path, manifest: dict) -> dict:
    """``manifest`` if every field has its type and the shards are listed once each, inside the directory."""
    count = lambda v, least=0: isinstance(v, int) and not isinstance(v, bool) and v >= least
    fields = {
        "dtype": (lambda v: v in ("uint16", "uint32"), "uint16 or uint32"),
        "eos_token_id": (count, "a token id"),
        "vocab_size": (lambda v: count(v, 1), "a positive integer"),
        "tokenizer": (
            lambda v: isinstance(v, dict) and isinstance(v.get("vocab_sha256", ""), str),
            "an object (its files, source and vocab_sha256)",
        ),
        "shards": (lambda v: isinstance(v, list), "a list"),
    }
    for key, (valid, what) in fields.items():
        if key not in manifest:
            raise ValueError(f"{path} is not a neo_jax data manifest (it has no {key!r}): prepare the data again")
        if not valid(manifest[key]):
            raise ValueError(f"{path}: {key} must be {what}, got {_short(manifest[key])}: prepare the data again")
    if manifest["eos_token_id"] >= manifest["vocab_size"]:
        raise ValueError(
            f"{path}: eos_token_id {manifest['eos_token_id']} is outside vocab_size {manifest['vocab_size']}"
        )
    seen = set()
    for shard in manifest["shards"]:
        if not (isinstance(shard, dict) and isinstance(shard.get("path"), str) and shard.get("split") in SPLITS):
            raise ValueError(f"{path}: a shard must be {{path, tokens, documents, split}}, got {_short(shard)}")
        if not (count(shard.get("tokens")) and count(shard.get("documents", 0))):
            raise ValueError(f"{path}: shard {shard['path']} needs whole-number tokens and documents")
        relative = Path(shard["path"])
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"{path}: shard path {shard['path']!r} must be relative to the directory")
        if relative in seen:
            raise ValueError(f"{path} lists shard {shard['path']} twice: prepare the data again")
        seen.add(relative)
    return manifest


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Stream:
    """The shards of one split, read as one token stream (memory-mapped: nothing is read until asked for)."""

    def __init__(self, directory: Path, shards: list[dict], dtype: np.dtype):
        shards = [s for s in shards if s["tokens"]]
        self.paths = [directory / s["path"] for s in shards]
        self.starts = np.cumsum([0] + [s["tokens"] for s in shards])
        self.tokens = int(self.starts[-1])
        self.documents = sum(s.get("documents", 0) for s in shards)
        self.dtype = dtype
        self._maps: dict[int, np.memmap] = {}

    def _map(self, index: int) -> np.memmap:
        if index not in self._maps:
            self._maps[index] = np.memmap(self.paths[index], dtype=self.dtype, mode="r")
        return self._maps[index]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the stream as int32, across shard boundaries."""
        pieces, first = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        for index in range(first, len(self.paths)):
            begin, end = self.starts[index], self.starts[index + 1]
            if begin >= stop:
                break
            pieces.append(self._map(index)[max(start, begin) - begin : min(stop, end) - begin])
        return np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)


class TokenData:
    """A prepared directory (``neo-jax data prepare``): its manifest checked against the files, and the
    ``train`` and ``validation`` splits as memory-mapped ``Stream``s. A missing, truncated or unlisted shard is
    a ValueError naming it. ``fingerprint`` hashes the manifest (which records every shard's size and the
    sources' hashes), so a resumed run checks its data without reading it."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser()
        if not self.directory.is_dir():
            raise FileNotFoundError(f"no prepared data directory {self.directory}")
        self.manifest = read_manifest(self.directory)
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        listed, inside = set(), self.directory.resolve()
        for shard in self.manifest["shards"]:
            path = self.directory / shard["path"]
            listed.add(path.resolve())
            if inside not in path.resolve().parents:
                raise ValueError(
                    f"shard {path} leads out of {self.directory} (a link to {path.resolve()}): a prepared directory "
                    "holds its own shards; copy the file in"
                )
            if not path.is_file():
                raise ValueError(
                    f"{self.directory} is missing shard {shard['path']} that its manifest lists: copy it again, "
                    "or prepare the data again"
                )
            expected = shard["tokens"] * self.dtype.itemsize
            if path.stat().st_size != expected:
                raise ValueError(
                    f"shard {path} holds {path.stat().st_size} bytes, but the manifest says {shard['tokens']} tokens "
                    f"({expected} bytes): it is truncated or changed; copy it again, or prepare the data again"
                )
            self._check_sample(path, shard["tokens"])
        extra = sorted(p for p in self.directory.rglob("*.bin") if p.resolve() not in listed)
        if extra:
            raise ValueError(
                f"{self.directory} holds shard {extra[0].relative_to(self.directory)} that its manifest does not "
                "list: remove it, or prepare the data again"
            )
        shards = self.manifest["shards"]
        self.train, self.validation = (
            Stream(self.directory, [s for s in shards if s["split"] == split], self.dtype) for split in SPLITS
        )
        self.fingerprint = hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()[:16]
        self.eos_token_id = self.manifest["eos_token_id"]
        self.vocab_size = self.manifest.get("vocab_size")

    SAMPLE = 1 << 16  # tokens read from each end of a shard when it is opened

    def _check_sample(self, path: Path, tokens: int) -> None:
        """The first and last ``SAMPLE`` tokens of a shard are ids of the manifest's vocabulary: a shard of other
        data (or damaged) is named here, not later as a NaN loss."""
        if not tokens:
            return
        ids = np.memmap(path, dtype=self.dtype, mode="r")
        largest = max(int(ids[: self.SAMPLE].max()), int(ids[-self.SAMPLE :].max()))
        if largest >= self.manifest["vocab_size"]:
            raise ValueError(
                f"shard {path} holds token id {largest}, at or above the vocabulary's {self.manifest['vocab_size']} "
                "(vocab_size in its manifest): it is not this data or it is damaged; prepare the data again"
            )

    def check_model(self, config, tokenizer=None) -> None:
        """The data's tokens must be the model's: every id inside its vocabulary, and (when the model comes
        with a tokenizer) the same vocabulary and EOS."""
        if self.vocab_size is not None and self.vocab_size > config.vocab_size:
            raise ValueError(
                f"{self.directory} was tokenized with a vocabulary of {self.vocab_size} tokens, more than the model's "
                f"{config.vocab_size} (vocab_size): prepare the data with the model's tokenizer"
            )
        if tokenizer is not None:
            mine = self.manifest.get("tokenizer", {}).get("vocab_sha256")
            if mine is not None and (mine != vocab_hash(tokenizer) or tokenizer.eos_token_id != self.eos_token_id):
                raise ValueError(
                    f"{self.directory} was tokenized with another tokenizer than the model's (its vocabulary or EOS "
                    "differ): prepare the data with --tokenizer set to the model"
                )


def vocab_hash(tokenizer) -> str:
    """A hash of a tokenizer's vocabulary (token -> id), added tokens included."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


class Permutation:
    """A keyed pseudo-random permutation of ``[0, n)`` in O(1) memory: a balanced Feistel network over the
    smallest even number of bits that covers ``n``, walking the cycle until the value falls inside (the
    design of levanter's ``data/_prp.py``, with a multiply-xorshift round function)."""

    ROUNDS = 6

    def __init__(self, n: int, key: Sequence[int]):
        self.n = n
        half = max(1, math.ceil(math.log2(max(n, 2)) / 2))
        self.half, self.mask = np.uint64(half), np.uint64((1 << half) - 1)
        self.keys = np.random.default_rng(list(key)).integers(0, 2**63, self.ROUNDS, dtype=np.uint64)

    def _round(self, right: np.ndarray, key: np.uint64) -> np.ndarray:
        x = (right ^ key) * np.uint64(0x9E3779B97F4A7C15)
        x ^= x >> np.uint64(29)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        return (x ^ (x >> np.uint64(32))) & self.mask

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._round(right, key)
        return (left << self.half) | right

    def __call__(self, indices) -> np.ndarray:
        shape = np.shape(indices)
        x = np.atleast_1d(np.asarray(indices, dtype=np.uint64)).ravel()  # arrays: uint64 products wrap silently
        if x.size and (x.max() >= self.n):
            raise IndexError(f"index {int(x.max())} is outside a permutation of {self.n}")
        out = self._feistel(x)
        outside = out >= self.n
        while outside.any():  # cycle walking: the domain is under 4n, so a few rounds on average
            out[outside] = self._feistel(out[outside])
            outside = out >= self.n
        return out.astype(np.int64).reshape(shape)


class Batches:
    """The training batches of a prepared directory: window ``j`` of the training stream is tokens
    ``[j * seq_len, (j + 1) * seq_len)``; row ``r`` of step ``k`` is window ``perm_e(i * batch_size + r)``, where
    ``e, i = divmod(k, steps_per_epoch)`` and ``perm_e`` is the permutation keyed by (seed, e). The windows an
    epoch leaves over (fewer than a batch) wait for a later epoch's order."""

    def __init__(self, data: TokenData, *, seq_len: int, batch_size: int, seed: int = 0):
        self.data, self.seq_len, self.batch_size, self.seed = data, seq_len, batch_size, seed
        self.windows = data.train.tokens // seq_len
        if self.windows == 0:
            raise ValueError(
                f"the training split of {data.directory} holds {data.train.tokens} tokens, fewer than {seq_len} "
                "tokens: not one window of --seq-len; add text, or lower --seq-len"
            )
        if self.windows < batch_size:
            raise ValueError(
                f"the training split of {data.directory} holds {data.train.tokens} tokens, {self.windows} windows of "
                f"{seq_len}: fewer than one batch of {batch_size}; add text, or lower --batch-size or --seq-len"
            )
        self.steps_per_epoch = self.windows // batch_size
        self._permutation: tuple[int, Permutation] | None = None  # this epoch's, made when first needed

    def fingerprint(self) -> str:
        """The data and every setting that decides the batches: what a resumed run must see again."""
        settings = f"{self.data.fingerprint},{self.seq_len},{self.batch_size},{self.seed}"
        return hashlib.sha256(settings.encode()).hexdigest()[:16]

    def windows_of(self, step: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The window numbers of rows ``[start, stop)`` of step ``step`` (0-based)."""
        stop = self.batch_size if stop is None else stop
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._permutation is None or self._permutation[0] != epoch:
            self._permutation = (epoch, Permutation(self.windows, (self.seed, epoch)))
        return self._permutation[1](index * self.batch_size + np.arange(start, stop))

    def rows(self, step: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` of the ``[batch_size, seq_len]`` batch of step ``step``: only they are read."""
        windows = self.windows_of(step, start, stop)
        return np.stack([self.data.train.read(w * self.seq_len, (w + 1) * self.seq_len) for w in windows])

    def batch(self, step: int) -> np.ndarray:
        """The whole batch of step ``step``."""
        return self.rows(step)

    def validation_batches(self) -> Iterator[np.ndarray]:
        """The validation split in windows of ``seq_len``, in order, ``batch_size`` at a time (the last batch may
        be smaller); nothing if it holds less than one window."""
        windows = self.data.validation.tokens // self.seq_len
        for first in range(0, windows, self.batch_size):
            count = min(self.batch_size, windows - first)
            tokens = self.data.validation.read(first * self.seq_len, (first + count) * self.seq_len)
            yield tokens.reshape(count, self.seq_len)


class Loader:
    """The batches of steps ``start, start + 1, ...`` on the devices: split over ``mesh``'s batch axes with
    each process reading only the rows its own devices hold (inside ``jax.make_array_from_callback``), or on
    the default device without a mesh; ``prefetch`` steps are read and placed ahead in a background thread.
    ``next()`` returns ``(array, seconds waited for it)``."""

    def __init__(self, batches: Batches, mesh=None, start: int = 0, prefetch: int = 2, rules=None):
        self.batches, self.mesh, self.rules = batches, mesh, rules
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(start,), daemon=True, name="neo_jax-loader")
        self._thread.start()

    def local_rows(self) -> list[tuple[int, int]]:
        """The ``[start, stop)`` row ranges of a batch that this process's devices hold."""
        if self.mesh is None:
            return [(0, self.batches.batch_size)]
        from neo_jax.sharding import batch_sharding

        shape = (self.batches.batch_size, self.batches.seq_len)
        indices = batch_sharding(self.mesh, shape, self.rules).addressable_devices_indices_map(shape).values()
        rows = [i[0] for i in indices if i is not None]
        return sorted({(r.start or 0, shape[0] if r.stop is None else r.stop) for r in rows})

    def place(self, step: int):
        """Step ``step``'s batch on the devices, reading only this process's rows."""
        import jax

        if self.mesh is None:
            return jax.device_put(self.batches.batch(step))
        from neo_jax.sharding import batch_sharding

        shape = (self.batches.batch_size, self.batches.seq_len)
        rows = {(a, b): self.batches.rows(step, a, b) for a, b in self.local_rows()}

        def shard(index):
            start = index[0].start or 0
            stop = shape[0] if index[0].stop is None else index[0].stop
            return rows[(start, stop)][:, index[1]]

        return jax.make_array_from_callback(shape, batch_sharding(self.mesh, shape, self.rules), shard)

    def _produce(self, step: int) -> None:
        try:
            while not self._stop.is_set():
                item = (self.place(step), None)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                step += 1
        except Exception as e:  # noqa: BLE001 (handed to the consumer, which raises it)
            self._queue.put((None, e))

    def next(self):
        began = time.perf_counter()
        array, error = self._queue.get()
        if error is not None:
            raise error
        return array, time.perf_counter() - began

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
