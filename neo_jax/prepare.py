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
last complete shard, and Ctrl-C or SIGTERM leaves no partial shard visible. A document is encoded a megabyte
of text at a time (``data.pieces``: the tokens are the whole document's), so memory does not grow with it.
One prepare at a time writes into a directory (or into a part of it): a lock file (``.prepare.lock``, or
``.part-I-of-N.lock``) held with ``flock`` while it runs. ``overwrite`` removes only what prepares recorded
writing there (manifests, progress files, shards, tokenizer files) and refuses a directory that holds
anything else, naming it.

``--shard I/N`` prepares part I of N: with at least N sources (files, URLs, datasets), every N-th source from
the I-th, whole, opening no other (its manifest hashes only those); with fewer, every N-th document from the
I-th (each of N machines reads the sources and encodes its own part). Each part goes into ``part-I-of-N-*`` shards and a ``part-I-of-N.json`` manifest; the union
``manifest.json`` is written as soon as a directory holds all N parts (the part that completes it writes it,
or any later prepare of one of them).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from neo_jax import validate
from neo_jax.corpus import describe_url, is_url, open_binary
from neo_jax.data import (
    FORMAT,
    MANIFEST,
    MAX_PARTS,
    STATE,
    expand_paths,
    part_manifests,
    pieces,
    progress_files,
    read_sources,
    union,
    vocab_hash,
)

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
    if not 1 <= count <= MAX_PARTS:
        raise ValueError(f"--shard {text}: N must be in 1..{MAX_PARTS} (parts are named with five digits)")
    if not 0 <= index < count:
        raise ValueError(f"--shard {text}: the part I must be in 0..N-1 (here 0..{count - 1})")
    return index, count


def _part_name(index: int, count: int) -> str:
    return "" if count == 1 else f"part-{index:05d}-of-{count:05d}"


def _file_hash(source: Path | str) -> str:
    """SHA-256 of a file, a URL's file (read as a stream), or every file of a directory in order."""
    digest = hashlib.sha256()
    path = Path(source) if not is_url(source) else None
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path is not None and path.is_dir() else [source]
    for file in files:
        with open_binary(file) as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def describe_sources(patterns: Sequence[str]) -> list[dict]:
    """Each source's name, size and modification time (what a resume and a resumed training run compare)."""
    out = []
    for source in expand_paths(patterns):
        if is_url(source):
            out.append(describe_url(str(source)))
            continue
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


def _portable(tokenizer):
    """What an encoding process rebuilds ``tokenizer`` from, so that it is loaded once, by the caller: a fast
    tokenizer's backend as JSON (rebuilt by the tokenizers library alone, which encodes as transformers'
    tokenizer does, a test checks, without importing transformers), else the tokenizer itself, pickled."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend.to_str() if backend is not None else tokenizer


def _start_worker(tokenizer, eos: int) -> None:
    """An encoding process: the caller's tokenizer (``_portable``), single-threaded (the processes are the
    parallelism)."""
    global _ENCODER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and ends the pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if isinstance(tokenizer, str):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(tokenizer)
        _ENCODER = (lambda texts: [e.ids for e in backend.encode_batch(texts)], eos)
    else:
        _ENCODER = (lambda texts: tokenizer(texts, verbose=False)["input_ids"], eos)


def _encode(chunk: tuple[list[str], list[bool], list[bool], str]) -> tuple[np.ndarray, np.ndarray, list, list]:
    """A chunk of pieces of documents -> (their tokens, EOS after each piece that ends its document, in one
    array; each piece's length with its EOS; the chunk's validation and end-of-document flags, passed through)."""
    texts, flags, ends, dtype = chunk
    if _ENCODER is None:
        raise RuntimeError("_encode runs in an encoding process started with _start_worker")
    encode, eos = _ENCODER
    ids = encode(texts) if texts else []
    for piece, last in zip(ids, ends, strict=True):
        if last:
            piece.append(eos)
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    return np.array(list(itertools.chain.from_iterable(ids)), dtype), lengths, flags, ends


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
        # file.write, not ndarray.tofile: a full disk is then an OSError with its errno (ENOSPC)
        self.file.write(np.ascontiguousarray(tokens, tokens.dtype.newbyteorder("<")).data)
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


def _chunks(documents: Iterator[tuple[str, bool]], dtype: str) -> Iterator[tuple[list[str], list, list, str]]:
    """(pieces of text, each one's validation flag, whether it ends its document, dtype): about ``CHUNK_CHARS``
    of text at a time, a long document in several pieces."""
    texts, flags, ends, chars = [], [], [], 0
    for text, held_out in documents:
        parts = pieces(text, CHUNK_CHARS)
        for number, piece in enumerate(parts, 1):
            texts.append(piece)
            flags.append(held_out)
            ends.append(number == len(parts))
            chars += len(piece)
            if chars >= CHUNK_CHARS or len(texts) >= 4096:
                yield texts, flags, ends, dtype
                texts, flags, ends, chars = [], [], [], 0
    if texts:
        yield texts, flags, ends, dtype


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- prepare
def prepare(
    sources: Sequence[str],
    output: str | os.PathLike,
    tokenizer,
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
    with ``tokenizer`` (a hub id or a directory with tokenizer files, or a tokenizer loaded from one) into
    ``output``; returns it. Everything is checked before anything is written; the same call on an interrupted
    ``output`` continues it."""
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

    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str | os.PathLike) else tokenizer
    if tok.eos_token_id is None:
        raise ValueError(f"the tokenizer of {tok.name_or_path} has no EOS token to end documents with")
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
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output {out} is a file, not a directory")
    prefix = _part_name(index, count)
    lock = out / f".{prefix or 'prepare'}.lock"
    if out.is_dir():  # the refusals, before anything is written (the directory's own time included)
        _check_free(lock)
        _check_output(out, overwrite, prefix, settings, described)
    created = not out.exists()
    state = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        with _locked(lock):
            state = _start(out, overwrite, prefix, settings, described, tok)
            _run(
                out,
                prefix,
                index,
                count,
                state,
                _state_file(out, prefix),
                dtype,
                tok,
                num_proc,
                sources,
                progress,
            )
            _check_result(state, settings, shard, described, sources)
            _finish(out, prefix, index, count, state, settings, described, tok, dtype)
    except ValueError:  # a refusal: what this call created goes (nothing of it can be resumed)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    except BaseException as e:
        if created and not (state and state["shards"]):  # nothing complete yet: leave nothing behind
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise OSError(
                f"no space left on device writing {out}: free some space and run the same command again (it "
                "continues after its last complete shard)"
            ) from None
        raise
    return out


