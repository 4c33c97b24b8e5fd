"""Ahead-of-time compilation for TPU slices through libtpu, on this CPU: nothing runs, XLA:TPU compiles and
reports its own per-chip memory. Each (model, topology, task) compiles once per session."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest
import yaml

from neo_jax import aot, plan
from neo_jax.attention import choose
from neo_jax.cli import main
from neo_jax.config import GPTNeoConfig
from neo_jax.sharding import parse_mesh

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))  # fine-tuning and pretraining


def few_layers(preset: str, layers: int = 2) -> GPTNeoConfig:
    """A released model's widths with fewer layers: where the point is how memory scales, not its size."""
    config = GPTNeoConfig.preset(preset)
    return dataclasses.replace(config, num_layers=layers, attention_types=((("global", "local"), layers // 2),))


def test_slices_describe_their_chips():
    assert len(aot.slice_devices("v5e-8")) == 8 and len(aot.slice_devices("v5e-1")) == 1
    assert len(aot.slice_devices("v4-8")) == 4  # megacore: one device per chip, as v4 runs
    assert len(aot.slice_devices("v5p-8")) == 4 and len(aot.slice_devices("v6e-8")) == 8
    assert len(aot.slice_devices("v5e-256")) == 256
    assert aot.slice_devices("v4-8")[0].device_kind == "TPU v4"
    assert aot.slice_chip("v5e-8").hbm_bytes == 16 * 2**30


@functools.cache
def two_layer_step(topology: str, batch: int):
    """A 2-layer 125M train step at seq 2048 with what auto picks on a TPU (splash), lowered once per session for
    ``topology`` at a global ``batch``."""
    return aot.train_program(few_layers("125M"), aot.slice_mesh(topology), batch=batch, seq=2048)


@functools.cache
def two_layer_figures(topology: str, batch: int) -> dict:
    """``two_layer_step`` compiled by XLA:TPU (once per session): ``aot.analyse``'s figures."""
    return aot.analyse(two_layer_step(topology, batch))


def test_activations_split_over_a_slice():
    """v5e-8 with batch 8 holds what one v5e chip holds for batch 1 (within 1.25x): activations are split by
    batch on the TPU too. Before they were constrained, 125M at batch 8 needed 39 GB per chip."""
    eight, one = two_layer_figures("v5e-8", 8), two_layer_figures("v5e-1", 1)
    assert eight["temporaries"] <= 1.25 * one["temporaries"], (eight, one)
    assert one["temporaries"] > 2**30  # the activations of 2048 tokens, not the 2-layer model's weights


@pytest.fixture(scope="session")
def shipped():
    """Each shipped fine-tuning and pretraining config's train step compiled for the slice its header names (full shapes)."""
    results = {}
    for path in CONFIGS:
        run = yaml.safe_load(path.read_text())
        model = run["model"]  # a released model's hub id, or a config beside the YAML file
        config = (
            GPTNeoConfig.from_json_file(path.parent / model)
            if model.endswith(".json")
            else GPTNeoConfig.preset(model.rsplit("-", 1)[1])
        )
        compiled = plan.compiled_train(
            config,
            run["topology"],
            run["batch_size"],
            run["seq_len"],
            mesh=parse_mesh(run.get("mesh") or "1,-1,1"),  # default: every chip on fsdp, as neo-jax train
            remat=run["remat"],
            grad_accum=run["grad_accum"],
            dtype=jnp.dtype(run["dtype"]),
        )
        results[path.name] = (run, config, compiled["mesh"], compiled)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sequence-classification", "token-classification"])
def test_a_classifier_train_step_compiles_for_a_slice_without_the_vocabulary_s_activations(task):
    """A classifier's step (its head's loss on labels) compiles for a v5e-8 with the batch split as the causal
    LM's is; it skips the vocabulary-wide logits, so it needs less than the LM's step at the same shape."""
    config = dataclasses.replace(few_layers("125M").with_task(task, 5), pad_token_id=50256)
    figures = aot.analyse(aot.train_program(config, aot.slice_mesh("v5e-8"), batch=8, seq=2048))
    assert figures["temporaries"] < two_layer_figures("v5e-8", 8)["temporaries"], figures


def test_every_shipped_config_fits_its_slice_with_headroom(shipped):
    assert len(shipped) == 4
    assert {run["topology"] for run, *_ in shipped.values()} == {"v4-8", "v5e-8"}
    for name, (run, _, _, compiled) in shipped.items():
        assert choose(run.get("attention", "auto"), run["seq_len"], jnp.dtype(run["dtype"]), on="tpu") == "splash"
        hbm = aot.slice_chip(run["topology"]).hbm_bytes
        assert compiled["total"] <= 0.9 * hbm, (name, compiled["total"] / 2**30)
        # the header quotes the compiled figure
        header = Path(__file__).parents[1].joinpath("configs", name).read_text().splitlines()[1]
        assert f"{compiled['total'] / 2**30:.1f} GiB" in header, (name, header, compiled["total"] / 2**30)


@pytest.mark.slow
def test_the_estimate_is_within_a_quarter_of_the_compiler(shipped):
    for name, (run, config, mesh, compiled) in shipped.items():
        estimate = plan.plan(
            config,
            mesh,
            run["batch_size"],
            run["seq_len"],
            remat=run["remat"],
            grad_accum=run["grad_accum"],
            dtype=jnp.dtype(run["dtype"]),
        )
        assert abs(estimate["total"] / compiled["total"] - 1) <= 0.25, (name, estimate["total"], compiled["total"])
        assert estimate["parameters"] == compiled["parameters"]


@pytest.mark.slow
def test_1_3b_fits_a_v5e_8_without_remat():
    """Splash attention (what auto picks on a TPU) leaves no [T, T] array: 1.3B at seq 2048, batch 8, no remat
    fits 16 GiB per v5e chip (21.7 GiB with dense attention, 12.4 GiB with blockwise)."""
    lowered = aot.train_program(GPTNeoConfig.preset("1.3B"), aot.slice_mesh("v5e-8"), batch=8, seq=2048)
    assert aot.analyse(lowered)["total"] <= 14 * 2**30


def test_generation_compiles_for_a_v5e_8():
    """125M's prefill and decode split over a slice. (One chip's generation is the int8 test's.)"""
    config = GPTNeoConfig.preset("125M")
    result = plan.compiled_generate(config, "v5e-8", batch=8, max_len=2048, prompt_len=1024)
    assert result["prefill"]["total"] < 16 * 2**30 and result["decode"]["total"] < 16 * 2**30
    # the decode program holds at least the weights and the KV cache (bf16, split over the slice's chips)
    assert result["decode"]["arguments"] >= result["parameters"] + result["kv_cache"]


def test_plan_cli_compiles_for_a_topology(tmp_path, capsys):
    # 125M's depth and window at a quarter of its width and a small vocabulary: what the CLI reports, not how
    # big it is (XLA:TPU compiles it in half the time).
    dataclasses.replace(few_layers("125M"), hidden_size=256, num_heads=4, vocab_size=1024).to_json_file(
        tmp_path / "config.json"
    )
    argv = ["plan", "--model", str(tmp_path), "--topology", "v5e-8", "--batch", "8", "--seq", "1024"]
    assert main([*argv, "--remat", "full", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["fits"] and record["temporaries"] > 0 and record["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert record["roofline"]["seconds"] > 0 and 0 < record["roofline"]["mfu_ceiling"] <= 1
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "compiled by XLA:TPU" in out and "fits: yes" in out and "197 TFLOP/s bf16, 819 GB/s HBM" in out


def test_plan_compiles_the_attention_it_is_given():
    """At 2048 tokens dense attention's [T, T] scores show in the compiled temporaries; splash (auto's pick on a
    TPU) has none (the rest is mostly the [T, vocab] logits, the same in both). Blockwise's memory, linear in
    the length, is test_attention's."""
    config = few_layers("125M")
    dense = plan.compiled_train(config, "v5e-1", 1, 2048, attention="dense")["temporaries"]
    splash = two_layer_figures("v5e-1", 1)["temporaries"]
    probabilities = config.num_layers * config.num_heads * 2048**2 * 4  # every layer's float32 [T, T], batch 1
    assert dense - splash >= probabilities / 2, (splash / 2**30, dense / 2**30)


@pytest.mark.parametrize("topology", ["v5e-8", "v4-8"])
def test_auto_is_splash_on_a_tpu(topology):
    """The train step lowered for a slice runs the Pallas splash kernels (forward, and both backward kernels) in
    every layer, split over the slice by batch (a global and a local layer: two masks, one kernel each). That it
    compiles and fits: v5e-8 here, v4-8 in the shipped configs (splash at seq 2048 on a v4-8, full size)."""
    kernels = re.findall(r"splash_mha_\w+", two_layer_step(topology, aot.slice_size(topology)).as_text())
    assert sorted(set(kernels)) == [
        "splash_mha_dkv_no_residuals",
        "splash_mha_dq_no_residuals",
        "splash_mha_fwd_residuals",
    ]
    if topology == "v5e-8":
        assert two_layer_figures(topology, 8)["total"] < aot.slice_chip(topology).hbm_bytes


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--topology", "v9-8"], "unknown TPU topology 'v9-8'; known: v5e-1,"),
        (["--topology", "v5e-8", "--mesh", "1,4,1"], "has 4 devices; v5e-8 has 8"),
        (["--topology", "v5e-8", "--batch", "4"], "multiple of data x fsdp = 8"),
        (
            ["--topology", "v4-8", "--batch", "8", "--grad-accum", "4"],
            "multiple of data x fsdp = 4 times grad_accum = 4",
        ),
        (["--mesh", "1,1,1", "--seq", "4096"], "max_position_embeddings"),
    ],
)
def test_plan_bad_input(flags, message, capsys):
    argv = ["plan", "--model", "125M", "--batch", "8", "--seq", "512", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_missing_libtpu_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu raises ImportError
    assert main(["plan", "--model", "125M", "--topology", "v5e-8", "--batch", "8", "--seq", "512"]) == 2
    assert "pip install 'neo_jax[tpu]'" in capsys.readouterr().err
    assert main(["plan", "--model", "125M", "--topology", "v5e-8", "--batch", "8", "--seq", "512", "--no-compile"]) == 0
    assert "estimated" in capsys.readouterr().out


def _abort():
    import os

    os.abort()


def test_a_compiler_crash_is_an_error_not_a_dead_process():
    """XLA:TPU (libtpu 0.0.42.1) aborts the process compiling 2.7B with fsdp=4 on v4 and v5p; plan compiles in a
    child process so that it becomes a one-line error."""
    with pytest.raises(ValueError, match="XLA:TPU crashed while compiling this program"):
        plan.isolated(_abort)
    assert plan.isolated(int, "7") == 7


def test_int8_decode_compiles_for_v5e_with_the_conversion_fused():
    """int8 weights on a v5e chip: the decode program's arguments shrink by the weights' bytes, and its
    temporaries do not grow, so XLA:TPU converts the int8 weights inside the matmul fusions and never holds a
    bfloat16 copy of them."""
    config = few_layers("125M")
    bf16, int8 = (
        plan.compiled_generate(config, "v5e-1", batch=1, max_len=512, prompt_len=256, int8=flag)
        for flag in (False, True)
    )
    assert int8["parameters"] < 0.6 * bf16["parameters"]
    rest = bf16["decode"]["arguments"] - bf16["parameters"]  # the KV cache and the loop state
    assert int8["decode"]["arguments"] - int8["parameters"] == pytest.approx(rest, rel=0.01)  # (TPU tile padding)
    assert int8["decode"]["temporaries"] <= bf16["decode"]["temporaries"]
