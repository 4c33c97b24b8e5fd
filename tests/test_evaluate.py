"""Evaluation against the references: perplexity against the same strided computation in transformers, and
the lm-eval adapter against lm-eval's own ``hf`` backend on tasks written here over local JSONL files."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
import transformers

import neo_jax
from neo_jax import cli
from neo_jax.evaluate import corpus_tokens, perplexity, score
from tests.conftest import SMALL, make_hf_model, random_ids

WORDS = [
    "the",
    "cat",
    "dog",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "ran",
    "fast",
    "or",
    "slow",
    "by",
    "big",
    "small",
    "red",
    "blue",
    "house",
    "tree",
    "river",
    "stone",
]


def torch_perplexity(hf, tokens: list[int], seq_len: int, stride: int) -> tuple[float, int]:
    """transformers' perplexity guide, with each window's loss weighted by the tokens it really scores."""
    ids = torch.as_tensor([tokens])
    total, count, previous_end = 0.0, 0, 0
    for begin in range(0, len(tokens), stride):
        end = min(begin + seq_len, len(tokens))
        window = ids[:, begin:end]
        labels = window.clone()
        labels[:, : -(end - previous_end)] = -100
        with torch.no_grad():
            loss = hf(window, labels=labels).loss.item()
        scored = int((labels[:, 1:] != -100).sum())
        total, count, previous_end = total + loss * scored, count + scored, end
        if end == len(tokens):
            break
    return total / count, count


@pytest.mark.parametrize(("seq_len", "stride", "n"), [(64, 24, 301), (64, 64, 200), (128, 50, 129), (256, 256, 90)])
def test_perplexity_equals_transformers(save_hf, seq_len, stride, n):
    hf = make_hf_model()
    model = neo_jax.from_pretrained(save_hf(hf), progress=False)
    tokens = random_ids(1, n, SMALL["vocab_size"])[0].tolist()
    ours = perplexity(model, tokens, seq_len=seq_len, stride=stride, batch_size=3)
    nll, count = torch_perplexity(hf, tokens, seq_len, stride)
    assert ours["tokens"] == count
    # every token but the first, once; disjoint windows (stride == seq_len) cannot score their first tokens
    assert count == n - 1 if stride < seq_len else count == n - math.ceil(n / seq_len)
    assert math.isclose(ours["nll"], nll, rel_tol=1e-4)
    assert math.isclose(ours["perplexity"], math.exp(nll), rel_tol=1e-4)


def test_score_is_log_softmax_of_the_logits(save_hf):
    hf = make_hf_model()
    model = neo_jax.from_pretrained(save_hf(hf), progress=False)
    sequences = [random_ids(1, n, SMALL["vocab_size"], seed=n)[0].tolist() for n in (2, 9, 70, 31)]
    for sequence, (logprobs, greedy) in zip(sequences, score(model, sequences, batch_size=2), strict=True):
        with torch.no_grad():
            logits = hf(torch.as_tensor([sequence[:-1]])).logits[0].double()
        expected = torch.log_softmax(logits, -1)[torch.arange(len(sequence) - 1), torch.as_tensor(sequence[1:])]
        np.testing.assert_allclose(logprobs, expected.numpy(), atol=1e-5)
        np.testing.assert_array_equal(greedy, (logits.argmax(-1) == torch.as_tensor(sequence[1:])).numpy())
    with pytest.raises(ValueError, match="needs 2 to 257 tokens, got 1"):
        score(model, [[1]])


def test_perplexity_bad_settings(save_hf):
    model = neo_jax.from_pretrained(save_hf(make_hf_model()), progress=False)
    with pytest.raises(ValueError, match=r"seq_len must be in \[2, 256\]"):
        perplexity(model, [1, 2, 3], seq_len=512)
    with pytest.raises(ValueError, match="stride must be in"):
        perplexity(model, [1, 2, 3], seq_len=64, stride=65)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, [1])


def test_cli_perplexity_reads_documents_joined_with_eos(gpt2_model_dir, tmp_path, capsys):
    texts = ["The first document is short.", "A second one, " * 40, "And a third."]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    args = ["eval", "perplexity", "--model", str(gpt2_model_dir), "--data", str(tmp_path / "docs.jsonl")]
    assert cli.main([*args, "--seq-len", "64", "--stride", "32"]) == 0
    printed = json.loads(capsys.readouterr().out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gpt2_model_dir)
    tokens = corpus_tokens([str(tmp_path / "docs.jsonl")], tokenizer)
    expected = [
        token for i, t in enumerate(texts) for token in [tokenizer.eos_token_id] * (i > 0) + tokenizer(t)["input_ids"]
    ]
    assert tokens == expected
    hf = transformers.GPTNeoForCausalLM.from_pretrained(gpt2_model_dir).eval()
    nll, count = torch_perplexity(hf, tokens, 64, 32)
    assert printed["tokens"] == count and math.isclose(printed["nll"], nll, rel_tol=1e-4)

    assert cli.main(["eval", "perplexity", "--model", str(gpt2_model_dir), "--data", str(tmp_path / "none.txt")]) == 2
    assert "no data file matches" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- lm-eval
@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Three tasks over local JSONL: multiple choice, rolling perplexity, generate_until."""
    directory = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    sentence = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
    rows = {
        "mc": [
            {"question": sentence(3, 30), "choices": [sentence(1, 4) for _ in range(4)], "label": i % 4}
            for i in range(10)
        ],
        "docs": [{"text": sentence(n, n)} for n in (1, 12, 200, 600)],
        "gen": [{"prompt": sentence(2, 25), "answer": rng.choice(WORDS)} for _ in range(6)],
    }
    for name, records in rows.items():
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    specs = {
        "toy_mc": (
            "mc",
            (
                'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
                'doc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n'
                "  - metric: acc_norm\n"
            ),
        ),
        "toy_rolling": (
            "docs",
            (
                'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                "  - metric: bits_per_byte\n"
            ),
        ),
        "toy_gen": (
            "gen",
            (
                'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
                'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 12\n  do_sample: false\n'
                "metric_list:\n  - metric: exact_match\n"
            ),
        ),
    }
    for task, (data, body) in specs.items():
        (directory / f"{task}.yaml").write_text(
            f"task: {task}\n" + common.format(path=directory / f"{data}.jsonl") + body
        )
    return directory