def _state_file(out: Path, prefix: str) -> Path:
    return out / (f".{prefix}-state.json" if prefix else STATE)


def _manifest_file(out: Path, prefix: str) -> Path:
    return out / (f"{prefix}.json" if prefix else MANIFEST)


def _start(out: Path, overwrite: bool, prefix: str, settings: dict, described, tok) -> dict:
    """The progress to continue from (a fresh one, after clearing what ``overwrite`` may clear, with the
    tokenizer saved), holding the directory's lock."""
    state = _check_output(out, overwrite, prefix, settings, described)
    if overwrite:
        _remove_own(out, prefix, settings["parts"])
    for leftover in out.glob(f".{prefix}*.tmp"):  # a killed run's shards in progress
        leftover.unlink()
    if state is None:
        saved = tok.save_pretrained(out)
        state = {
            "settings": settings,
            "sources": described,
            "documents_done": 0,
            "shards": [],
            "tokenizer_files": sorted({Path(f).name for f in saved}),
        }
        _write_json(_state_file(out, prefix), state)
    return state


def _check_result(state: dict, settings: dict, shard: str | None, described, sources) -> None:
    """Refuses a preparation that holds nothing to train on, or read sources that changed meanwhile."""
    if not state["shards"]:
        part = f" (part {shard}: fewer documents than parts?)" if settings["parts"] > 1 else ""
        raise ValueError(f"the sources hold no documents to prepare{part}: check the files and --text-field")
    if not any(x["split"] == "train" and x["tokens"] for x in state["shards"]):
        held = sum(x["documents"] for x in state["shards"])
        flag = "--validation-docs" if settings["validation_docs"] else "--validation-fraction"
        raise ValueError(
            f"{flag} holds out every document ({held:,} of {held:,}{' in this part' if settings['parts'] > 1 else ''}), "
            "leaving none to train on: lower it"
        )
    for before, now in zip(described, describe_sources(sources), strict=True):
        if before != now:
            raise ValueError(
                f"{before['name']} changed while it was prepared (its size or modification time): prepare again "
                "once it no longer changes"
            )


