"""``neo-jax data prepare``: tokenize a corpus once into flat token shards and a manifest (``neo_jax.data``
reads them).

    DIR/manifest.json            dtype, eos_token_id, vocab_size, the tokenizer's files and hashes, the sources'
                                 names, sizes and hashes, the settings, and ``shards``: {path, tokens, documents,
                                 split} with ``path`` relative to DIR and ``split`` train or validation
    DIR/train-00000.bin ...      raw little-endian uint16 tokens (uint32 above 65536 tokens): whole documents,
    DIR/validation-00000.bin     each followed by EOS, in the order read; ``numpy.fromfile`` reads them
    DIR/tokenizer.json ...       the tokenizer, saved by transformers: DIR alone is enough to train

Documents are read as a stream (never the whole corpus) and encoded by ``num_proc`` processes, a chunk of
documents at a time, in order. The validation split is made of whole documents: the first ``validation_docs``
of them, or ``validation_fraction`` of them spread evenly (document ``m`` when ``floor((m + 1) F)`` passes an
integer). Shards are written under hidden temporary names and renamed when complete; the progress file
``.prepare-state.json`` then records how many documents they hold, so a killed prepare continues from its
last complete shard, and Ctrl-C or SIGTERM leaves no partial shard visible.

``--shard I/N`` prepares every N-th document starting at the I-th (each of N machines reads the sources and
encodes its own part) into ``part-I-of-N-*`` shards and a ``part-I-of-N.json`` manifest; the union
``manifest.json`` is written as soon as a directory holds all N parts (the part that completes it writes it,
or any later prepare of one of them).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import multiprocessing
import os
import shutil
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from neo_jax import validate
from neo_jax.data import FORMAT, MANIFEST, expand_paths, read_documents, union, vocab_hash

STATE = ".prepare-state.json"
SHARD_TOKENS = 2**27  # tokens per training shard (256 MiB of uint16); a validation shard closes with it
CHUNK_CHARS = 1 << 20  # characters of text sent to an encoding process at a time


def parse_part(text: str | None) -> tuple[int, int]:
    """``"I/N"`` -> (I, N), with 0 <= I < N."""
    if text is None:
        return 0, 1
    try:
        index, count = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard is I/N (this machine's part I of N, counted from 0), got {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {text}: the part I must be in 0..N-1 (here 0..{count - 1})")
    return index, count


def _part_name(index: int, count: int) -> str:
    return "" if count == 1 else f"part-{index:05d}-of-{count:05d}"


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with file.open("rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def describe_sources(patterns: Sequence[str]) -> list[dict]:
    """Each source's name, size and modification time (what a resume and a resumed training run compare)."""
    out = []
    for source in expand_paths(patterns):
        if isinstance(source, str):
            out.append({"name": source, "size": None, "mtime_ns": None})
            continue
        files = [p for p in source.rglob("*") if p.is_file()] if source.is_dir() else [source]
        size = sum(f.stat().st_size for f in files)
        out.append({"name": str(source.absolute()), "size": size, "mtime_ns": max(f.stat().st_mtime_ns for f in files)})
    return out


# ----------------------------------------------------------------------------------------- encoding
# (encode a list of texts -> lists of ids, EOS id), set in each encoding process by _start_worker
_ENCODER: tuple[Callable[[list[str]], list[list[int]]], int] | None = None


