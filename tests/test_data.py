"""Training data: reading sources, preparing token shards (the exact stream, resuming, parts), reading them
back (the keyed permutation, batches by step, the loader) and clear errors that change nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import transformers

from neo_jax import cli, data, prepare


def test_read_documents_from_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "b.txt").write_text("second file")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "x": 1}) + "\n")
    docs = list(data.read_documents([str(tmp_path / "*.txt"), str(tmp_path / "c.jsonl")]))
    assert docs == ["first file", "second file", "one", "two"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"{not json}\n", r"c.jsonl:1 is not valid JSON"),
        (json.dumps({"body": "x"}).encode() + b"\n", r"c.jsonl:1 has no field 'text': set --text-field$"),
        (b'{"text": 7}\n', r"c.jsonl:1: field 'text' holds int, not a string$"),
        (
            b'{"text": "ok"}\n{"text": "a\\ud800b"}\n',
            r"c.jsonl:2: field 'text' holds a lone surrogate escape \(\\ud800\)",
        ),
        (b"[" * 100_000 + b"]" * 100_000 + b"\n", r"c.jsonl:1 is not valid JSON here: it nests too deep to read$"),
        (
            b'{"text": "x"}\n{"text": "caf\xe9"}\n',
            r"c.jsonl:2 is not UTF-8 text \(column 14: invalid continuation byte\)",
        ),
    ],
)
def test_bad_jsonl(tmp_path, content, message):
    """One line naming the file and line (and the column of a byte that is not UTF-8)."""
    (tmp_path / "c.jsonl").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        list(data.read_documents([str(tmp_path / "c.jsonl")]))


def test_not_utf8_names_the_byte_of_the_file(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"x" * 70_000 + b"\xff")
    with pytest.raises(ValueError, match=r"a.txt is not UTF-8 text \(byte 70000: invalid start byte\)"):
        list(data.read_documents([str(tmp_path / "a.txt")]))


def test_a_glob_through_a_symlink_cycle_reads_each_file_once(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub" / "b.txt").write_text("b")
    (tmp_path / "sub" / "self").symlink_to(tmp_path / "sub")
    (tmp_path / "sub" / "up").symlink_to(tmp_path)
    (tmp_path / "sub" / "link.txt").symlink_to(tmp_path / "a.txt")
    (tmp_path / ".hidden.txt").write_text("h")
    assert list(data.read_documents([str(tmp_path / "**" / "*.txt")])) == ["a", "b"]


def test_pieces_tokenize_as_the_whole_document(tokenizer_dir):
    """A long document is encoded a piece at a time; the tokens are the whole document's, and no piece is
    longer than asked (a stretch with no space between words is cut where the size runs out)."""
    words = [
        "Hello",
        "world,",
        "  two  spaces",
        "\n\nnew paragraph",
        "caf\u00e9",
        "1234",
        "'s",
        "\t",
        "x" * 300,
        " \n ",
        "!!",
    ]
    text = " ".join(np.random.default_rng(0).choice(words, 3000))
    cut = data.pieces(text, 1000)
    assert len(cut) > 10 and "".join(cut) == text and max(map(len, cut)) <= 1000
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    whole = tokenizer(text, verbose=False)["input_ids"]
    assert [t for piece in cut for t in tokenizer(piece)["input_ids"]] == whole
    assert data.pieces("y" * 2500, 1000) == ["y" * 1000, "y" * 1000, "y" * 500]


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data file matches .*nothing-here"):
        list(data.read_documents([str(tmp_path / "nothing-here*.txt")]))


DOCS = [
    "Plain ASCII text.",
    "",  # an empty document is its EOS alone
    "Ünïcödé, émojis 🙂 and 中文 in one line.",
    "Line one\nline two\n\n  indented\ttabs  ",
    " leading space and trailing space ",
] + [f"Document number {i} says {'hello ' * (i % 7)}and goodbye." for i in range(60)]


def write_sources(directory: Path, compressed: bool = False) -> list[str]:
    """DOCS as a JSONL file and ten text files; ``compressed``: the JSONL as zstd and the texts as gzip, named by
    ``file://`` URLs (read through fsspec, as a bucket's would be)."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"text": t}) + "\n" for t in DOCS[:-10]).encode()
    if not compressed:
        (directory / "a.jsonl").write_bytes(lines)
        for i, text in enumerate(DOCS[-10:]):
            (directory / f"b{i}.txt").write_text(text)
        return [str(directory / "a.jsonl"), str(directory / "b*.txt")]
    import gzip

    import zstandard

    (directory / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    for i, text in enumerate(DOCS[-10:]):
        (directory / f"b{i}.txt.gz").write_bytes(gzip.compress(text.encode()))
    return [f"file://{directory}/a.jsonl.zst", f"file://{directory}/b*.txt.gz"]


def shard_tokens(directory: Path, split: str) -> np.ndarray:
    """A split's stream as any tool reads it: the manifest's shards, in order, through numpy.fromfile."""
    manifest = json.loads((directory / "manifest.json").read_text())
    files = [directory / s["path"] for s in manifest["shards"] if s["split"] == split]
    return np.concatenate([np.fromfile(f, dtype="<u2") for f in files] or [np.zeros(0, "<u2")])


def expected(tokenizer, docs) -> np.ndarray:
    return np.array([t for doc in docs for t in tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]], np.int64)


