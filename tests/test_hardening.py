"""Bad input through the real `neo-jax` entry point, and config dicts at random: every mistake is one line on
stderr with exit status 2, no traceback, and no file written or changed; nothing hangs or answers NaN."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import neo_jax
import neo_jax.peft
from neo_jax.cli import main
from neo_jax.config import GPTNeoConfig
from neo_jax.finetune import FinetuneConfig, finetune
from tests.conftest import SMALL, make_hf_model

ENGLISH = sorted(str(p) for p in (Path(__file__).parent / "fixtures" / "english").glob("*.txt"))
PROGRESS = ("data: ", "loading ", "preparing")  # what a command may print on stderr before it finds the mistake
RUN = dict(steps=1, batch_size=2, seq_len=32, save_every=1, validation_fraction=0.0, dtype="float32")


def snapshot(root: Path) -> dict:
    """Every file and directory under ``root``: content hash (files) and permission bits."""
    out = {}
    for path in sorted(root.rglob("*")):
        content = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        out[str(path.relative_to(root))] = (content, path.stat().st_mode)
    return out


def damage_adapters(root: Path, good: Path) -> None:
    """PEFT adapter directories beside ``good``, each damaged in one way (see ``ADAPTERS``)."""
    from safetensors.numpy import load_file, save_file

    weights = good / "adapter_model.safetensors"
    raw = weights.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    first = next(k for k in header if k != "__metadata__")

    def variant(name: str, config=None, tensors: bytes | None = None):
        directory = root / "adapters" / name
        shutil.copytree(good, directory)
        if config is not None:
            (directory / "adapter_config.json").write_text(config)
        if tensors is not None:
            (directory / "adapter_model.safetensors").write_bytes(tensors)

    def with_header(change) -> bytes:
        edited = json.loads(json.dumps(header))
        change(edited[first])
        text = json.dumps(edited).encode()
        text += b" " * (-len(text) % 8)
        return len(text).to_bytes(8, "little") + text + raw[8 + size :]

    for name, config in (("list", "[]"), ("null", "null"), ("string", '"lora"'), ("bad-json", "{r: 4")):
        variant(f"config-{name}", config=config)
    settings = json.loads((good / "adapter_config.json").read_text())
    variant("targets-int", config=json.dumps(settings | {"target_modules": 5}))
    variant("rank-string", config=json.dumps(settings | {"r": "4"}))
    variant("truncated", tensors=raw[: len(raw) // 2])
    variant("offsets", tensors=with_header(lambda t: t.update(data_offsets=[0, 1 << 40])))
    variant("shape", tensors=with_header(lambda t: t.update(shape=[t["shape"][0] + 1, t["shape"][1]])))
    variant("dtype-int", tensors=with_header(lambda t: t.update(dtype="I32")))
    variant("dtype-size", tensors=with_header(lambda t: t.update(dtype="F64")))
    variant("header-length", tensors=(1 << 60).to_bytes(8, "little") + raw[8:])
    tensors = load_file(weights)
    name = min(k for k in tensors if "lora_B" in k)
    for label, value in (("nan", np.nan), ("inf", np.inf), ("huge", 1e30)):
        changed = dict(tensors)
        changed[name] = changed[name].copy()
        changed[name].flat[3] = value
        variant(label)
        save_file(changed, str(root / "adapters" / label / "adapter_model.safetensors"), metadata={"format": "pt"})


ADAPTERS = {  # damaged adapter -> the one-line error it must give
    "config-list": "must hold a JSON object of LoRA settings, not list",
    "config-null": "must hold a JSON object of LoRA settings, not NoneType",
    "config-string": "must hold a JSON object of LoRA settings, not str",
    "config-bad-json": "adapter_config.json is not valid JSON",
    "targets-int": "target_modules must be a list of module names, got 5",
    "rank-string": "lora rank must be",
    "truncated": "adapter_model.safetensors is not a readable safetensors file",
    "offsets": "adapter_model.safetensors is not a readable safetensors file",
    "shape": "adapter_model.safetensors is not a readable safetensors file",
    "dtype-int": "is I32; adapter weights are floating point",
    "dtype-size": "adapter_model.safetensors is not a readable safetensors file",
    "header-length": "adapter_model.safetensors is not a readable safetensors file",
    "nan": "holds nan; adapter weights must be finite",
    "inf": "holds inf; adapter weights must be finite",
    "huge": "holds 1e+30; adapter weights must be finite and within ±65504",  # finite, but it overflows
}


YAMLS = {  # settings files, each complete but for one mistake, and the error it must give
    "syntax.yaml": ("model: [m\n", "is not valid YAML"),
    "a-list.yaml": ("- model: m\n", "must hold a mapping of settings"),
    "nan.yaml": ("max_grad_norm: .nan\n", "max_grad_norm must be a finite number"),
    "inf-lr.yaml": ("lr: .inf\n", "lr must be a finite number"),
    "list-lr.yaml": ("lr: [1]\n", "lr must be float"),
    "float-steps.yaml": ("steps: 2.5\n", "steps must be int"),
    "object-model.yaml": ("model: {a: 1}\n", "model must be a non-empty string"),
    "data-object.yaml": ("data: {a: 1}\n", "data must be a file pattern or a list of them"),
    "null-seq.yaml": ("seq_len: ~\nbatch_size: -1\n", "batch_size must be >= 1"),
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, gpt2_model_dir):
    """Models (good, of another architecture, and broken in many ways), a text file, YAML settings files with
    mistakes, and a trained run."""
    root = tmp_path_factory.mktemp("hostile")
    shutil.copytree(gpt2_model_dir, root / "m")
    other = make_hf_model(vocab_size=50257, num_layers=2, hidden_size=32, attention_types=[[["global", "local"], 1]])
    other.save_pretrained(root / "other")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(gpt2_model_dir / name, root / "other" / name)
    (root / "x.txt").write_text("Some text to read.\n")
    tiny = root / "tiny"
    make_hf_model(seed=1).save_pretrained(tiny)
    config = json.loads((tiny / "config.json").read_text())
    broken = {
        "bad-json": "{not json",
        "a-list": [config],
        "size-string": config | {"intermediate_size": "x"},
        "types-flat": config | {"attention_types": ["global", 2]},
        "types-float-count": config | {"attention_types": [[["global", "local"], 1.7]], "num_layers": 3},
        "types-object": config | {"attention_types": {"global": 2}},
        "layers-not-a-list": config | {"attention_layers": 4},
        "eos-string": config | {"eos_token_id": "x"},
        "layers-null": config | {"num_layers": None},
        "heads-list": config | {"num_heads": [4]},
        "epsilon-string": config | {"layer_norm_epsilon": "1e-5"},
        "cache-string": config | {"use_cache": "yes"},
    }
    for name, content in broken.items():
        directory = root / "broken" / name
        directory.mkdir(parents=True)
        (directory / "config.json").write_text(content if isinstance(content, str) else json.dumps(content))
        shutil.copy(tiny / "model.safetensors", directory)
    shutil.copytree(tiny, root / "dropout")  # dropout is not applied, so training it is refused
    (root / "dropout" / "config.json").write_text(json.dumps(config | {"resid_dropout": 0.1}))
    # an Orbax model whose config.json describes other shapes than its parameters
    neo_jax.save_pretrained(neo_jax.from_pretrained(tiny, progress=False), root / "orbax-mismatch", format="orbax")
    (root / "orbax-mismatch" / "config.json").write_text(json.dumps(config | {"hidden_size": 32}))
    for name, (text, _) in YAMLS.items():
        complete = {"model": "m", "data": ["x.txt"], "output": "new"}
        (root / name).write_text(text if name in ("syntax.yaml", "a-list.yaml") else yaml.safe_dump(complete) + text)
    run = FinetuneConfig.load(None, model=str(root / "m"), data=ENGLISH[:2], output=str(root / "run"), **RUN)
    finetune(run, progress=False)

    # int8 weights whose scales were lost: Orbax alone would read the int8 values as floats
    neo_jax.save_pretrained(
        neo_jax.from_pretrained(root / "m", weights="int8", progress=False), root / "int8", format="orbax"
    )
    meta = root / "int8" / "params" / "_METADATA"
    data = json.loads(meta.read_text())
    quantization_scale = lambda key: "wte_scale" in key or ("_proj', 'scale'" in key or "c_fc', 'scale'" in key)
    data["tree_metadata"] = {k: v for k, v in data["tree_metadata"].items() if not quantization_scale(k)}
    meta.write_text(json.dumps(data))
    # weights holding NaN (Hugging Face) and an infinity (Orbax)
    from safetensors.numpy import load_file, save_file

    shutil.copytree(root / "m", root / "nan-weights")
    tensors = load_file(root / "m" / "model.safetensors")
    tensors["transformer.h.1.mlp.c_fc.weight"][5, 7] = np.nan
    save_file(tensors, str(root / "nan-weights" / "model.safetensors"), metadata={"format": "pt"})
    model = neo_jax.from_pretrained(tiny, progress=False)
    model.ln_f.scale.set_value(model.ln_f.scale[...].at[3].set(np.inf))
    neo_jax.save_pretrained(model, root / "inf-orbax", format="orbax")
    # a LoRA adapter for m, then copies of it damaged in every way ADAPTERS lists
    from neo_jax import lora

    base = neo_jax.from_pretrained(root / "m", progress=False)
    lora.add(base, lora.LoRAConfig(r=4))
    for _, dense in lora.adapted_layers(base):
        if dense.lora is not None:
            dense.lora.b.set_value(dense.lora.b[...] + 0.01)
    neo_jax.peft.save(base, root / "adapter")
    damage_adapters(root, root / "adapter")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    data_workspace(root)
    return root


def data_workspace(root: Path) -> None:
    """Sources and prepared directories damaged as users damage them (round 3 of the hardening)."""
    from neo_jax import prepare

    (root / "src").mkdir()
    (root / "src" / "a.jsonl").write_text(json.dumps({"text": "A source inside the output directory."}) + "\n")
    (root / "surrogate.jsonl").write_text('{"text": "fine"}\n{"text": "broken \\ud800 text"}\n')
    (root / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    good = prepare.prepare([str(root / "x.txt")], root / "good-data", root / "m", num_proc=1, progress=False)
    manifest = json.loads((good / "manifest.json").read_text())
    shard = manifest["shards"][0]
    damaged = {
        "manifest-deep": "[" * 100_000 + "]" * 100_000,
        "manifest-eos-string": manifest | {"eos_token_id": "x"},
        "manifest-no-vocab": {k: v for k, v in manifest.items() if k != "vocab_size"},
        "manifest-tokenizer-list": manifest | {"tokenizer": ["gpt2"]},
        "manifest-shard-twice": manifest | {"shards": [shard, shard]},
        "manifest-documents-string": manifest | {"shards": [shard | {"documents": "1"}]},
    }
    for name, content in damaged.items():
        shutil.copytree(good, root / name)
        (root / name / "manifest.json").write_text(content if isinstance(content, str) else json.dumps(content))
    shutil.copytree(good, root / "linked")  # a shard that is a link out of the directory
    (root / "linked" / shard["path"]).unlink()
    (root / "linked" / shard["path"]).symlink_to(good / shard["path"])
    shutil.copytree(good, root / "big-ids")  # ids beyond the vocabulary, in a shard of the right size
    np.full(shard["tokens"], 65000, "<u2").tofile(root / "big-ids" / shard["path"])
    (root / "huge-parts").mkdir()  # a part of 99,999,999,999: no path may be built for each
    (root / "huge-parts" / "part-00000-of-99999999999.json").write_text(json.dumps(manifest))
    (root / "unfinished").mkdir()  # a prepare killed before its first shard
    (root / "unfinished" / ".prepare-state.json").write_text(json.dumps({"settings": {}, "shards": []}))
    prepare.prepare([str(root / "x.txt")], root / "parts", root / "m", shard="0/2", num_proc=1, progress=False)
    (root / "locked").mkdir()  # another prepare holds it (the test holds the lock)
    (root / "locked" / ".prepare.lock").touch()
    config = json.loads((root / "m" / "config.json").read_text())
    (root / "huge-vocab.json").write_text(json.dumps(config | {"vocab_size": 10**9}))
    (root / "huge-positions.json").write_text(json.dumps(config | {"max_position_embeddings": 10**9}))
    import datasets

    datasets.Dataset.from_dict({"text": [1, 2]}).save_to_disk(str(root / "ints-dataset"))


def train_args(root: Path, model: str = "m", data=tuple(ENGLISH[:2]), output: str = "run") -> list[str]:
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in RUN.items()]
    return ["train", "--model", str(root / model), "--data", *data, "--output", output, *flags]


def bad_inputs(root: Path, busy_port: int) -> list[tuple[list[str], str] | tuple[list[str], str, dict]]:
    """(argv, a part of the one-line error[, environment]) for each case."""
    generate = ["generate", "--model", "m", "--prompt", "Hello"]
    ppl = ["eval", "perplexity", "--model", "m", "--data", "x.txt"]
    serve = ["serve", "--model", "m", "--max-len", "64"]
    cases = [
        # int8 weights without their scales, weights holding NaN or an infinity
        (
            ["generate", "--model", "int8", "--prompt", "Hi"],
            "periods.0.attn.k_proj.scale is missing from the checkpoint",
        ),
        (["convert", "int8", "out", "--to", "hf"], "periods.0.attn.k_proj.scale is missing from the checkpoint"),
        (["generate", "--model", "nan-weights", "--prompt", "Hi"], "transformer.h.1.mlp.c_fc.weight in"),
        (["convert", "inf-orbax", "out", "--to", "hf"], "ln_f.scale holds NaN or infinite values"),
        # API keys nobody could send, from the flag or the environment; a port already in use
        ([*serve, "--api-key", "two words"], "--api-key must be a non-empty key of visible ASCII"),
        (serve, "NEO_JAX_API_KEY must be a non-empty key", {"NEO_JAX_API_KEY": ""}),
        (serve, "NEO_JAX_API_KEY must be a non-empty key", {"NEO_JAX_API_KEY": "  "}),
        (serve, "NEO_JAX_API_KEY must be a non-empty key", {"NEO_JAX_API_KEY": "clé"}),
        ([*serve, "--port", str(busy_port)], f"cannot listen on 127.0.0.1:{busy_port}"),
        ([*serve, "--header-timeout", "0"], "--header-timeout must be > 0"),
        # smaller defects
        (["plan", "--model", "125M", "--topology", "", "--batch", "8", "--seq", "64"], "--topology is empty"),
        (["eval", "perplexity", "--model", "m", "--data", "binary.txt"], "binary.txt is not UTF-8 text"),
        (["convert", "tiny", ".", "--overwrite"], "replacing it would delete the source"),
        (["convert", "run", ".", "--overwrite"], "replacing it would delete the source"),
        (["convert", "orbax-mismatch", "out", "--to", "hf"], "does not match the parameters"),
        ([*generate, "--temperature", "nan"], "temperature must be a finite number"),
        ([*generate, "--repetition-penalty", "nan"], "repetition_penalty must be a finite number"),
        ([*generate, "--top-p", "inf"], "top_p must be a finite number"),
        ([*generate, "--stop", ""], "stop must be a list of non-empty strings"),
        ([*ppl, "--stride", "0"], "stride must be in [1,"),
        ([*ppl, "--seq-len", "0"], "seq_len must be in [2,"),
        ([*ppl, "--batch-size", "0"], "--batch-size must be >= 1"),
        (["plan", "--model", "125M", "--mesh", "-1,1,1", "--batch", "8", "--seq", "64"], "needs the three sizes"),
        (train_args(root, model="other"), "holds a run"),
        (train_args(root, model="tiny", output="new"), "is a model without a tokenizer to read raw text with"),
        # the data's fingerprint needs the data read: its progress line comes first
        (train_args(root, data=tuple(reversed(ENGLISH[:2]))), "the data differs"),
        (train_args(root, output="x.txt/run"), "is a file, not a directory"),
        (train_args(root, model="dropout", output="new"), "resid_dropout=0.1), which neo_jax does not apply"),
    ]
    cases += data_cases(root)
    for name in sorted(os.listdir(root / "broken")):
        cases.append((["convert", f"broken/{name}", f"out-{name}"], f"broken/{name}/config.json"))
    # each command that takes an adapter, with a different kind of damage (all of them: the Python API test)
    commands = {
        "config-null": ["convert", "m", "out", "--merge", "--adapter"],
        "targets-int": [*serve, "--adapter"],
        "header-length": [*generate, "--adapter"],
        "dtype-int": [*ppl, "--adapter"],
        "nan": ["convert", "m", "out", "--merge", "--adapter"],
        "inf": [*serve, "--adapter"],
        "huge": [*generate, "--adapter"],
    }
    for name, command in commands.items():
        cases.append(([*command, f"adapters/{name}"], ADAPTERS[name]))
    for name, (_, message) in YAMLS.items():
        cases.append((["train", "--config", name], message))
    return cases


def data_cases(root: Path) -> list[tuple[list[str], str]]:
    """Round 3: pretraining data, from-scratch configs and the serving flags."""
    prepare = ["data", "prepare", "--tokenizer", "m"]
    new = [*prepare, "--output", "new"]
    train = ["train", "--output", "new", "--steps", "1", "--seq-len", "8", "--batch-size", "1"]
    plan_serve = ["plan", "--model", "m", "--task", "serve", "--mesh", "1,1,1", "--no-compile", "--batch", "2"]
    plan_generate = ["plan", "--model", "m", "--task", "generate", "--mesh", "1,1,1", "--no-compile"]
    serve = ["serve", "--model", "m", "--max-len", "64"]
    return [
        # --overwrite removes only what a prepare wrote: never a source, a working directory, or a user's file
        ([*prepare, "src/a.jsonl", "--output", "src", "--overwrite"], "also holds 'a.jsonl'"),
        ([*prepare, "x.txt", "--output", ".", "--overwrite"], "--overwrite removes only what a prepare wrote"),
        ([*prepare, "x.txt", "--output", "good-data/..", "--overwrite"], "--overwrite removes only what a prepare"),
        (["convert", "tiny", "src", "--overwrite"], "holds 'a.jsonl', which is not a saved model's file"),
        (["convert", "tiny", "run", "--overwrite"], "which is not a saved model's file"),
        (train_args(root, output="src"), "holds 'a.jsonl' and no run (run.yaml)"),
        # sizes that cannot fit are refused before anything is allocated or written
        ([*new, "x.txt", "--shard", "0/99999999999"], "N must be in 1..99999"),
        ([*train, "--model", "m", "--data", "huge-parts"], "is not a part manifest of at most 99,999 parts"),
        ([*train, "--model", "huge-vocab.json", "--data", "good-data"], "more than its"),
        ([*train, "--model", "huge-positions.json", "--data", "good-data"], "more than its"),
        ([*serve, "--port", "0", "--prefix-cache-mb", "1e12"], "--prefix-cache-mb 1e+12 needs"),
        # a draft that cannot draft for the model, before either loads
        ([*serve, "--draft", "ngram", "--draft-tokens", "0"], "--draft-tokens must be >= 1"),
        ([*serve, "--draft", "ngram", "--prefill-chunk", "0"], "--draft needs chunked prefill"),
        ([*serve, "--port", "0", "--draft", "tiny"], "has a vocabulary of 320 tokens, the model m 50257"),
        ([*serve, "--port", "0", "--draft", "bigram"], "bigram"),
        # no traceback: the file and line, or the field
        ([*new, "surrogate.jsonl"], "surrogate.jsonl:2: field 'text' holds a lone surrogate escape (\\ud800)"),
        (["eval", "perplexity", "--model", "m", "--data", "surrogate.jsonl"], "surrogate.jsonl:2: field 'text'"),
        ([*new, "deep.jsonl"], "deep.jsonl:1 is not valid JSON here: it nests too deep"),
        ([*train, "--model", "m", "--data", "manifest-deep"], "manifest.json is not valid JSON here"),
        ([*train, "--model", "m", "--data", "manifest-eos-string"], "eos_token_id must be a token id, got 'x'"),
        ([*train, "--model", "m", "--data", "manifest-no-vocab"], "it has no 'vocab_size'"),
        ([*train, "--model", "m", "--data", "manifest-tokenizer-list"], "tokenizer must be an object"),
        ([*train, "--model", "m", "--data", "manifest-shard-twice"], "lists shard train-00000.bin twice"),
        ([*train, "--model", "m", "--data", "manifest-documents-string"], "needs whole-number tokens and documents"),
        ([*new, "ints-dataset"], "column 'text' holds int, not a string"),
        # no silent wrong answer
        ([*plan_serve[:-1], "0"], "--batch must be >= 1"),
        ([*plan_serve, "--max-len", "-3"], "--max-len must be >= 2"),
        ([*plan_serve, "--max-len", "100000"], "max_len 100000 exceeds the model's max_position_embeddings (256)"),
        ([*plan_serve, "--prefill-chunk", "24"], "--prefill-chunk must be a multiple of 16"),
        ([*plan_serve, "--adapters", "2", "--lora-rank", "0"], "--lora-rank must be >= 1"),
        ([*plan_generate, "--batch", "0"], "--batch must be >= 1"),
        ([*plan_generate, "--batch", "1", "--max-len", "0"], "--max-len must be >= 2"),
        ([*plan_generate, "--batch", "1", "--max-len", "1000"], "max_len (1000) <= 256"),
        ([*train, "--model", "m", "--data", "linked"], "leads out of"),
        ([*train, "--model", "m", "--data", "big-ids"], "holds token id 65000, at or above the vocabulary's 50257"),
        ([*new, "x.txt", "--validation-docs", "1"], "--validation-docs holds out every document (1 of 1)"),
        ([*serve, "--served-model-name", " "], "--served-model-name ' ': give a name without spaces"),
        ([*serve, "--served-model-name", ""], "--served-model-name '': give a name without spaces"),
        # clear messages
        (
            [*prepare, "x.txt", "--output", "parts", "--shard", "1/2", "--validation-docs", "1"],
            "another validation_docs",
        ),
        ([*prepare, "x.txt", "--output", "good-data", "--shard", "1/2"], "written by a prepare with another parts"),
        ([*prepare, "x.txt", "--output", "locked"], "another prepare holds"),
        ([*train, "--model", "m", "--data", "unfinished"], "incomplete prepare (no manifest.json yet): run the same"),
        (["eval", "perplexity", "--model", "m", "--data", "unfinished"], "incomplete prepare"),
    ]


def run_cli(
    argv: list[str], cwd: Path, env: dict | None = None, *, wrapper=(), preexec_fn=None
) -> subprocess.CompletedProcess:
    """The installed console script, run as ``wrapper + [neo-jax] + argv`` (``preexec_fn``: e.g. a memory cap)."""
    env = os.environ | {"JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"} | (env or {})
    entry = Path(sys.executable).parent / "neo-jax"  # the console script pip installed
    return subprocess.run(
        [*wrapper, entry, *argv],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=preexec_fn,
    )


def in_this_process(argv: list[str], capfd) -> tuple[int, str]:
    """``neo-jax ARGV`` through ``neo_jax.cli.main`` in this process: (exit status, stderr). stderr is read at the
    file descriptor, so what C++ libraries log counts too; a Python warning counts as a line of it, as it would
    be in a process of its own (where Python's default filters apply)."""
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        status = main(argv)
    shown = "".join(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n" for w in caught)
    return status, capfd.readouterr().err + shown


def test_bad_input_is_one_line_exit_2_and_writes_nothing(workspace, capfd, monkeypatch):
    """Every case through ``neo_jax.cli.main`` in this process, but for the installed console script's own runs:
    the first case of each command, and every serve case (a server that failed to refuse would keep serving)."""
    before = snapshot(workspace)
    monkeypatch.chdir(workspace)
    import fcntl

    with socket.socket() as busy, open(workspace / "locked" / ".prepare.lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a prepare that runs holds it
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cases = bad_inputs(workspace, busy.getsockname()[1])
        firsts = {case[0][0]: i for i, case in reversed(list(enumerate(cases)))}
        installed = {i for i, case in enumerate(cases) if case[0][0] == "serve" or firsts[case[0][0]] == i}
        assert all(i in installed for i, case in enumerate(cases) if case[2:])  # environments: their own process
        with ThreadPoolExecutor(2) as pool:
            runs = {i: pool.submit(run_cli, cases[i][0], workspace, *cases[i][2:]) for i in sorted(installed)}
            results = {i: in_this_process(case[0], capfd) for i, case in enumerate(cases) if i not in installed}
            results |= {i: (run.result().returncode, run.result().stderr) for i, run in runs.items()}
    assert len(installed) >= 12 and len(results) == len(cases)
    failures = []
    for i, (argv, message, *_) in enumerate(cases):
        status, err = results[i]
        err = err.strip()
        lines = [line for line in err.splitlines() if not line.startswith(PROGRESS)]
        if status != 2 or len(lines) != 1 or "Traceback" in err or message not in lines[0]:
            failures.append(f"{' '.join(argv)} -> {status}: {err[-600:]}")
        elif not lines[0].startswith("neo-jax "):
            failures.append(f"{' '.join(argv)}: not a neo-jax error line: {lines[0]}")
    assert not failures, "\n\n".join(failures)
    after = snapshot(workspace)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, changed


# ------------------------------------------------------------------------------------- the Python API
def test_python_api_refuses_what_would_hang_or_give_nan(tmp_path):
    make_hf_model(seed=2).save_pretrained(tmp_path)
    model = neo_jax.from_pretrained(tmp_path, progress=False)
    ids = np.array([[1, 2, 3]])
    calls = {
        "max_new_tokens must be an integer": dict(max_new_tokens=2.5),
        "max_new_tokens must be an integer, got True": dict(max_new_tokens=True),
        "temperature must be a finite number": dict(max_new_tokens=2, do_sample=True, temperature=float("nan")),
        "top_k must be an integer": dict(max_new_tokens=2, do_sample=True, top_k=1.5),
        "num_beams must be an integer": dict(max_new_tokens=2, num_beams=2.0),
        "length_penalty must be a finite number": dict(max_new_tokens=2, num_beams=2, length_penalty=float("inf")),
        "seed must be an integer": dict(max_new_tokens=2, seed=0.5),
    }
    for message, kwargs in calls.items():
        with pytest.raises(ValueError, match=message):
            neo_jax.generate(model, ids, **kwargs)
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 320\)"):
        model(np.array([[1, 2, SMALL["vocab_size"]]]))
    assert np.isfinite(model(ids, attention_mask=np.array([[1, 1, 0]]))).all()  # a forward pass takes right padding
    with pytest.raises(ValueError, match="only 0 .padding. and 1"):
        model(ids, attention_mask=np.array([[1, 2, 1]]))
    with pytest.raises(ValueError, match="padding after a token"):
        neo_jax.generate(model, ids, np.array([[1, 0, 1]]), max_new_tokens=2)
    from neo_jax.evaluate import perplexity, score

    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 320\)"):
        score(model, [[1, 2, 999]])
    with pytest.raises(ValueError, match="stride must be in"):
        perplexity(model, list(range(100)), seq_len=32, stride=0)
    # 65 tokens in windows of 32 every 32 leave a last window of one token: skipped, not an error
    result = perplexity(model, [t % 300 for t in range(65)], seq_len=32, stride=32)
    assert result["tokens"] == 62 and np.isfinite(result["perplexity"])


def test_writes_keep_sources_permissions_and_clean_up(tmp_path):
    import torch

    reference = make_hf_model(seed=3)
    reference.save_pretrained(tmp_path / "hf")
    legacy = tmp_path / "legacy"  # a pytorch_model.bin in the pre-zip format torch wrote before 1.6
    legacy.mkdir()
    torch.save(reference.state_dict(), legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    reference.config.save_pretrained(legacy)
    ids = np.array([[5, 6, 7]])
    model = neo_jax.from_pretrained(tmp_path / "hf", progress=False)
    old = neo_jax.from_pretrained(legacy, progress=False)
    np.testing.assert_array_equal(np.asarray(old(ids)), np.asarray(model(ids)))

    stale = tmp_path / ".out.tmp-killed"  # what a killed write leaves
    (stale / "params").mkdir(parents=True)
    out = neo_jax.save_pretrained(model, tmp_path / "out", format="orbax")
    assert not stale.exists() and not list(tmp_path.glob(".out.*"))
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700

    in_place = neo_jax.from_pretrained(out, progress=False)  # SRC == DST still works
    neo_jax.save_pretrained(in_place, out, format="hf", overwrite=True)
    np.testing.assert_array_equal(np.asarray(neo_jax.from_pretrained(out, progress=False)(ids)), np.asarray(model(ids)))
    with pytest.raises(ValueError, match="replacing it would delete the source"):
        neo_jax.save_pretrained(in_place, tmp_path, overwrite=True)
    assert (tmp_path / "hf" / "config.json").exists()


# ------------------------------------------------------------------------------------- random configs
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5000) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
FIELDS = [f for f in GPTNeoConfig.__dataclass_fields__ if f != "tie_word_embeddings"] + ["attention_layers"]
VALID = dict(SMALL, vocab_size=320)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4), st.booleans())
def test_random_config_dicts_are_valid_or_a_clean_value_error(changes, from_valid):
    data = (VALID if from_valid else {}) | changes
    try:
        config = GPTNeoConfig.from_hf_dict(data)
    except ValueError as e:
        assert "\n" not in str(e)
        return
    # a config that loads is a usable one: consistent layers, positive sizes, and it round-trips
    assert len(config.attention_layers) == config.num_layers > 0
    assert config.hidden_size % config.num_heads == 0
    assert GPTNeoConfig.from_hf_dict(json.loads(json.dumps(config.to_hf_dict()))) == config