def _start_worker(directory: str, eos: int) -> None:
    """An encoding process: the tokenizer saved in ``directory``, single-threaded (the processes are the
    parallelism). A fast tokenizer's ``tokenizer.json`` is read by the tokenizers library alone, which encodes
    as transformers' tokenizer does (a test checks the streams are equal) without importing transformers."""
    global _ENCODER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and ends the pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if (Path(directory) / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
        _ENCODER = (lambda texts: [e.ids for e in backend.encode_batch(texts)], eos)
    else:
        from neo_jax.hf import load_tokenizer

        tokenizer = load_tokenizer(directory)
        _ENCODER = (lambda texts: tokenizer(texts, verbose=False)["input_ids"], eos)


def _encode(chunk: tuple[list[str], list[bool], str]) -> tuple[np.ndarray, np.ndarray, list[bool]]:
    """A chunk of documents -> (their tokens, each document followed by EOS, in one array; each document's
    length with its EOS; the chunk's validation flags, passed through)."""
    texts, flags, dtype = chunk
    if _ENCODER is None:
        raise RuntimeError("_encode runs in an encoding process started with _start_worker")
    encode, eos = _ENCODER
    ids = encode(texts) if texts else []
    for doc in ids:
        doc.append(eos)
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    return np.array(list(itertools.chain.from_iterable(ids)), dtype), lengths, flags


class _Writer:
    """The shards of one split: tokens go to a hidden temporary file, renamed into place by ``close``."""

    def __init__(self, directory: Path, prefix: str, split: str, number: int):
        self.directory, self.prefix, self.split, self.number = directory, prefix, split, number
        self.file = None
        self.tokens = self.documents = 0

    @property
    def name(self) -> str:
        return f"{self.prefix}{'-' if self.prefix else ''}{self.split}-{self.number:05d}.bin"

    def write(self, tokens: np.ndarray, documents: int) -> None:
        if self.file is None:
            self.file = (self.directory / f".{self.name}.tmp").open("wb")
        tokens.astype(tokens.dtype.newbyteorder("<"), copy=False).tofile(self.file)
        self.tokens += len(tokens)
        self.documents += documents

    def close(self) -> dict | None:
        """The shard made complete (renamed into place), or None if nothing was written."""
        if self.file is None:
            return None
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.directory / f".{self.name}.tmp", self.directory / self.name)
        shard = {"path": self.name, "tokens": self.tokens, "documents": self.documents, "split": self.split}
        self.file, self.tokens, self.documents, self.number = None, 0, 0, self.number + 1
        return shard

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
            (self.directory / f".{self.name}.tmp").unlink(missing_ok=True)
            self.file = None


