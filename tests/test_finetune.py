"""``neo-jax train`` end to end: an interrupted run (SIGTERM, kill -9 during a save) resumes onto the same
per-step losses as a straight one; the loss falls on real English; divergence, bad input and settings
fail clearly before anything compiles."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import neo_jax
from neo_jax import cli
from neo_jax.checkpoints import Checkpoints
from neo_jax.finetune import FinetuneConfig, finetune

ROOT = Path(__file__).parent.parent
ENGLISH = sorted(str(p) for p in (ROOT / "tests" / "fixtures" / "english").glob("*.txt"))
STEPS = 12
SETTINGS = dict(steps=STEPS, batch_size=4, seq_len=64, lr=3e-3, warmup=2, save_every=3, eval_every=4)


def flags(model: Path, output: Path, **overrides) -> list[str]:
    # of the two documents, the second (the Gettysburg Address) is held out whole for validation
    settings = SETTINGS | {"validation_fraction": 0.5, "dtype": "float32"} | overrides
    out = ["train", "--model", str(model), "--data", *ENGLISH, "--output", str(output)]
    for key, value in settings.items():
        out += [f"--{key.replace('_', '-')}"] if value is True else [f"--{key.replace('_', '-')}", str(value)]
    return out


def launch(args: list[str], devices: int = 1) -> subprocess.Popen:
    env = os.environ | {"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices)}
    command = [sys.executable, "-m", "neo_jax.cli", *args]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> dict:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def wait_for(condition, process: subprocess.Popen, timeout: float = 300, interval: float = 0.05) -> bool:
    """Poll ``condition`` until it holds (True) or the process ends first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(interval)
    process.kill()
    raise TimeoutError("the training run did not get there in time")


def parameters(source) -> dict:
    model = neo_jax.from_pretrained(source, progress=False)
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.fixture(scope="module")
def model_dir(gpt2_model_dir) -> Path:
    return gpt2_model_dir


@pytest.fixture(scope="module")
def straight(model_dir, tmp_path_factory) -> Path:
    """The uninterrupted reference run, with TensorBoard events and an export for transformers."""
    output = tmp_path_factory.mktemp("straight") / "run"
    export = output.parent / "exported"
    result = finish(launch(flags(model_dir, output, tensorboard=True, export_hf=export)))
    assert result["step"] == STEPS and result["stopped"] == "done"
    return output


