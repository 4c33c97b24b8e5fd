"""Bad input through the real `neo-jax` entry point, and config dicts at random: every mistake is one line on
stderr with exit status 2, no traceback, and no file written or changed; nothing hangs or answers NaN."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import neo_jax
from neo_jax.config import GPTNeoConfig
from neo_jax.finetune import FinetuneConfig, finetune
from tests.conftest import SMALL, make_hf_model

ENGLISH = sorted(str(p) for p in (Path(__file__).parent / "fixtures" / "english").glob("*.txt"))
PROGRESS = ("data: ",)  # what a command may print on stderr before it finds the mistake
RUN = dict(steps=1, batch_size=2, seq_len=32, save_every=1, validation_fraction=0.0, dtype="float32")


def snapshot(root: Path) -> dict:
    """Every file and directory under ``root``: content hash (files) and permission bits."""
    out = {}
    for path in sorted(root.rglob("*")):
        content = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        out[str(path.relative_to(root))] = (content, path.stat().st_mode)
    return out


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
    return root


def train_args(root: Path, model: str = "m", data=tuple(ENGLISH[:2]), output: str = "run") -> list[str]:
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in RUN.items()]
    return ["train", "--model", str(root / model), "--data", *data, "--output", output, *flags]


def bad_inputs(root: Path) -> list[tuple[list[str], str]]:
    """(argv, a part of the one-line error) for each case."""
    generate = ["generate", "--model", "m", "--prompt", "Hello"]
    ppl = ["eval", "perplexity", "--model", "m", "--data", "x.txt"]
    cases = [
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
        # the data's fingerprint needs the data read: its progress line comes first
        (train_args(root, data=tuple(reversed(ENGLISH[:2]))), "the data differs"),
        (train_args(root, output="x.txt/run"), "is a file, not a directory"),
        (train_args(root, model="dropout", output="new"), "resid_dropout=0.1), which neo_jax does not apply"),
    ]
    for name in sorted(os.listdir(root / "broken")):
        cases.append((["convert", f"broken/{name}", f"out-{name}"], f"broken/{name}/config.json"))
    for name, (_, message) in YAMLS.items():
        cases.append((["train", "--config", name], message))
    return cases


def run_cli(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    entry = Path(sys.executable).parent / "neo-jax"  # the console script pip installed
    return subprocess.run([entry, *argv], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_bad_input_is_one_line_exit_2_and_writes_nothing(workspace):
    before = snapshot(workspace)
    cases = bad_inputs(workspace)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda case: run_cli(case[0], workspace), cases))
    failures = []
    for (argv, message), result in zip(cases, results, strict=True):
        err = result.stderr.strip()
        lines = [line for line in err.splitlines() if not line.startswith(PROGRESS)]
        if result.returncode != 2 or len(lines) != 1 or "Traceback" in err or message not in lines[0]:
            failures.append(f"{' '.join(argv)} -> {result.returncode}: {err[-600:]}")
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
    with pytest.raises(ValueError, match="padding after a token"):
        model(ids, attention_mask=np.array([[1, 1, 0]]))
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