def evaluate(model: str, directory, tasks_dir, batch_size: int) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import neo_jax.lm_eval  # noqa: F401 (registers "neo-jax")

    return lm_eval.simple_evaluate(
        model=model,
        model_args={"pretrained": str(directory), "dtype": "float32"},
        tasks=["toy_mc", "toy_rolling", "toy_gen"],
        task_manager=TaskManager(include_path=str(tasks_dir)),
        batch_size=batch_size,
        device="cpu",
        log_samples=True,
    )


def test_lm_eval_adapter_equals_the_hf_backend(gpt2_model_dir, tasks):
    theirs = evaluate("hf", gpt2_model_dir, tasks, batch_size=4)
    ours = evaluate("neo-jax", gpt2_model_dir, tasks, batch_size=3)
    for task, metrics in theirs["results"].items():
        for key, value in metrics.items():
            if isinstance(value, float) and not key.endswith("stderr,none"):
                assert math.isclose(ours["results"][task][key], value, rel_tol=1e-4), (task, key)
    checked = 0
    for task, samples in theirs["samples"].items():
        for a, b in zip(samples, ours["samples"][task], strict=True):
            assert a["doc_id"] == b["doc_id"]
            for mine, reference in zip(b["resps"], a["resps"], strict=True):
                if task == "toy_gen":
                    assert mine == reference  # identical text, cut at the same stop string
                elif task == "toy_mc":
                    (ll, greedy), ((ll_ref, greedy_ref),) = mine[0], [reference[0]]
                    assert abs(ll - ll_ref) <= 1e-4 and greedy == greedy_ref
                else:  # a whole document's log-likelihood: up to 600 tokens over several windows
                    assert math.isclose(mine[0], reference[0], rel_tol=1e-6, abs_tol=1e-4)
                checked += 1
    assert checked == 10 * 4 + 4 + 6


def test_cli_harness_writes_the_results(gpt2_model_dir, tasks, tmp_path, capsys, monkeypatch):
    import functools

    import lm_eval.tasks

    # Task data that is empty, not JSON, or a multiple-choice row with an empty choice, beside toy_mc: the five
    # runs below share one include path, and so one TaskManager (lm-eval indexes its ~15,000 task files for
    # each, 12 s here).
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.cache(lm_eval.tasks.TaskManager))
    include = tmp_path / "tasks"
    include.mkdir()
    mc = (tasks / "toy_mc.yaml").read_text()
    (include / "toy_mc.yaml").write_text(mc)
    broken = {
        "empty": b"",
        "binary": bytes(range(256)) * 4,
        "no_choice": json.dumps({"question": "a b", "choices": ["x", "", "y"], "label": 0}).encode() + b"\n",
    }
    for name, data in broken.items():
        (tmp_path / f"{name}.jsonl").write_bytes(data)
        (include / f"t_{name}.yaml").write_text(
            mc.replace(str(tasks / "mc.jsonl"), "{path}")
            .replace("toy_mc", f"t_{name}")
            .format(path=tmp_path / f"{name}.jsonl")
        )
    out = tmp_path / "results.json"
    harness = ["eval", "harness", "--model", str(gpt2_model_dir), "--include-path", str(include), "--tasks"]
    assert cli.main([*harness, "toy_mc", "--limit", "4", "--num-fewshot", "1", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["results"]["toy_mc"]["sample_len"] == 4 and results["n-shot"]["toy_mc"] == 1
    assert json.loads(capsys.readouterr().out) == results
    assert cli.main([*harness, "no_such_task"]) == 2
    assert "unknown task(s) ['no_such_task']" in capsys.readouterr().err
    # The broken tasks: one line naming the task's files (lm-eval's own log lines may come before it), before
    # the model loads, never a traceback.
    for name in broken:
        assert cli.main([*harness, f"t_{name}"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
            f"neo-jax eval harness: error: task t_{name} ({include / f't_{name}'}.yaml, data {{'test': '{tmp_path / name}.jsonl'}})"
        ), err
