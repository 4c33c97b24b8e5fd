"""Documents from corpus files as they are distributed: JSON lines, Parquet or plain text, each plain or
compressed, decompressed as a stream (never whole, in memory or on disk).

A file's reader comes from its name, through two tables:

- ``COMPRESSIONS``, by the last suffix: ``.zst`` (zstandard: the Pile, SlimPajama), ``.gz`` (Dolma, RedPajama),
  ``.xz``, ``.bz2``. Other compressions are refused by name (``UNREAD``).
- ``FORMATS``, by the suffix before it (or the last, uncompressed): ``.jsonl`` is JSON lines (each line's text
  field is a document; so is a compressed ``.json``, as Dolma names its ``.json.gz`` files), ``.parquet`` a Parquet
  table (its text column, a row group at a time). Any other file is one plain-text document.

A source may also be a URL, read through fsspec as a stream: ``gs://`` (gcsfs, ``pip install 'neo_jax[gcs]'``:
a TPU VM's service account), ``s3://`` (s3fs, ``[s3]``), ``hf://`` (a hub dataset's files), ``http(s)://`` and
``file://``, with globs wherever the filesystem can list. Credentials are each filesystem's own.

A file that breaks while it is read (a corrupt or truncated download) is a one-line ValueError naming it and the
last whole line or row group read.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import json
import lzma
import re
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

_SURROGATE = re.compile("[\ud800-\udfff]")  # a lone UTF-16 surrogate: JSON's "\\ud800" decodes to one


class _Zstd(io.RawIOBase):
    """A zstandard stream of any number of frames (the Pile's files have several), decompressed as it is read. A
    stream that ends inside a frame (a truncated download) is an EOFError, where zstandard's own reader would stop
    quietly."""

    def __init__(self, raw: BinaryIO):
        import zstandard

        self.raw, self.context = raw, zstandard.ZstdDecompressor(max_window_size=2**31)
        self.frame, self.held, self.offset, self.started = self.context.decompressobj(), b"", 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.offset == len(self.held):
            chunk = self.raw.read(1 << 20)
            if not chunk:
                if self.started and not self.frame.eof:
                    raise EOFError("the zstd data ends inside a frame")
                return 0
            self.started = True
            out = self.frame.decompress(chunk)
            while self.frame.eof and self.frame.unused_data:  # the next frame starts in this chunk
                rest, self.frame = self.frame.unused_data, self.context.decompressobj()
                out += self.frame.decompress(rest)
            self.held, self.offset = out, 0
        count = min(len(buffer), len(self.held) - self.offset)
        buffer[:count] = self.held[self.offset : self.offset + count]
        self.offset += count
        return count


def _zstd(raw: BinaryIO) -> io.BufferedReader:
    try:
        import zstandard  # noqa: F401
    except ImportError:
        raise ImportError("reading .zst files needs zstandard: pip install 'neo_jax[train]'") from None
    return io.BufferedReader(_Zstd(raw), 1 << 20)


COMPRESSIONS: dict[str, Callable[[BinaryIO], Any]] = {  # each gives a readable binary stream
    ".zst": _zstd,
    ".gz": lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"),
    ".xz": lambda raw: lzma.LZMAFile(raw),  # noqa: SIM115
    ".bz2": lambda raw: bz2.BZ2File(raw),
}
UNREAD = (".lz4", ".lzma", ".zip", ".7z", ".br", ".snappy", ".lz", ".z", ".tar", ".tgz", ".zstd")


def _broken() -> tuple[type[BaseException], ...]:
    """What a decompressor raises on corrupt or truncated data."""
    errors: list[type[BaseException]] = [EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile, OSError]
    with contextlib.suppress(ImportError):
        import zstandard

        errors.append(zstandard.ZstdError)
    return tuple(errors)


def text(data: bytes, where: str, unit: str) -> str:
    """``data`` decoded as UTF-8, or a ValueError placing the first bad byte (``unit``: byte or column, from 1
    for a column, from 0 for a byte offset in the file)."""
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        at = f"column {e.start + 1}" if unit == "column" else f"byte {e.start}"
        raise ValueError(
            f"{where} is not UTF-8 text ({at}: {e.reason}); give UTF-8 text files, .jsonl or a dataset"
        ) from None


def parse_json(data: str, where: str):
    """``json.loads(data)``, or a one-line ValueError naming ``where`` (bad JSON, or nesting deeper than Python's
    recursion allows)."""
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{where} is not valid JSON here: it nests too deep to read") from None


def _json_lines(stream: BinaryIO, name: str, field: str) -> Iterator[str]:
    number = 0
    try:
        for number, line in enumerate(stream, 1):  # bytes: a decoding error is then placed by line and column
            where = f"{name}:{number}"
            line_text = text(line, where, "column")
            if not line_text.strip():
                continue
            record = parse_json(line_text, where)
            if not isinstance(record, dict) or field not in record:
                raise ValueError(f"{where} has no field {field!r}: set --text-field")
            if not isinstance(record[field], str):
                raise ValueError(f"{where}: field {field!r} holds {type(record[field]).__name__}, not a string")
            if found := _SURROGATE.search(record[field]):
                raise ValueError(
                    f"{where}: field {field!r} holds a lone surrogate escape (\\u{ord(found[0]):04x}), which is not "
                    "text: fix or drop that record"
                )
            yield record[field]
    except _broken() as e:
        raise _breaks(name, f"after line {number}", e) from None


def _parquet(stream: BinaryIO, name: str, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading .parquet files needs pyarrow: pip install 'neo_jax[train]'") from None
    group = 0
    try:
        table = pq.ParquetFile(stream)
        columns = table.schema_arrow.names
        if field not in columns:
            raise ValueError(f"{name} has no column {field!r} (it has {', '.join(columns)}): set --text-field")
        for group in range(table.num_row_groups):
            values = table.read_row_group(group, columns=[field]).column(0)
            for row, value in enumerate(values.to_pylist()):
                if not isinstance(value, str):
                    kind = type(value).__name__
                    raise ValueError(f"{name} row group {group} row {row}: column {field!r} holds {kind}, not a string")
                yield value
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 (pyarrow raises its own ArrowInvalid, OSError and more on a broken file)
        raise _breaks(name, f"in row group {group}", e) from None


def _whole(stream: BinaryIO, name: str, field: str) -> Iterator[str]:
    try:
        data = stream.read()
    except _broken() as e:
        raise _breaks(name, "while decompressing", e) from None
    yield text(data, name, "byte")


FORMATS: dict[str, Callable[[BinaryIO, str, str], Iterator[str]]] = {".jsonl": _json_lines, ".parquet": _parquet}
COMPRESSED_FORMATS = {**FORMATS, ".json": _json_lines}  # Dolma's .json.gz are JSON lines; a plain .json is text


def _breaks(name: str, where: str, error: BaseException) -> ValueError:
    detail = " ".join(str(error).split()) or type(error).__name__
    return ValueError(
        f"{name} breaks {where} ({detail}): the file is corrupt or truncated (an interrupted download?); fetch it again"
    )


def reader_of(name: str) -> tuple[Callable[[BinaryIO], Any] | None, Callable[[BinaryIO, str, str], Iterator[str]]]:
    """(decompressor or None, reader) for a file called ``name``; an unread compression is a ValueError."""
    suffixes = [s.lower() for s in Path(name).suffixes]
    last = suffixes[-1] if suffixes else ""
    if last in UNREAD:
        raise ValueError(
            f"{name}: {last} compression is not read; decompress it, or recompress it as {', '.join(COMPRESSIONS)}"
        )
    decompress = COMPRESSIONS.get(last)
    if decompress is None:
        return None, FORMATS.get(last, _whole)
    return decompress, COMPRESSED_FORMATS.get(suffixes[-2] if len(suffixes) > 1 else "", _whole)


def is_url(source) -> bool:
    return isinstance(source, str) and _URL.match(source) is not None


_URL = re.compile(r"[a-z][a-z0-9+.-]*://")


def _filesystem(url: str):
    """(fsspec filesystem, path) of ``url``; a missing filesystem package is an ImportError naming its extra."""
    try:
        import fsspec

        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        extra = {"gs": "gcs", "gcs": "gcs", "s3": "s3"}.get(url.split("://", 1)[0])
        hint = f"pip install 'neo_jax[{extra}]'" if extra else f"install what fsspec names ({e})"
        raise ImportError(f"reading {url} needs its filesystem: {hint}") from None
    except ValueError as e:
        raise ValueError(f"{url}: {e}") from None


def expand_url(pattern: str) -> list[str]:
    """The files a URL names (a glob: its matches, sorted), as URLs; none is a FileNotFoundError, and a host or
    bucket that cannot be reached an OSError, each naming the URL."""
    fs, path = _filesystem(pattern)
    try:
        if any(c in path for c in "*?["):
            files = [m for m in sorted(fs.glob(path)) if fs.isfile(m)]
        else:
            try:
                files = [path] if fs.info(path).get("type") != "directory" else []
            except FileNotFoundError as e:
                if isinstance(e.__cause__, OSError):  # fsspec's http says "not found" for a host that is down
                    raise e.__cause__ from None
                files = []
    except (OSError, ValueError) as e:  # aiohttp, gcsfs and s3fs raise OSError subclasses for the network
        raise OSError(f"{pattern} cannot be read ({' '.join(str(e).split()) or type(e).__name__})") from None
    if not files:
        raise FileNotFoundError(f"no data file matches {pattern!r}")
    return [fs.unstrip_protocol(m) for m in files]  # http's paths are URLs already, which it leaves as they are


def describe_url(url: str) -> dict:
    """A remote file's name, size and a version stamp (modification time or ETag, as its filesystem says)."""
    fs, path = _filesystem(url)
    info = fs.info(path)
    stamp = next(
        (info[k] for k in ("mtime", "updated", "LastModified", "ETag", "etag", "last_commit") if k in info), None
    )
    return {"name": url, "size": info.get("size"), "mtime_ns": None if stamp is None else str(stamp)}


def open_binary(source: Path | str):
    """A local path or a URL opened for reading bytes."""
    if is_url(source):
        fs, path = _filesystem(str(source))
        return fs.open(path, "rb", block_size=8 << 20)
    return Path(source).open("rb")


def documents(source: Path | str, field: str) -> Iterator[str]:
    """The documents of one file or URL, read as a stream (see the module)."""
    name = str(source)
    decompress, read = reader_of(name.rsplit("/", 1)[-1])
    with open_binary(source) as raw:
        stream = decompress(raw) if decompress else raw
        yield from read(stream, name, field)