def _chunks(documents: Iterator[tuple[str, bool]], dtype: str) -> Iterator[tuple[list[str], list[bool], str]]:
    texts, flags, chars = [], [], 0
    for text, held_out in documents:
        texts.append(text)
        flags.append(held_out)
        chars += len(text)
        if chars >= CHUNK_CHARS or len(texts) >= 4096:
            yield texts, flags, dtype
            texts, flags, chars = [], [], 0
    if texts:
        yield texts, flags, dtype


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- prepare
def prepare(
    sources: Sequence[str],
    output: str | os.PathLike,
    tokenizer: str | os.PathLike,
    *,
    num_proc: int | None = None,
    shard: str | None = None,
    validation_docs: int = 0,
    validation_fraction: float = 0.0,
    text_field: str = "text",
    split: str = "train",
    shard_tokens: int = SHARD_TOKENS,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Tokenize ``sources`` (what ``neo-jax train`` reads: text files, JSONL, saved datasets, ``hf:NAME``)
    with ``tokenizer`` (a hub id or a directory with tokenizer files) into ``output``; returns it. Everything is
    checked before anything is written; the same call on an interrupted ``output`` continues it."""
    index, count = parse_part(shard)
    num_proc = (os.cpu_count() or 1) if num_proc is None else num_proc
    validate.integer("--num-proc", num_proc, least=1)
    validate.integer("--validation-docs", validation_docs, least=0)
    validate.real("--validation-fraction", validation_fraction)
    validate.integer("shard_tokens", shard_tokens, least=1)
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"--validation-fraction must be in [0, 1), got {validation_fraction}")
    if validation_docs and validation_fraction:
        raise ValueError("give --validation-docs or --validation-fraction, not both")
    described = describe_sources(sources)  # missing files fail here
    from neo_jax.hf import load_tokenizer

    tok = load_tokenizer(tokenizer)
    if tok.eos_token_id is None:
        raise ValueError(f"the tokenizer of {tokenizer} has no EOS token to end documents with")
    dtype = "uint16" if len(tok) <= 2**16 else "uint32"
    settings = {
        "text_field": text_field,
        "split": split,
        "validation_docs": validation_docs,
        "validation_fraction": validation_fraction,
        "parts": count,
        "shard_tokens": shard_tokens,
        "vocab_sha256": vocab_hash(tok),
    }
    out = Path(output).expanduser()
    prefix = _part_name(index, count)
    state_path = out / (f".{prefix}-state.json" if prefix else STATE)
    part_manifest = out / (f"{prefix}.json" if prefix else MANIFEST)
    state = _check_output(out, overwrite, state_path, part_manifest, settings, described)

    created = not out.exists()
    if overwrite and out.exists():
        if count == 1:
            shutil.rmtree(out)
        else:  # this part's files only (and the union, which no longer holds): the other parts stay
            for path in [*out.glob(f"{prefix}*"), *out.glob(f".{prefix}*"), out / MANIFEST]:
                path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(f".{prefix}*.tmp"):  # a killed run's shards in progress
        leftover.unlink()
    if state is None:
        tok.save_pretrained(out)
        state = {"settings": settings, "sources": described, "documents_done": 0, "shards": []}
        _write_json(state_path, state)
    try:
        _run(out, prefix, index, count, state, state_path, dtype, tok.eos_token_id, num_proc, sources, progress)
        if not state["shards"]:
            part = f" (part {shard}: fewer documents than parts?)" if count > 1 else ""
            raise ValueError(f"the sources hold no documents to prepare{part}: check the files and --text-field")
    except BaseException:
        if created and not state["shards"]:  # nothing complete yet: leave nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    tokenizer_files = {p.name: _file_hash(p) for p in sorted(out.iterdir()) if p.is_file() and _is_tokenizer_file(p)}
    manifest = {
        "format": FORMAT,
        "dtype": dtype,
        "eos_token_id": tok.eos_token_id,
        "vocab_size": len(tok),
        "tokenizer": {
            "source": str(tokenizer),
            "files": tokenizer_files,
            "sha256": hashlib.sha256(json.dumps(tokenizer_files, sort_keys=True).encode()).hexdigest(),
            "vocab_sha256": settings["vocab_sha256"],
        },
        "sources": [
            {"name": s["name"], "size": s["size"], "sha256": None if s["size"] is None else _file_hash(Path(s["name"]))}
            for s in described
        ],
        "settings": settings,
        "parts": [index] if count > 1 else None,
        "shards": state["shards"],
        "tokens": {s: sum(x["tokens"] for x in state["shards"] if x["split"] == s) for s in ("train", "validation")},
        "documents": {
            s: sum(x["documents"] for x in state["shards"] if x["split"] == s) for s in ("train", "validation")
        },
    }
    _write_json(part_manifest, manifest)
    state_path.unlink()
    if count > 1:
        _write_union(out, count)
    return out


def _is_tokenizer_file(path: Path) -> bool:
    from neo_jax.hf import COMPANION_FILES

    return path.name in COMPANION_FILES


def _check_output(
    out: Path, overwrite: bool, state_path: Path, manifest: Path, settings: dict, described
) -> dict | None:
    """The saved state to continue from, or None for a fresh start; refuses a directory it may not write."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output {out} is a file, not a directory")
    if not out.exists() or overwrite:
        return None
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        if state["settings"] != settings or state["sources"] != described:
            raise ValueError(
                f"{out} holds an interrupted prepare of other sources or settings: run it with the same ones to "
                "continue, or pass --overwrite to start again"
            )
        return state
    if manifest.is_file():
        raise FileExistsError(f"{out} is already prepared ({manifest.name}): pass --overwrite to prepare it again")
    if settings["parts"] > 1:  # other parts of the same preparation may share the directory
        others = [p for p in out.iterdir() if not (p.name.startswith(("part-", ".part-")) or _is_tokenizer_file(p))]
        if not others:
            return None
    if any(out.iterdir()):
        raise FileExistsError(f"--output {out} is not empty: choose an empty or new directory, or pass --overwrite")
    return None