def test_random_finetune_settings_are_valid_or_a_clean_value_error(tmp_path):
    """YAML values of every shape for every setting: loading gives settings or a ValueError."""

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.dictionaries(st.sampled_from(FinetuneConfig.fields()), json_values, max_size=3))
    def check(changes):
        path = tmp_path / "settings.yaml"
        path.write_text(yaml.safe_dump(changes))
        try:
            FinetuneConfig.load(path, model="m", data=["x.txt"], output="out")
        except ValueError as e:
            assert "\n" not in str(e)

    check()


# ------------------------------------------------------------------------------------- Ctrl-C
# Injected into the installed command through sitecustomize: Ctrl-C at the worst moments, every time.
CTRL_C = {
    # while Orbax writes from its background threads
    "orbax": """
import os, signal, threading
import orbax.checkpoint as ocp
save = ocp.Checkpointer.save
def interrupted_save(self, *args, **kwargs):
    threading.Timer(0.02, os.kill, (os.getpid(), signal.SIGINT)).start()
    return save(self, *args, **kwargs)
ocp.Checkpointer.save = interrupted_save
""",
    # inside a garbage-collection callback (JAX has one), where Python prints a KeyboardInterrupt and drops it
    "gc": """
import gc, os, signal, sys, time
sent = []
def callback(phase, info):
    generating = "neo_jax.generation.loop" in sys.modules and signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    if phase == "start" and generating and not sent:
        sent.append(True)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs here, inside the callback
gc.callbacks.append(callback)
""",
}


