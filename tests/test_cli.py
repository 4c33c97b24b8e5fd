"""`neo-jax convert` and `neo-jax generate`."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import neo_jax.cli as neo_jax_cli
from neo_jax.cli import main
from tests.conftest import SMALL, TOKENIZER_DIR, hf_logits, make_hf_model, random_ids


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
    assert "--to {orbax,hf,peft}" in result.stdout and "--dtype {float32,bfloat16}" in result.stdout


# ------------------------------------------------------------------------------------------- generate
@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    config = transformers.GPTNeoConfig(
        **{**SMALL, "vocab_size": 50257, "bos_token_id": 50256, "eos_token_id": 50256, "window_size": 8}
    )
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("text")
    transformers.GPTNeoForCausalLM(config).save_pretrained(directory)
    transformers.GPT2TokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(directory)
    return directory


@pytest.fixture
def compilation_cache(tmp_path):
    """A directory for --compilation-cache; the process's own cache settings (CI's run-wide cache) come back after."""
    import jax

    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    yield str(tmp_path / "jax-cache")
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


def test_generate_streams_text_and_reports_speed(text_dir, compilation_cache, capsys, monkeypatch):
    import neo_jax

    expected = neo_jax.TextGenerator(text_dir)("EleutherAI has", max_new_tokens=12)[0]
    args = ["generate", "--model", str(text_dir), "--prompt", "EleutherAI has", "--max-new-tokens", "12"]
    assert main([*args, "--compilation-cache", compilation_cache]) == 0
    out, err = capsys.readouterr()
    assert out == expected + "\n"
    assert "time to first token" in err and "tokens/s" in err

    import jax

    assert jax.config.jax_compilation_cache_dir == compilation_cache

    assert main([*args, "--json", "--compilation-cache", "none"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["completion"] == expected and record["new_tokens"] == 12
    assert record["time_to_first_token_s"] <= record["seconds"]
    assert jax.config.jax_compilation_cache_dir is None

    # a cache JAX was given ($JAX_COMPILATION_CACHE_DIR) stands unless a flag or $NEO_JAX_COMPILATION_CACHE says
    from neo_jax.cli.common import enable_compilation_cache

    monkeypatch.delenv("NEO_JAX_COMPILATION_CACHE", raising=False)
    jax.config.update("jax_compilation_cache_dir", compilation_cache + "-jax")
    enable_compilation_cache(None)
    assert jax.config.jax_compilation_cache_dir == compilation_cache + "-jax"
    monkeypatch.setenv("NEO_JAX_COMPILATION_CACHE", compilation_cache)
    enable_compilation_cache(None)
    assert jax.config.jax_compilation_cache_dir == compilation_cache


def test_generate_sampling_and_beams(text_dir, capsys):
    base = ["generate", "--model", str(text_dir), "--prompt", "EleutherAI has", "--max-new-tokens", "8", "--json"]
    assert main([*base, "--temperature", "0.9", "--top-k", "20", "--seed", "3"]) == 0
    first = json.loads(capsys.readouterr().out)["completion"]
    assert main([*base, "--temperature", "0.9", "--top-k", "20", "--seed", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["completion"] == first
    assert main([*base, "--num-beams", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] > 0
    assert main([*base, "--min-new-tokens", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] == 8


def test_generate_with_a_draft_prints_the_same_text_and_its_acceptance(text_dir, tmp_path, capsys):
    """--draft (the model itself, or ngram) gives greedy decoding's text, and stderr says how many of the
    proposed tokens were accepted; a draft with another vocabulary or tokenizer is refused before loading."""
    base = ["generate", "--model", str(text_dir), "--prompt", "EleutherAI has", "--max-new-tokens", "12", "--json"]
    assert main(base) == 0
    expected = json.loads(capsys.readouterr().out)["completion"]
    for draft in (str(text_dir), "ngram"):
        assert main([*base, "--draft", draft, "--draft-tokens", "3"]) == 0
        out, err = capsys.readouterr()
        record = json.loads(out)
        assert record["completion"] == expected, draft
        figures = record["speculative"]
        assert 0 < figures["draft_tokens"] and 0 <= figures["accepted_tokens"] <= figures["draft_tokens"]
        assert f"{figures['accepted_tokens']} of {figures['draft_tokens']} proposed tokens accepted" in err
    assert 1 <= figures["mean_tokens_per_step"] <= 1 + figures["mean_accepted_per_step"]  # the last step is cut
    shutil.copytree(text_dir, tmp_path / "other")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "other")
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(tmp_path / "other")
    make_hf_model().save_pretrained(tmp_path / "small-vocab")
    for draft, message in [
        ("small-vocab", "has a vocabulary of 320 tokens, the model"),
        ("other", "has another tokenizer than the model"),
    ]:
        assert main([*base, "--draft", str(tmp_path / draft)]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--draft", "ngram", "--draft-tokens", "0"], "--draft-tokens must be >= 1"),
        (["--draft", "ngram", "--num-beams", "2"], "not beam search"),
        (["--top-p", "1.5"], "top_p must be in"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-k", "0"], "--top-k must be a positive"),
        (["--repetition-penalty", "0"], "repetition_penalty must be > 0"),
        (["--num-beams", "2", "--temperature", "0.5"], "cannot be combined"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--min-new-tokens", "-1"], "min_new_tokens must be >= 0"),
        (["--num-beams", "2", "--min-length", "9"], "min_length / min_new_tokens is not supported with beam search"),
    ],
)
def test_generate_rejects_bad_options_before_loading(tmp_path, capsys, extra, message):
    # The model path does not exist: the option error must come first, before any loading or compiling.
    args = ["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hi", *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_generate_empty_prompt_and_too_long(text_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(text_dir), "--prompt", ""]) == 2
    assert "empty prompt" in capsys.readouterr().err
    (tmp_path / "long.txt").write_text("word " * 300)
    assert main(["generate", "--model", str(text_dir), "--prompt-file", str(tmp_path / "long.txt")]) == 2
    assert "exceeds max_position_embeddings" in capsys.readouterr().err


def test_weight_formats_on_generate_and_eval(text_dir, tmp_path, capsys):
    """--weights loads the format asked for: the CLI's greedy text and perplexity are those of the Python API
    on the same format (and int8's differ from float32's); an unknown format is refused by the parser."""
    import neo_jax
    from neo_jax.evaluate import corpus_tokens, perplexity
    from neo_jax.hf import load_tokenizer

    prompt = ["--prompt", "EleutherAI has", "--max-new-tokens", "8", "--json"]
    (tmp_path / "text.txt").write_text("We hold these truths to be self-evident, that all men are created equal. " * 4)
    measured = {}
    for weights in ("float32", "int8"):
        assert main(["generate", "--model", str(text_dir), "--weights", weights, *prompt]) == 0
        completion = json.loads(capsys.readouterr().out)["completion"]
        assert completion == neo_jax.TextGenerator(text_dir, weights=weights)("EleutherAI has", max_new_tokens=8)[0]
        args = ["eval", "perplexity", "--model", str(text_dir), "--data", str(tmp_path / "text.txt")]
        assert main([*args, "--seq-len", "32", "--stride", "16", "--weights", weights]) == 0
        measured[weights] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
        model = neo_jax.from_pretrained(text_dir, weights=weights, progress=False)
        tokens = corpus_tokens([str(tmp_path / "text.txt")], load_tokenizer(text_dir))
        assert measured[weights] == pytest.approx(perplexity(model, tokens, seq_len=32, stride=16)["perplexity"])
    assert measured["int8"] != measured["float32"]
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(text_dir), "--prompt", "hi", "--weights", "int4"])
    assert "invalid choice" in capsys.readouterr().err


def test_every_command_function_is_short():
    """The command line reads like a table of contents: one module per command family, no function in it
    longer than 60 lines."""
    import ast

    package = Path(neo_jax_cli.__file__).parent
    long = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert len(list(package.glob("*.py"))) >= 7 and not long, long
