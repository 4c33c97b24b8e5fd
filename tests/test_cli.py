"""`neo-jax convert`."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import torch
import transformers

from neo_jax.cli import main
from tests.conftest import SMALL, hf_logits, make_hf_model, random_ids


def test_convert_hf_to_orbax_to_hf(tmp_path, save_hf, capsys):
    model = make_hf_model()
    src = save_hf(model)
    assert main(["convert", str(src), str(tmp_path / "orbax")]) == 0
    err = capsys.readouterr().err
    assert "loading hf" in err and "wrote" in err and "orbax, float32" in err
    assert (tmp_path / "orbax" / "params").is_dir()

    assert main(["convert", str(tmp_path / "orbax"), str(tmp_path / "back"), "--to", "hf"]) == 0
    reloaded = transformers.GPTNeoForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = random_ids(2, 40, SMALL["vocab_size"])
    assert np.abs(hf_logits(reloaded, ids) - hf_logits(model, ids)).max() <= 1e-5


def test_convert_to_bfloat16(tmp_path, save_hf):
    src = save_hf(make_hf_model())
    assert main(["convert", str(src), str(tmp_path / "bf16"), "--to", "hf", "--dtype", "bfloat16"]) == 0
    reloaded = transformers.GPTNeoForCausalLM.from_pretrained(tmp_path / "bf16")
    assert reloaded.transformer.wte.weight.dtype == torch.bfloat16


def test_convert_errors_are_one_clear_line(tmp_path, save_hf, capsys):
    assert main(["convert", str(tmp_path / "missing" / "dir"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neo-jax convert: error:") and "neither an existing directory" in err
    assert not (tmp_path / "out").exists()

    src = save_hf(make_hf_model())
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    assert main(["convert", str(src), str(tmp_path / "taken")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = shutil.which("neo-jax")
    assert exe, "the neo-jax console script is not on PATH; install the package with pip install -e ."
    result = subprocess.run([exe, "convert", "--help"], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "--to {orbax,hf}" in result.stdout and "--dtype {float32,bfloat16}" in result.stdout
