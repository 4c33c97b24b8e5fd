"""Corpora as they are distributed (``neo_jax.corpus``): compressed JSON lines and text, Parquet, each giving the
documents, and the token stream, of the plain file; broken and unread files named in one line."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from neo_jax import cli, corpus, data
from tests.test_data import DOCS, shard_tokens

LINES = "".join(json.dumps({"text": t, "meta": {"n": i}}) + "\n" for i, t in enumerate(DOCS)).encode()


def zst(data_: bytes) -> bytes:
    """Two frames, as the Pile's files are made of several."""
    half = len(data_) // 2
    compressor = zstandard.ZstdCompressor(level=3)
    return compressor.compress(data_[:half]) + compressor.compress(data_[half:])


COMPRESS = {"zst": zst, "gz": gzip.compress, "xz": lzma.compress, "bz2": bz2.compress}


def write_all(directory: Path) -> dict[str, Path]:
    """The same documents as plain .jsonl, in every compression (and Dolma's .json.gz), and as Parquet."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {"jsonl": directory / "docs.jsonl"}
    files["jsonl"].write_bytes(LINES)
    for suffix, compress in COMPRESS.items():
        files[f"jsonl.{suffix}"] = directory / f"docs.jsonl.{suffix}"
        files[f"jsonl.{suffix}"].write_bytes(compress(LINES))
    files["json.gz"] = directory / "dolma.json.gz"
    files["json.gz"].write_bytes(gzip.compress(LINES))
    files["parquet"] = directory / "docs.parquet"
    table = pa.table({"id": list(range(len(DOCS))), "text": DOCS})
    pq.write_table(table, files["parquet"], row_group_size=7)  # several row groups
    return files


def test_every_format_gives_the_plain_files_documents(tmp_path):
    files = write_all(tmp_path)
    plain = [t for t in DOCS]
    for name, path in files.items():
        assert list(data.read_documents([str(path)])) == plain, name
    assert pq.ParquetFile(files["parquet"]).num_row_groups > 1
    text = "One whole document,\nÜnïcödé too.\n"
    for suffix, compress in COMPRESS.items():
        (tmp_path / f"note.txt.{suffix}").write_bytes(compress(text.encode()))
        assert list(data.read_documents([str(tmp_path / f"note.txt.{suffix}")])) == [text]


def test_a_compressed_corpus_prepares_the_plain_files_token_stream(tmp_path, gpt2_model_dir, capsys):
    files = write_all(tmp_path / "src")
    streams = {}
    for name in ("jsonl", "jsonl.zst", "parquet"):
        out = tmp_path / name
        argv = ["data", "prepare", str(files[name]), "--output", str(out), "--tokenizer", str(gpt2_model_dir)]
        assert cli.main([*argv, "--validation-docs", "5"]) == 0
        streams[name] = (shard_tokens(out, "train"), shard_tokens(out, "validation"))
    for name in ("jsonl.zst", "parquet"):
        for mine, plain in zip(streams[name], streams["jsonl"], strict=True):
            np.testing.assert_array_equal(mine, plain)


def test_broken_and_unread_files_are_named_in_one_line(tmp_path, gpt2_model_dir, capsys):
    files = write_all(tmp_path / "src")
    whole = files["jsonl.zst"].read_bytes()
    (tmp_path / "cut.jsonl.zst").write_bytes(whole[: len(whole) * 3 // 4])  # an interrupted download
    gz = bytearray(files["jsonl.gz"].read_bytes())
    gz[len(gz) // 2 : len(gz) // 2 + 8] = b"\xff" * 8
    (tmp_path / "corrupt.jsonl.gz").write_bytes(bytes(gz))
    (tmp_path / "short.jsonl.xz").write_bytes(files["jsonl.xz"].read_bytes()[:-20])
    (tmp_path / "docs.jsonl.lz4").write_bytes(b"\x04\x22\x4d\x18")
    pq.write_table(pa.table({"content": ["a", "b"], "url": ["u", "v"]}), tmp_path / "other.parquet")
    cases = [
        ("cut.jsonl.zst", "cut.jsonl.zst breaks after line"),
        ("corrupt.jsonl.gz", "corrupt.jsonl.gz breaks after line"),
        ("short.jsonl.xz", "short.jsonl.xz breaks after line"),
        ("docs.jsonl.lz4", "docs.jsonl.lz4: .lz4 compression is not read"),
        ("other.parquet", "has no column 'text' (it has content, url): set --text-field"),
    ]
    for name, message in cases:
        out = tmp_path / f"out-{name}"
        argv = ["data", "prepare", str(tmp_path / name), "--output", str(out), "--tokenizer", str(gpt2_model_dir)]
        assert cli.main(argv) == 2, name
        last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar, if it had started
        assert last.startswith("neo-jax data prepare: error: ") and message in last, (name, last)
        assert not out.exists() or not any(out.iterdir()), (name, list(out.iterdir()))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        list(corpus.documents(tmp_path / "cut.jsonl.zst", "text"))


def test_urls_are_read_through_fsspec_offline(tmp_path, gpt2_model_dir, capsys):
    """file:// with a glob, and http:// from a local server: the documents and the token stream of the local
    plain file; a missing file and a host that does not answer are one line and exit 2."""
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    files = write_all(tmp_path / "src")
    found = data.expand_paths([f"file://{tmp_path}/src/docs.jsonl.*"])
    assert found == [f"file://{p}" for p in sorted((tmp_path / "src").glob("docs.jsonl.*"))]
    assert list(data.read_documents([found[-1]])) == DOCS

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(tmp_path / "src")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        streams = {}
        for name, source in (("local", str(files["jsonl"])), ("http", f"{base}/docs.jsonl.zst")):
            out = tmp_path / name
            argv = ["data", "prepare", source, "--output", str(out), "--tokenizer", str(gpt2_model_dir)]
            assert cli.main([*argv, "--validation-docs", "5"]) == 0, capsys.readouterr().err
            streams[name] = (shard_tokens(out, "train"), shard_tokens(out, "validation"))
        for mine, plain in zip(streams["http"], streams["local"], strict=True):
            np.testing.assert_array_equal(mine, plain)
        manifest = json.loads((tmp_path / "http" / "manifest.json").read_text())
        assert manifest["sources"][0]["name"] == f"{base}/docs.jsonl.zst" and manifest["sources"][0]["sha256"]
        capsys.readouterr()
        with socket.socket() as closed:  # a port nobody listens on
            closed.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{closed.getsockname()[1]}/docs.jsonl"
        for source, message in ((f"{base}/missing.jsonl.zst", "no data file matches"), (dead, "cannot be read")):
            argv = ["data", "prepare", source, "--output", str(tmp_path / "bad"), "--tokenizer", str(gpt2_model_dir)]
            assert cli.main(argv) == 2, source
            err = capsys.readouterr().err.strip()
            assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "bad").exists()
    finally:
        server.shutdown()


def test_parts_take_whole_files_and_open_only_their_own(tmp_path, gpt2_model_dir, monkeypatch):
    """Five files, two parts: file j is part j mod 2's, read and hashed by it alone; the union holds every
    document once and every file's hash."""
    import hashlib

    import transformers

    from neo_jax import prepare

    src = tmp_path / "src"
    src.mkdir()
    groups = [DOCS[j * 12 : (j + 1) * 12] for j in range(5)]
    for j, docs in enumerate(groups):
        (src / f"f{j}.jsonl.gz").write_bytes(
            gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in docs).encode())
        )
    opened: list[str] = []
    real = corpus.open_binary

    def spy(source):
        opened.append(Path(str(source)).name)
        return real(source)

    monkeypatch.setattr(corpus, "open_binary", spy)
    monkeypatch.setattr(prepare, "open_binary", spy)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gpt2_model_dir)
    for part in (0, 1):
        opened.clear()
        prepare.prepare([str(src / "*.jsonl.gz")], tmp_path / "parts", gpt2_model_dir, shard=f"{part}/2", num_proc=1)
        sources = {name for name in opened if name.endswith(".jsonl.gz")}  # (the tokenizer's files are hashed too)
        assert sources == {f"f{j}.jsonl.gz" for j in range(part, 5, 2)}, (part, opened)
    prepared = data.TokenData(tmp_path / "parts")
    stream = prepared.train.read(0, prepared.train.tokens)
    order = [t for j in (0, 2, 4, 1, 3) for t in groups[j]]
    expected = [t for doc in order for t in tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]]
    np.testing.assert_array_equal(stream, expected)
    sources = prepared.manifest["sources"]
    assert [s["sha256"] for s in sources] == [
        hashlib.sha256((src / f"f{j}.jsonl.gz").read_bytes()).hexdigest() for j in range(5)
    ]