@pytest.mark.parametrize(
    "inject, argv",
    [
        ("orbax", ["convert", "m", "out"]),
        (
            "gc",
            ["generate", "--model", "m", "--prompt", "Hello", "--max-new-tokens", "200", "--compilation-cache", "none"],
        ),
    ],
)
def test_ctrl_c_always_stops_with_one_line_and_leaves_nothing(workspace, tmp_path, inject, argv):
    (tmp_path / "sitecustomize.py").write_text(CTRL_C[inject])
    before = snapshot(workspace)
    result = run_cli(argv, workspace, {"PYTHONPATH": str(tmp_path)})
    lines = [line for line in result.stderr.strip().splitlines() if "loading m" not in line]
    assert result.returncode == 130 and lines == [f"neo-jax {argv[0]}: interrupted"], result.stderr[-2000:]
    assert snapshot(workspace) == before  # no output, no temporary directory


def test_damaged_adapters_and_tiny_temperatures_through_the_python_api(workspace):
    for name, message in ADAPTERS.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            neo_jax.from_pretrained(workspace / "m", adapter=workspace / "adapters" / name, progress=False)
    model = neo_jax.from_pretrained(workspace / "m", progress=False)
    ids = np.array([[464, 2068, 7586]])
    greedy = neo_jax.generate(model, ids, max_new_tokens=8)
    for temperature in (1e-30, 1e-38, 1e-45, 1e-300):
        sampled = neo_jax.generate(model, ids, max_new_tokens=8, do_sample=True, temperature=temperature, seed=3)
        np.testing.assert_array_equal(sampled, greedy)
    penalized = neo_jax.generate(model, ids, max_new_tokens=8, do_sample=True, repetition_penalty=1e-38, seed=3)
    assert (penalized[:, 3:] != 0).any()  # not the token-0 garbage of NaN logits
    draw = lambda seed: neo_jax.generate(model, ids, max_new_tokens=8, do_sample=True, seed=seed)
    assert not np.array_equal(draw(5), draw(2**32 + 5))  # every bit of the seed counts
    np.testing.assert_array_equal(draw(2**64 - 1), draw(-1))  # seeds are taken modulo 2**64