@pytest.fixture(scope="module")
def tokenizer_dir(gpt2_model_dir) -> Path:
    return gpt2_model_dir


def test_prepare_writes_the_tokenizers_exact_stream_in_shards_with_whole_validation_documents(
    tmp_path, tokenizer_dir, monkeypatch
):
    sources = write_sources(tmp_path / "src")
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 200)  # shards close between chunks: small ones make several
    out = prepare.prepare(
        sources, tmp_path / "out", tokenizer_dir, num_proc=2, validation_fraction=0.25, shard_tokens=300, progress=False
    )
    reference = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    held_out = [m % 4 == 3 for m in range(len(DOCS))]  # floor((m + 1) / 4) > floor(m / 4)
    train = [d for d, h in zip(DOCS, held_out) if not h]
    validation = [d for d, h in zip(DOCS, held_out) if h]
    np.testing.assert_array_equal(shard_tokens(out, "train"), expected(reference, train))
    np.testing.assert_array_equal(shard_tokens(out, "validation"), expected(reference, validation))

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["eos_token_id"] == 50256 and manifest["vocab_size"] == 50257
    shards = manifest["shards"]
    assert len([s for s in shards if s["split"] == "train"]) > 1  # rolled over at shard_tokens
    assert {s["split"] for s in shards} == {"train", "validation"}
    assert sum(s["documents"] for s in shards) == len(DOCS)
    assert all((out / s["path"]).stat().st_size == 2 * s["tokens"] for s in shards)
    assert manifest["documents"] == {"train": len(train), "validation": len(validation)}
    for source in manifest["sources"]:
        assert source["sha256"] == hashlib.sha256(Path(source["name"]).read_bytes()).hexdigest()
    # the directory alone is enough: its tokenizer files encode as the source's did
    copied = transformers.AutoTokenizer.from_pretrained(out)
    assert copied(DOCS[2])["input_ids"] == reference(DOCS[2])["input_ids"]
    assert set(manifest["tokenizer"]["files"]) <= {p.name for p in out.iterdir()}
    assert not list(out.glob(".*"))  # no temporaries, no progress file

    one = prepare.prepare(sources, tmp_path / "one", tokenizer_dir, num_proc=1, validation_docs=3, progress=False)
    np.testing.assert_array_equal(shard_tokens(one, "validation"), expected(reference, DOCS[:3]))
    np.testing.assert_array_equal(shard_tokens(one, "train"), expected(reference, DOCS[3:]))


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "compressed-urls"])
def test_an_interrupted_prepare_leaves_no_partial_shard_and_continues_from_its_last_complete_one(
    tmp_path, tokenizer_dir, monkeypatch, compressed
):
    sources = write_sources(tmp_path / "src", compressed)
    options = dict(num_proc=1, validation_fraction=0.1, shard_tokens=200, progress=False)
    straight = prepare.prepare(sources, tmp_path / "straight", tokenizer_dir, **options)

    monkeypatch.setattr(prepare, "CHUNK_CHARS", 200)  # small chunks, so shards close between them
    real_write, real_checkpoint, checkpoints = prepare._Writer.write, prepare._checkpoint, []

    def interrupted(self, *args):
        if len(checkpoints) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the third shard
        return real_write(self, *args)

    monkeypatch.setattr(prepare, "_checkpoint", lambda *a: checkpoints.append(1) or real_checkpoint(*a))

    monkeypatch.setattr(prepare._Writer, "write", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(sources, out, tokenizer_dir, **options)
    state = json.loads((out / prepare.STATE).read_text())
    assert state["shards"] and not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(s["path"] for s in state["shards"])
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))  # the shard in progress is gone

    monkeypatch.setattr(prepare._Writer, "write", real_write)
    checkpoints.clear()
    encoded = []
    real_encode = prepare._encode
    monkeypatch.setattr(prepare, "_encode", lambda chunk: encoded.append(len(chunk[0])) or real_encode(chunk))
    prepare.prepare(sources, out, tokenizer_dir, **options)
    assert sum(encoded) == len(DOCS) - state["documents_done"]  # only what the complete shards did not hold
    for split in ("train", "validation"):
        np.testing.assert_array_equal(shard_tokens(out, split), shard_tokens(straight, split))
    assert data.TokenData(out).train.tokens == data.TokenData(straight).train.tokens
    assert not (out / prepare.STATE).exists()
    if compressed:  # and the same stream as the plain files give
        plain = prepare.prepare(write_sources(tmp_path / "plain"), tmp_path / "plain-out", tokenizer_dir, **options)
        np.testing.assert_array_equal(shard_tokens(out, "train"), shard_tokens(plain, "train"))