def assert_same_run(resumed: Path, straight: Path) -> None:
    records, reference = metrics(resumed), metrics(straight)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # none missing, none repeated
    for key in ("loss", "grad_norm", "lr"):
        np.testing.assert_allclose([r[key] for r in records], [r[key] for r in reference], rtol=1e-6, err_msg=key)
    evals = lambda rs: [(r["step"], r["eval_loss"]) for r in rs if "eval_loss" in r]
    np.testing.assert_allclose(evals(records), evals(reference), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(parameters(resumed)), jax.tree.leaves(parameters(straight)), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_straight_run_writes_metrics_curves_events_and_a_transformers_model(straight):
    records = metrics(straight)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for record in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(record)
        assert all(math.isfinite(v) for v in record.values())
    assert [r["step"] for r in records if "eval_loss" in r] == [4, 8, 12]
    assert all(math.isclose(r["eval_perplexity"], math.exp(r["eval_loss"])) for r in records if "eval_loss" in r)
    assert records[0]["lr"] == 0.0 and math.isclose(records[2]["lr"], 3e-3, rel_tol=1e-6)  # warmup, then cosine
    assert (straight / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((straight / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(Checkpoints(straight / "checkpoints", read_only=True).all_steps()) == [6, 9, 12]

    # the export loads in transformers and computes what the trained checkpoint computes
    exported = transformers.GPTNeoForCausalLM.from_pretrained(straight.parent / "exported").eval()
    ids = np.random.default_rng(0).integers(0, 50257, (2, 40))
    with torch.no_grad():
        expected = exported(torch.as_tensor(ids)).logits.numpy()
    trained = neo_jax.from_pretrained(straight, progress=False)  # the run directory is a model source
    np.testing.assert_allclose(np.asarray(trained(jnp.asarray(ids))), expected, atol=1e-4, rtol=1e-4)


def test_loss_falls_on_english_text(straight):
    records = metrics(straight)
    losses = [r["loss"] for r in records]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert np.mean(losses[-3:]) < losses[0] - 1.0, losses
    assert evals[-1] < evals[0] - 0.5, evals  # on held-out blocks too


def test_sigterm_saves_exits_0_and_the_same_command_resumes_exactly(model_dir, straight, tmp_path):
    output = tmp_path / "run"
    args = flags(model_dir, output)
    process = launch(args)
    assert wait_for(lambda: (output / "metrics.jsonl").exists() and len(metrics(output)) >= 3, process)
    process.send_signal(signal.SIGTERM)
    result = finish(process)
    assert result["stopped"] == "sigterm" and result["step"] < STEPS
    assert Checkpoints(output / "checkpoints", read_only=True).latest_step() == result["step"]  # saved on the way out
    assert not (output / "loss.png").exists()

    assert finish(launch(args))["stopped"] == "done"
    assert_same_run(output, straight)


def test_ctrl_c_saves_says_how_to_resume_and_exits_130(model_dir, tmp_path):
    """The first Ctrl-C stops after the step in flight and saves, as SIGTERM does; a second stops at once.
    Neither prints a traceback."""
    output = tmp_path / "run"
    process = launch(flags(model_dir, output))
    assert wait_for(lambda: (output / "metrics.jsonl").exists() and len(metrics(output)) >= 2, process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130 and "Traceback" not in err, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["stopped"] == "sigint" and f"Ctrl-C: stopped at step {result['step']}, saved" in err
    assert Checkpoints(output / "checkpoints", read_only=True).latest_step() == result["step"]

    log = tmp_path / "stderr.txt"  # resume; a second Ctrl-C, once the first is taken, stops it at once
    with log.open("w") as stderr:
        env = os.environ | {"JAX_PLATFORMS": "cpu"}
        command = [sys.executable, "-m", "neo_jax.cli", *flags(model_dir, output)]
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        assert wait_for(lambda: len(metrics(output)) > result["step"], process)
        process.send_signal(signal.SIGINT)
        assert wait_for(lambda: "press Ctrl-C again" in log.read_text(), process)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=300)
    err = log.read_text()
    assert process.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert "Ctrl-C again: stopped at once" in err  # wherever the run was: mid-step, or saving on its way out


def test_kill_9_during_a_save_resumes_from_the_last_complete_checkpoint(model_dir, straight, tmp_path):
    output = tmp_path / "run"
    args = flags(model_dir, output, save_every=1)
    process = launch(args)
    saving = lambda: any((output / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
    assert wait_for(saving, process, interval=0.001), "the run ended before a save could be interrupted"
    process.send_signal(signal.SIGKILL)
    process.communicate()
    logged = metrics(output)[-1]["step"] if (output / "metrics.jsonl").exists() else 0
    complete = Checkpoints(output / "checkpoints", read_only=True).latest_step() or 0
    assert complete <= logged < STEPS

    assert finish(launch(args))["stopped"] == "done"
    assert_same_run(output, straight)
    assert not list((output / "checkpoints").glob("*tmp*"))


def test_a_sharded_run_matches_one_device(model_dir, straight, tmp_path):
    output = tmp_path / "run"
    finish(launch(flags(model_dir, output, mesh="2,2,2"), devices=8))
    sharded, reference = metrics(output), metrics(straight)
    np.testing.assert_allclose([r["loss"] for r in sharded], [r["loss"] for r in reference], rtol=1e-4)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(model_dir, tmp_path, monkeypatch):
    import neo_jax.finetune as module

    real_step, calls = module.train_step, []

    def poisoned(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls.append(1)
        return out | {"loss": jnp.float32(np.nan)} if len(calls) == 5 else out

    monkeypatch.setattr(module, "train_step", poisoned)
    output = tmp_path / "run"
    config = FinetuneConfig.load(
        None, model=str(model_dir), data=ENGLISH, output=str(output), dtype="float32", **SETTINGS | {"save_every": 2}
    )
    with pytest.raises(FloatingPointError, match=r"nan .* at step 5: .*last good checkpoint is step 4"):
        finetune(config, progress=False)
    assert [r["step"] for r in metrics(output)] == [1, 2, 3, 4]
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(parameters(output)))


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = cli.main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": ["{tmp}/nowhere/*.txt"]}, "no data file matches"),
        ({"data": ["{tmp}/empty.txt"]}, "fewer than 64 tokens"),
        ({"data": ["{tmp}/empty.jsonl"]}, "the sources hold no documents"),
        ({"seq_len": 4096}, "seq_len 4096 is beyond the model's 256 positions"),
        ({"grad_accum": 3}, "does not split into grad_accum=3"),
        ({"mesh": "2,1,1"}, "needs 2 devices, but 1 are available"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"text_field": "body", "data": ["{tmp}/docs.jsonl"]}, "has no field 'body'"),
    ],
)
def test_bad_input_fails_before_the_model_loads(model_dir, tmp_path, monkeypatch, capsys, change, message):
    monkeypatch.setattr("neo_jax.convert.from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "some words"}) + "\n")
    settings = {"data": ENGLISH} | {
        k: [d.format(tmp=tmp_path) for d in v] if k == "data" else v for k, v in change.items()
    }
    args = flags(model_dir, tmp_path / "run", **{k: v for k, v in settings.items() if k != "data"})
    data_at = args.index("--data")
    args[data_at + 1 : data_at + 1 + len(ENGLISH)] = settings["data"]
    code, err = run_cli(args, capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_batch_that_does_not_divide_over_the_data_parallel_devices_is_refused(model_dir, tmp_path):
    process = launch(flags(model_dir, tmp_path / "run", batch_size=6, mesh="4,1,2"), devices=8)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2
    assert "micro-batch of 6 rows" in err and "4 data-parallel devices" in err, err


def test_resuming_with_other_settings_is_refused(model_dir, straight, capsys):
    code, err = run_cli(flags(model_dir, straight, seed=1), capsys)
    assert code == 2 and "other settings (seed: 0 -> 1)" in err, err


def test_yaml_configs_load_and_flags_override(tmp_path):
    from neo_jax.config import GPTNeoConfig

    for size in ("125M", "1.3B", "2.7B"):
        config = FinetuneConfig.load(ROOT / "configs" / f"finetune-{size}.yaml", data=["x.txt"], output="out")
        assert config.model == f"EleutherAI/gpt-neo-{size}" and isinstance(config.lr, float) and config.lr > 0
        assert config.seq_len <= GPTNeoConfig.preset(size).max_position_embeddings
        assert config.batch_size % (config.grad_accum * 8) == 0  # micro-batches split over an 8-chip slice
    config = FinetuneConfig.load(
        ROOT / "configs" / "finetune-125M.yaml", data=["x.txt"], output="o", lr=1e-3, steps=None
    )
    assert config.lr == 1e-3 and config.steps == 1000
    (tmp_path / "bad.yaml").write_text("model: m\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['learning_rate'\]"):
        FinetuneConfig.load(tmp_path / "bad.yaml", data=["x"], output="o")
    with pytest.raises(ValueError, match="missing setting"):
        FinetuneConfig.load(None, model="m")


def test_hugging_face_datasets_as_data(tmp_path):
    import datasets

    from neo_jax.data import read_documents

    texts = ["first document", "second one", "third"]
    datasets.Dataset.from_dict({"content": texts}).save_to_disk(tmp_path / "saved")
    assert list(read_documents([str(tmp_path / "saved")], text_field="content")) == texts
    datasets.DatasetDict({"valid": datasets.Dataset.from_dict({"text": texts[:1]})}).save_to_disk(tmp_path / "dict")
    assert list(read_documents([str(tmp_path / "dict")], split="valid")) == texts[:1]
    with pytest.raises(ValueError, match=r"splits \['valid'\], not 'train'"):
        list(read_documents([str(tmp_path / "dict")]))

    (tmp_path / "local").mkdir()  # hf:NAME goes through datasets.load_dataset (here a local folder, streamed)
    (tmp_path / "local" / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert list(read_documents([f"hf:{tmp_path / 'local'}"])) == texts


def test_sigterm_while_loading_stops_before_training(model_dir, tmp_path, monkeypatch):
    import neo_jax.convert

    real = neo_jax.convert.from_pretrained

    def preempted(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)  # the handler only raises a flag: loading goes on
        return real(*args, **kwargs)

    monkeypatch.setattr(neo_jax.convert, "from_pretrained", preempted)
    output = tmp_path / "run"
    config = FinetuneConfig.load(None, model=str(model_dir), data=ENGLISH, output=str(output), **SETTINGS)
    assert finetune(config, progress=False) == {"stopped": "sigterm"}
    assert not (output / "metrics.jsonl").exists() or not metrics(output)
    assert Checkpoints(output / "checkpoints", read_only=True).latest_step() is None
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again


COUNTING = """
import json, os, sys
import neo_jax.hf, neo_jax.source

model = os.path.realpath(sys.argv[1])
opens, resolved, tokenizers = [], [], []

def audit(event, args):  # every open of the model's own config.json, by anyone (transformers included)
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        if os.path.realpath(os.fsdecode(args[0])) == os.path.join(model, "config.json"):
            opens.append(1)

def profile(frame, event, arg):  # every call of resolve and of load_tokenizer, however they were imported
    if event == "call" and frame.f_code is neo_jax.source.resolve.__code__:
        resolved.append(str(frame.f_locals["src"]))
    if event == "call" and frame.f_code is neo_jax.hf.load_tokenizer.__code__:
        tokenizers.append(str(frame.f_locals["directory"]))

sys.addaudithook(audit)
sys.setprofile(profile)
from neo_jax.cli import main

status = main(sys.argv[2:])
sys.setprofile(None)
print(json.dumps({"status": status, "opens": len(opens), "resolved": resolved, "tokenizers": tokenizers}))
"""


def test_a_train_start_resolves_its_model_once_and_reads_its_config_once(model_dir, tmp_path):
    """One `neo-jax train` start (a one-step run on raw text) looks at its --model once: one resolution, and
    the model's config.json opened at most twice (once by the resolution; transformers' tokenizer loading
    reads it again to find the tokenizer's class). Before the sources were resolved once: three resolutions
    and four opens. Its tokenizer is loaded once, and the encoding processes are sent it (they read no file)."""
    args = flags(model_dir, tmp_path / "run", steps=1, batch_size=2, seq_len=32, save_every=1, eval_every=0)
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", COUNTING, str(model_dir), *args],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    counted = json.loads(out.stdout.strip().splitlines()[-1])
    assert counted["status"] == 0
    assert counted["resolved"] == [str(model_dir)]
    assert 1 <= counted["opens"] <= 2, counted
    assert counted["tokenizers"] == [str(model_dir)]


def test_missing_data_fails_before_the_model_is_resolved(tmp_path, capsys, monkeypatch):
    """A hub model may be a long download: the data's files are checked first."""
    monkeypatch.setattr("neo_jax.finetune.resolve", lambda *a, **k: pytest.fail("the model was resolved"))
    missing = tmp_path / "missing.txt"
    argv = ["train", "--model", "EleutherAI/gpt-neo-125M", "--data", str(missing), "--output", str(tmp_path / "r")]
    assert cli.main(argv) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