def _documents(sources, text_field, split, index, count, state, settings) -> Iterator[tuple[str, bool]]:
    """(text, held out) for this part's documents after those already done."""
    fraction, first_docs = settings["validation_fraction"], settings["validation_docs"]
    mine = 0
    for number, text in enumerate(read_documents(sources, text_field, split)):
        if number % count != index:
            continue
        if mine >= state["documents_done"]:
            held_out = mine < first_docs or (
                fraction > 0 and math.floor((mine + 1) * fraction) > math.floor(mine * fraction)
            )
            yield text, held_out
        mine += 1


def _run(out, prefix, index, count, state, state_path, dtype, eos, num_proc, sources, progress) -> None:
    from tqdm.auto import tqdm

    settings = state["settings"]
    numbers = {s: sum(1 for x in state["shards"] if x["split"] == s) for s in ("train", "validation")}
    writers = {s: _Writer(out, prefix, s, numbers[s]) for s in ("train", "validation")}
    done_tokens = sum(x["tokens"] for x in state["shards"])
    chunks = _chunks(
        _documents(sources, settings["text_field"], settings["split"], index, count, state, settings), dtype
    )
    bar = tqdm(
        desc="preparing" + (f" {prefix}" if prefix else ""),
        unit="tok",
        unit_scale=True,
        initial=done_tokens,
        disable=not progress,
        smoothing=0.1,
    )
    previous = signal.getsignal(signal.SIGTERM)
    pool = None

    def stop(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, stop)  # like Ctrl-C: no partial shard left visible
    except ValueError:  # not the main thread
        previous = None
    try:
        if num_proc > 1:
            # spawn: the caller may be a training process whose JAX runtime is not safe to fork
            pool = multiprocessing.get_context("spawn").Pool(num_proc, _start_worker, (str(out), eos))
            encoded = pool.imap(_encode, chunks)
        else:
            previous_sigint = signal.getsignal(signal.SIGINT)
            _start_worker(str(out), eos)
            signal.signal(signal.SIGINT, previous_sigint)
            encoded = map(_encode, chunks)
        pending = 0
        for tokens, lengths, flags in encoded:
            flags = np.asarray(flags, bool)
            if flags.any():
                ends = np.cumsum(lengths)
                for held_out, begin, end in zip(flags, ends - lengths, ends, strict=True):
                    writers["validation" if held_out else "train"].write(tokens[begin:end], 1)
            else:
                writers["train"].write(tokens, len(lengths))
            pending += len(lengths)
            bar.update(len(tokens))
            if writers["train"].tokens >= settings["shard_tokens"]:
                _checkpoint(writers, state, state_path, pending)
                pending = 0
        _checkpoint(writers, state, state_path, pending)
    finally:
        for writer in writers.values():
            writer.abort()
        if pool is not None:
            pool.terminate()
            pool.join()
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _checkpoint(writers: dict, state: dict, state_path: Path, documents: int) -> None:
    """Close every open shard, then record them and the documents they hold: what a resume starts after."""
    for writer in writers.values():
        shard = writer.close()
        if shard is not None:
            state["shards"].append(shard)
    state["documents_done"] += documents
    _write_json(state_path, state)


def _write_union(out: Path, count: int) -> None:
    """``manifest.json`` for a directory that holds all ``count`` parts."""
    parts = [out / f"{_part_name(i, count)}.json" for i in range(count)]
    if all(p.is_file() for p in parts):
        _write_json(out / MANIFEST, union(out, [json.loads(p.read_text()) for p in parts]))


def summary(directory: Path, seconds: float) -> str:
    manifest = json.loads((directory / MANIFEST).read_text()) if (directory / MANIFEST).is_file() else None
    if manifest is None:
        return f"prepared a part into {directory} in {seconds:.1f}s; the union manifest follows once every part is in"
    tokens, documents = manifest["tokens"], manifest["documents"]
    total = tokens["train"] + tokens["validation"]
    return (
        f"prepared {directory}: {tokens['train']:,} training tokens in {documents['train']:,} documents, "
        f"{tokens['validation']:,} validation tokens in {documents['validation']:,} documents, "
        f"{len(manifest['shards'])} shard(s) of {manifest['dtype']}, in {seconds:.1f}s ({total / max(seconds, 1e-9):,.0f} tokens/s)"
    )