def test_parts_prepared_apart_make_one_directory(tmp_path, tokenizer_dir):
    sources = write_sources(tmp_path / "src")[:1]  # one file for two parts: each takes every other document
    docs = DOCS[:-10]
    reference = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    shared = tmp_path / "shared"
    for part in ("1/2", "0/2"):  # in any order, into one directory
        prepare.prepare(sources, shared, tokenizer_dir, shard=part, num_proc=1, progress=False)
    both = data.TokenData(shared)
    stream = both.train.read(0, both.train.tokens)
    np.testing.assert_array_equal(stream, expected(reference, docs[0::2] + docs[1::2]))

    apart = tmp_path / "apart"  # on two machines, then copied together: read as the union without manifest.json
    for part in ("0/2", "1/2"):
        prepare.prepare(
            sources, tmp_path / part.replace("/", "of"), tokenizer_dir, shard=part, num_proc=1, progress=False
        )
    apart.mkdir()
    for name in ("0of2", "1of2"):
        for f in (tmp_path / name).iterdir():
            if f.name != "manifest.json":
                (apart / f.name).write_bytes(f.read_bytes())
    assert data.TokenData(apart).fingerprint == both.fingerprint
    (apart / "part-00001-of-00002.json").unlink()
    with pytest.raises(ValueError, match=r"holds 1 of 2 parts .* missing part\(s\) \[1\]"):
        data.TokenData(apart)


def write_prepared(directory: Path, shards: list[np.ndarray], validation: np.ndarray | None = None) -> Path:
    """A prepared directory written by hand, as any tool could: raw uint16 files and a manifest."""
    directory.mkdir(parents=True)
    entries = []
    for i, tokens in enumerate(shards):
        tokens.astype("<u2").tofile(directory / f"train-{i}.bin")
        entries.append({"path": f"train-{i}.bin", "tokens": len(tokens), "documents": 1, "split": "train"})
    if validation is not None:
        validation.astype("<u2").tofile(directory / "validation-0.bin")
        entries.append({"path": "validation-0.bin", "tokens": len(validation), "documents": 1, "split": "validation"})
    manifest = {"dtype": "uint16", "eos_token_id": 0, "vocab_size": 2**16, "tokenizer": {}, "shards": entries}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def test_the_permutation_is_a_keyed_bijection():
    for n in (1, 2, 3, 5, 64, 1000, 4097):
        values = data.Permutation(n, (0, 0))(np.arange(n))
        assert sorted(values) == list(range(n))
    a, b = data.Permutation(1000, (0, 0)), data.Permutation(1000, (0, 1))
    assert not np.array_equal(a(np.arange(1000)), b(np.arange(1000)))
    assert not np.array_equal(a(np.arange(1000)), np.arange(1000))
    assert a(np.array([17, 3])).tolist() == [a(17).item(), a(3).item()]  # any index alone, in O(1) memory
    huge = data.Permutation(10**11, (1, 2))  # 100 billion windows: nothing of that size is built
    assert len(set(huge(np.arange(1000)).tolist())) == 1000


