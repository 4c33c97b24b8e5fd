"""Multi-host for real: two processes on this machine (4 CPU devices each, gloo collectives) run a forward
pass, greedy generation, a train step and a collective Orbax save on a (2, 2, 2) mesh and must match one
process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import torch
import transformers
from flax import nnx, traverse_util

import neo_jax
from neo_jax import distributed
from neo_jax.train import train_step
from tests.conftest import SMALL, TOKENIZER_DIR

ROOT = Path(__file__).parents[1]
WORKER = ROOT / "tests" / "multidevice" / "multihost_worker.py"
EMBED_WORKER = ROOT / "tests" / "multidevice" / "embed_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(worker: Path, *args) -> None:
    """``python WORKER PROCESS_ID PORT ARGS...`` as processes 0 and 1 of one JAX run on this machine (each with
    the CPU devices the worker sets); both must exit 0, and neither is left behind."""
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    workers = [
        subprocess.Popen(
            [sys.executable, str(worker), str(i), port, *map(str, args)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [w.communicate(timeout=300)[0] for w in workers]
    finally:
        for w in workers:  # never leave a worker behind, whatever happened
            if w.poll() is None:
                w.kill()
                w.wait()
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-3000:] for o in outputs)


def test_two_processes_match_one(tmp_path):
    config = transformers.GPTNeoConfig(**{**SMALL, "window_size": 8})
    torch.manual_seed(0)
    transformers.GPTNeoForCausalLM(config).save_pretrained(tmp_path / "hf")
    ids = np.random.default_rng(0).integers(0, SMALL["vocab_size"], (8, 32)).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)

    run_two_processes(WORKER, tmp_path / "hf", tmp_path)

    result = json.loads((tmp_path / "result.json").read_text())
    assert result["devices"] == 8
    single = neo_jax.from_pretrained(tmp_path / "hf", progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), np.asarray(single(ids)), atol=1e-5, rtol=0)
    tokens = neo_jax.generate(single, ids[:, :12], max_new_tokens=10)
    np.testing.assert_array_equal(np.load(tmp_path / "tokens.npy"), tokens)
    loss = float(train_step(single, nnx.Optimizer(single, optax.sgd(0.5), wrt=nnx.Param), ids)["loss"])
    assert abs(result["loss"] - loss) <= 1e-5 * abs(loss)
    expected = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(single, nnx.Param)))
    got = np.load(tmp_path / "params.npz")
    for key, value in expected.items():
        np.testing.assert_allclose(got["/".join(map(str, key))], np.asarray(value), atol=1e-6, err_msg=str(key))
    # the checkpoint both processes wrote together holds exactly the gathered parameters
    saved = traverse_util.flatten_dict(
        nnx.to_pure_dict(nnx.state(neo_jax.from_pretrained(tmp_path / "orbax"), nnx.Param))
    )
    for key, value in saved.items():
        np.testing.assert_array_equal(np.asarray(value), got["/".join(map(str, key))])
    assert not list(tmp_path.glob(".orbax*"))


def test_two_hosts_embed_one_corpus_into_one_file(tmp_path):
    """`neo-jax embed` on two processes (a (2, 2, 1) mesh over both): each writes its rows of every batch into the
    one output, which equals one process's vectors."""
    from neo_jax.embed import encode

    config = transformers.GPTNeoConfig(**SMALL)
    torch.manual_seed(0)
    transformers.GPTNeoModel(config).save_pretrained(tmp_path / "hf")
    transformers.GPT2TokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(tmp_path / "hf")
    rng = np.random.default_rng(0)
    texts = [" ".join(["ab", "cd", "ef"][i % 3] for i in range(int(n))) for n in rng.integers(1, 60, 23)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    run_two_processes(EMBED_WORKER, tmp_path / "hf", tmp_path / "docs.jsonl", tmp_path / "out.npy")

    single = neo_jax.from_pretrained(tmp_path / "hf", progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), encode(single, texts), atol=1e-5, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "hf", "out.npy"]


def test_single_process_helpers(capsys):
    assert distributed.is_main_process()
    distributed.log("hello from process 0")
    assert "hello from process 0" in capsys.readouterr().err
    mesh = neo_jax.make_mesh()
    batch = distributed.global_batch(np.arange(6).reshape(3, 2), mesh)
    assert isinstance(batch, jax.Array) and batch.shape == (3 * jax.process_count(), 2)
    np.testing.assert_array_equal(distributed.gather(batch), np.arange(6).reshape(3, 2))