def _finish(out, prefix, index, count, state, settings, described, tok, dtype) -> None:
    """The part's (or the whole preparation's) manifest, and the union once every part is in."""
    tokenizer_files = {p.name: _file_hash(p) for p in sorted(out.iterdir()) if p.is_file() and _is_tokenizer_file(p)}
    manifest = {
        "format": FORMAT,
        "dtype": dtype,
        "eos_token_id": tok.eos_token_id,
        "vocab_size": len(tok),
        "tokenizer": {
            "source": tok.name_or_path,
            "files": tokenizer_files,
            "sha256": hashlib.sha256(json.dumps(tokenizer_files, sort_keys=True).encode()).hexdigest(),
            "vocab_sha256": settings["vocab_sha256"],
        },
        "sources": [  # a part that took whole sources hashes only its own (the union has every hash)
            {
                "name": s["name"],
                "size": s["size"],
                "sha256": None if s["size"] is None or not own else _file_hash(s["name"]),
            }
            for s, own in zip(described, _own(len(described), index, count), strict=True)
        ],
        "settings": settings,
        "parts": [index] if count > 1 else None,
        "shards": state["shards"],
        "tokens": {s: sum(x["tokens"] for x in state["shards"] if x["split"] == s) for s in ("train", "validation")},
        "documents": {
            s: sum(x["documents"] for x in state["shards"] if x["split"] == s) for s in ("train", "validation")
        },
    }
    _write_json(_manifest_file(out, prefix), manifest)
    _state_file(out, prefix).unlink()
    if count > 1:
        _write_union(out, count)


def _own(sources: int, index: int, count: int) -> list[bool]:
    """Which sources part ``index`` of ``count`` reads whole (all of them when parts take every N-th document)."""
    return [not by_file(sources, count) or j % count == index for j in range(sources)]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Holds ``path`` locked (``flock``: released by the kernel when the process dies, so a killed prepare
    leaves no stale lock) and removes it after; another process holding it is a ValueError."""
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            _lock(fd, path)
        except ValueError:
            os.close(fd)
            raise
        if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # its holder removed the file as we opened it: lock the new one
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _check_free(path: Path) -> None:
    """No other process holds the lock ``path`` (if it exists; nothing is created)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        _lock(fd, path)
    finally:
        os.close(fd)  # and with it the lock


def _lock(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ValueError(
            f"another prepare holds {path.parent} ({path.name}): wait for it to finish, or prepare into another "
            "directory"
        ) from None


def _is_tokenizer_file(path: Path) -> bool:
    from neo_jax.hf import COMPANION_FILES

    return path.name in COMPANION_FILES


def _records(out: Path) -> dict[str, dict]:
    """The manifests and progress files in ``out`` that can be read: name -> content."""
    records = {}
    for path in [out / MANIFEST, *part_manifests(out), *progress_files(out)]:
        try:
            value = json.loads(path.read_text()) if path.is_file() else None
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, dict):
            records[path.name] = value
    return records


def _written(record_name: str, record: dict) -> set[str]:
    """The names a prepare recorded writing: the record itself, its shards, its tokenizer files."""
    shards, tokenizer, saved = record.get("shards"), record.get("tokenizer"), record.get("tokenizer_files")
    names = {record_name}
    if isinstance(shards, list):
        names |= {s["path"] for s in shards if isinstance(s, dict) and isinstance(s.get("path"), str)}
    if isinstance(tokenizer, dict) and isinstance(tokenizer.get("files"), dict):
        names |= set(tokenizer["files"])
    if isinstance(saved, list):
        names |= set(saved)
    return {n for n in names if isinstance(n, str) and n and Path(n).name == n}


_PART = r"part-\d{5,}-of-\d{5,}"
# the hidden files of a prepare in progress: locks, progress files, and files being written
_IN_PROGRESS = re.compile(
    rf"\.(prepare\.lock|prepare-state\.json|{_PART}(\.lock|-state\.json)"
    rf"|(({_PART}-)?(train|validation)-\d{{5,}}\.bin|manifest\.json|prepare-state\.json|{_PART}(\.json|-state\.json))\.tmp)"
)


def _ours(name: str, owned: set[str]) -> bool:
    """Whether a name in an output directory is a prepare's: recorded, or a file of a prepare in progress."""
    return name in owned or _IN_PROGRESS.fullmatch(name) is not None


def _remove_own(out: Path, prefix: str, count: int) -> None:
    """``--overwrite``: a whole preparation's recorded files, or one part's (and the union, which no longer holds).
    ``_check_output`` made sure the directory holds nothing else."""
    records = _records(out)
    hidden = {p.name for p in out.glob(".*") if _IN_PROGRESS.fullmatch(p.name) and not p.name.endswith(".lock")}
    if count == 1:
        names = set().union(*(_written(n, r) for n, r in records.items()), hidden)
    else:
        mine = {n: r for n, r in records.items() if n.startswith((prefix, f".{prefix}"))}
        names = set().union(*(_written(n, r) for n, r in mine.items()), {MANIFEST})
        names = {n for n in names if not _is_tokenizer_file(Path(n))}  # the other parts share them
        names |= {n for n in hidden if n.startswith(f".{prefix}")}
    for name in names:
        (out / name).unlink(missing_ok=True)