def test_batches_are_fixed_by_seed_and_step_cover_each_epoch_and_read_across_shards(tmp_path):
    stream = np.arange(4005) % 60000
    directory = write_prepared(tmp_path / "d", [stream[:1001], stream[1001:1002], stream[1002:]], np.arange(35))
    tokens = data.TokenData(directory)
    batches = data.Batches(tokens, seq_len=10, batch_size=16, seed=3)
    assert batches.windows == 400 and batches.steps_per_epoch == 25
    again = data.Batches(data.TokenData(directory), seq_len=10, batch_size=16, seed=3)  # a resumed run
    for step in (0, 7, 24, 25, 60):
        np.testing.assert_array_equal(batches.batch(step), again.batch(step))
    for step in (0, 30):  # each row is its window, read straight from the stream (across shard ends too)
        rows, windows = batches.batch(step), batches.windows_of(step)
        for row, window in zip(rows, windows):
            np.testing.assert_array_equal(row, stream[window * 10 : window * 10 + 10])
    epoch = np.concatenate([batches.windows_of(k) for k in range(25)])
    assert sorted(epoch) == list(range(400))  # every window once per epoch
    assert not np.array_equal(np.concatenate([batches.windows_of(k) for k in range(25, 50)]), epoch)
    other = data.Batches(tokens, seq_len=10, batch_size=16, seed=4)
    assert not np.array_equal(other.windows_of(0), batches.windows_of(0))
    np.testing.assert_array_equal(batches.rows(5, 4, 9), batches.batch(5)[4:9])
    assert [b.shape for b in batches.validation_batches()] == [(3, 10)]
    assert batches.fingerprint() != other.fingerprint()

    loader = data.Loader(batches, start=12)
    try:
        for step in range(12, 16):
            array, waited = loader.next()
            np.testing.assert_array_equal(np.asarray(array), batches.batch(step))
            assert waited >= 0
    finally:
        loader.close()
    assert loader.local_rows() == [(0, 16)]


def snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_bad_data_is_one_line_exit_2_and_changes_nothing(tmp_path, tokenizer_dir, capsys):
    from tests.conftest import SMALL

    sources = write_sources(tmp_path / "src")
    good = prepare.prepare(sources, tmp_path / "good", tokenizer_dir, num_proc=1, progress=False)
    small = tmp_path / "small-model"
    small.mkdir()
    (small / "config.json").write_text(json.dumps(SMALL | {"model_type": "gpt_neo"}))
    gpt2_vocab = tmp_path / "gpt2-config.json"
    gpt2_vocab.write_text(json.dumps(SMALL | {"vocab_size": 50257, "model_type": "gpt_neo"}))

    def broken(name, change):
        target = tmp_path / name
        target.mkdir()
        for f in good.iterdir():
            (target / f.name).write_bytes(f.read_bytes())
        change(target)
        return target

    missing = broken("missing", lambda d: (d / "train-00000.bin").unlink())
    truncated = broken("truncated", lambda d: (d / "train-00000.bin").write_bytes(b"\x01\x00" * 5))
    extra = broken("extra", lambda d: (d / "train-00099.bin").write_bytes(b"\x01\x00"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    (tmp_path / "src" / "empty.jsonl").write_text("\n")
    prepare_into = ["data", "prepare", "--output", str(tmp_path / "new"), "--tokenizer", str(tokenizer_dir)]
    train = ["train", "--data", "{data}", "--output", str(tmp_path / "run"), "--steps", "2", "--seq-len", "16"]
    cases = [
        (train, dict(data=missing, model=gpt2_vocab), "is missing shard train-00000.bin"),
        (train, dict(data=truncated, model=gpt2_vocab), "is truncated or changed"),
        (train, dict(data=extra, model=gpt2_vocab), "holds shard train-00099.bin that its manifest does not list"),
        (train, dict(data=good, model=small / "config.json"), "vocabulary of 50257 tokens, more than the model's 320"),
        (train + ["--seq-len", "4096"], dict(data=good, model=gpt2_vocab), "beyond the model's 256 positions"),
        (train + ["--batch-size", "512"], dict(data=good, model=gpt2_vocab), "fewer than one batch of 512"),
        (train[:3] + [sources[0]] + train[3:], dict(data=good, model=gpt2_vocab), "is read alone"),
        (train, dict(data=sources[0], model=gpt2_vocab), "a config without a tokenizer to read raw text with"),
        (
            [
                "data",
                "prepare",
                *sources,
                "--output",
                str(tmp_path / "new"),
                "--tokenizer",
                str(tokenizer_dir),
                "--shard",
                "3/2",
            ],
            {},
            "--shard 3/2: the part I must be in 0..N-1",
        ),
        (prepare_into + [str(tmp_path / "src" / "empty.jsonl")], {}, "the sources hold no documents to prepare"),
        (prepare_into + [*sources, "--num-proc", "0"], {}, "--num-proc must be"),
        (prepare_into + [*sources, "--validation-fraction", "1.5"], {}, "--validation-fraction must be in [0, 1)"),
        (
            ["data", "prepare", *sources, "--output", str(tmp_path / "busy"), "--tokenizer", str(tokenizer_dir)],
            {},
            "is not empty",
        ),
        (
            ["data", "prepare", *sources, "--output", str(good), "--tokenizer", str(tokenizer_dir)],
            {},
            "is already prepared",
        ),
        (
            [
                "data",
                "prepare",
                str(tmp_path / "none*.txt"),
                "--output",
                str(tmp_path / "new"),
                "--tokenizer",
                str(tokenizer_dir),
            ],
            {},
            "no data file matches",
        ),
    ]
    before = snapshot(tmp_path)
    for args, where, message in cases:
        args = [a.format(data=where.get("data")) for a in args] + (
            ["--model", str(where["model"])] if "model" in where else []
        )
        code = cli.main(args)
        err = capsys.readouterr().err.strip()
        last = err.splitlines()[-1] if err else ""  # a progress bar may stand before it
        assert code == 2 and message in last and last.startswith("neo-jax") and "Traceback" not in err, (args, err)
    assert snapshot(tmp_path) == before  # nothing written, nothing changed


def test_long_documents_are_encoded_in_pieces_with_the_whole_documents_tokens(tmp_path, tokenizer_dir, monkeypatch):
    """Documents far longer than the text sent to the tokenizer at once (here 64 characters) give the tokens of
    the whole documents, and shards close only between documents (a resume starts at one)."""
    long = [" ".join(f"word{i}{'!' * (i % 3)} and  more\n" for i in range(n)) for n in (40, 1, 90, 7)]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in long))
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 64)
    out = prepare.prepare(
        [str(tmp_path / "long.jsonl")], tmp_path / "out", tokenizer_dir, num_proc=1, shard_tokens=50, progress=False
    )
    reference = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    np.testing.assert_array_equal(shard_tokens(out, "train"), expected(reference, long))
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) > 1 and manifest["documents"]["train"] == len(long)
    eos = reference.eos_token_id
    for shard in manifest["shards"]:  # each shard ends with a document's EOS
        assert np.fromfile(out / shard["path"], "<u2")[-1] == eos