def test_tiny_temperatures_through_the_installed_command(workspace):
    runs = {
        t: ["generate", "--model", "m", "--prompt", "Once", "--max-new-tokens", "8", "--json", "--temperature", t]
        for t in ("0", "1e-38")
    }
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(runs, pool.map(lambda argv: run_cli(argv, workspace), runs.values()), strict=True))
    completions = {t: json.loads(r.stdout)["completion"] for t, r in results.items()}
    assert completions["1e-38"] == completions["0"], completions


# ------------------------------------------------------------------------------------- disks and memory
def test_a_full_disk_is_one_line_naming_the_directory(tmp_path):
    """ENOSPC in ``data prepare`` and in ``train`` (where Orbax meets it in its writer threads, each of which
    logged a traceback): one line that says so and names the directory, exit 2. The disk is a 300 KiB tmpfs
    mounted in a mount namespace of the command's own (``unshare --mount``)."""
    from neo_jax import prepare
    from tests.test_pretrain import TINY, english_paragraphs, train_bpe

    tokenizer = train_bpe(tmp_path / "tokenizer")
    corpus = english_paragraphs(tmp_path)
    (tmp_path / "big.jsonl").write_text(corpus.read_text() * 40)  # 800 KB of tokens: more than the disk
    prepared = prepare.prepare([str(corpus)], tmp_path / "data", tokenizer, num_proc=1, progress=False)
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    disk = tmp_path / "disk"
    disk.mkdir()
    small_disk = ["unshare", "--mount", "sh", "-c", 'mount -t tmpfs -o size=300k tmpfs "$0" && exec "$@"', str(disk)]
    train = ["train", "--model", "tiny.json", "--data", str(prepared), "--output", str(disk / "run"), "--steps", "4"]
    cases = [
        (["data", "prepare", "big.jsonl", "--output", str(disk / "d"), "--tokenizer", str(tokenizer)], disk / "d"),
        ([*train, "--save-every", "2", "--seq-len", "64", "--batch-size", "4"], disk / "run" / "checkpoints"),
    ]
    for argv, where in cases:
        run = run_cli(argv, tmp_path, wrapper=small_disk)
        last = run.stderr.strip().splitlines()[-1]
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
        assert last.startswith("neo-jax ") and re.search(
            f"no space left on device writing (a checkpoint in )?{where}", last
        )


def test_a_long_document_prepares_within_a_memory_cap(tmp_path, gpt2_model_dir):
    """Under a cap of 1.2 GB on the data segment (``RLIMIT_DATA``: heap and anonymous maps; the machine has
    24 GB), an 8 MB one-line document prepares: the tokenizer sees a megabyte at a time (given it whole, the
    same command was killed under this cap; it peaked at 1.25 GB of RSS against 0.76 GB now)."""
    import resource

    def capped():
        resource.setrlimit(resource.RLIMIT_DATA, (1_200_000_000, 1_200_000_000))

    words = (Path(ENGLISH[0]).read_text() + Path(ENGLISH[1]).read_text()).split()
    text = " ".join(np.random.default_rng(0).choice(words, 1_500_000))[:8_000_000]
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": text}) + "\n")
    argv = ["data", "prepare", "long.jsonl", "--output", "out", "--tokenizer", str(gpt2_model_dir), "--num-proc", "1"]
    run = run_cli(argv, tmp_path, preexec_fn=capped)
    assert run.returncode == 0, run.stderr[-2000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["documents"]["train"] == 1 and manifest["tokens"]["train"] > 1_000_000