def _check_output(out: Path, overwrite: bool, prefix: str, settings: dict, described) -> dict | None:
    """The saved state to continue from, or None for a fresh start; refuses a directory it may not write:
    another preparation's, one with files no prepare wrote (with ``overwrite`` too: it would remove them), or
    other parts prepared differently."""
    records = _records(out)
    owned = set().union(*(_written(n, r) for n, r in records.items()))
    foreign = sorted(p.name for p in out.iterdir() if not _ours(p.name, owned))
    if foreign:
        if overwrite:
            raise FileExistsError(
                f"--overwrite removes only what a prepare wrote, and {out} also holds {foreign[0]!r}: move it out, "
                "or prepare into another directory"
            )
        raise FileExistsError(f"--output {out} is not empty: choose an empty or new directory, or pass --overwrite")
    for name, record in records.items():  # the other parts (and their union) must be of this preparation
        if settings["parts"] > 1 and not name.startswith((prefix, f".{prefix}")):
            theirs = record.get("settings")
            if theirs != settings:
                key = next((k for k in settings if not isinstance(theirs, dict) or theirs.get(k) != settings[k]), "")
                raise ValueError(
                    f"{out} holds {name}, written by a prepare with another {key}: prepare every part with the same "
                    "sources and settings, or into another directory"
                )
    if overwrite:
        return None
    state_file, manifest = _state_file(out, prefix), _manifest_file(out, prefix)
    if state_file.name in records:
        state = records[state_file.name]
        if state.get("settings") != settings or state.get("sources") != described:
            raise ValueError(
                f"{out} holds an interrupted prepare of other sources or settings: run it with the same ones to "
                "continue, or pass --overwrite to start again"
            )
        return state
    if manifest.is_file():
        raise FileExistsError(f"{out} is already prepared ({manifest.name}): pass --overwrite to prepare it again")
    if settings["parts"] == 1 and records:
        raise FileExistsError(
            f"--output {out} holds the parts of a --shard preparation: pass --overwrite to replace it"
        )
    return None


def by_file(sources: int, count: int) -> bool:
    """Whether N parts take whole sources each (source j is part j mod N's): with at least N of them. With fewer,
    part I takes every N-th document from the I-th."""
    return 1 < count <= sources


def _documents(sources, text_field, split, index, count, state, settings) -> Iterator[tuple[str, bool]]:
    """(text, held out) for this part's documents after those already done; a part that takes whole sources
    opens only its own."""
    fraction, first_docs = settings["validation_fraction"], settings["validation_docs"]
    files = expand_paths(sources)
    if by_file(len(files), count):
        texts = read_sources(files[index::count], text_field, split)
    else:
        texts = (t for n, t in enumerate(read_sources(files, text_field, split)) if n % count == index)
    for mine, text in enumerate(texts):
        if mine >= state["documents_done"]:
            held_out = mine < first_docs or (
                fraction > 0 and math.floor((mine + 1) * fraction) > math.floor(mine * fraction)
            )
            yield text, held_out


def _run(out, prefix, index, count, state, state_path, dtype, tok, num_proc, sources, progress) -> None:
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
            pool = multiprocessing.get_context("spawn").Pool(
                num_proc, _start_worker, (_portable(tok), tok.eos_token_id)
            )
            encoded = pool.imap(_encode, chunks)
        else:
            previous_sigint = signal.getsignal(signal.SIGINT)
            _start_worker(_portable(tok), tok.eos_token_id)
            signal.signal(signal.SIGINT, previous_sigint)
            encoded = map(_encode, chunks)
        pending = 0
        for tokens, lengths, flags, ends in encoded:
            flags, ends = np.asarray(flags, bool), np.asarray(ends, bool)
            if flags.any():
                stops = np.cumsum(lengths)
                for held_out, last, begin, stop in zip(flags, ends, stops - lengths, stops, strict=True):
                    writers["validation" if held_out else "train"].write(tokens[begin:stop], int(last))
            else:
                writers["train"].write(tokens, int(ends.sum()))
            pending += int(ends.sum())
            bar.update(len(tokens))
            # a checkpoint between documents only: a resume starts at a document
            if writers["train"].tokens >= settings["shard_tokens"] and ends[-1]:
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