def test_overwrite_removes_only_what_a_prepare_recorded(tmp_path, tokenizer_dir, monkeypatch):
    sources = write_sources(tmp_path / "src")
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 200)  # several shards
    out = prepare.prepare(sources, tmp_path / "out", tokenizer_dir, num_proc=1, shard_tokens=50, progress=False)
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="--overwrite removes only what a prepare wrote, and .* 'notes.txt'"):
        prepare.prepare(sources, out, tokenizer_dir, num_proc=1, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "notes.txt").unlink()
    old = {s["path"] for s in json.loads((out / "manifest.json").read_text())["shards"]}
    prepare.prepare(sources[1:], out, tokenizer_dir, num_proc=1, overwrite=True, progress=False)  # fewer shards now
    new = {s["path"] for s in json.loads((out / "manifest.json").read_text())["shards"]}
    assert {p.name for p in out.glob("*.bin")} == new and len(new) < len(old)
    # a part's --overwrite: that part's files only, the other parts and the shared tokenizer stay
    parts = tmp_path / "parts"
    for part in ("0/2", "1/2"):
        prepare.prepare(sources, parts, tokenizer_dir, shard=part, num_proc=1, progress=False)
    other = {p.name: p.read_bytes() for p in parts.glob("part-00001-*")}
    prepare.prepare(sources, parts, tokenizer_dir, shard="0/2", num_proc=1, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in parts.glob("part-00001-*")} == other
    assert data.TokenData(parts).manifest["documents"]["train"] == len(DOCS)


def test_a_source_that_changes_while_it_is_prepared_is_refused(tmp_path, tokenizer_dir, monkeypatch):
    sources = write_sources(tmp_path / "src")
    chunks = prepare._chunks

    def growing(*args):
        for chunk in chunks(*args):
            yield chunk
            with open(tmp_path / "src" / "a.jsonl", "a") as f:  # the file grows as it is read
                f.write(json.dumps({"text": "late"}) + "\n")

    monkeypatch.setattr(prepare, "_chunks", growing)
    with pytest.raises(ValueError, match=r"a.jsonl changed while it was prepared"):
        prepare.prepare(sources, tmp_path / "out", tokenizer_dir, num_proc=1, progress=False)
    assert not (tmp_path / "out").exists()


def test_eval_reads_a_prepared_directory_as_its_documents(tmp_path, tokenizer_dir):
    from neo_jax.evaluate import corpus_tokens

    sources = write_sources(tmp_path / "src")
    out = prepare.prepare(sources, tmp_path / "out", tokenizer_dir, num_proc=1, progress=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    assert corpus_tokens([str(out)], tokenizer) == corpus_tokens(sources, tokenizer)
    with pytest.raises(ValueError, match="--split is train or validation"):
        corpus_tokens([str(out)], tokenizer, split="test")
