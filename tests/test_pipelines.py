"""neo_jax.pipeline against transformers' pipelines on the same random-weight checkpoints (GPT-2's tokenizer):
the same text for greedy generation, scores within 1e-5. transformers 5 has no question-answering pipeline, so
that one is checked against an exhaustive span search over transformers' own QA logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

import neo_jax
from tests.conftest import TOKENIZER_DIR, backend_compiles
from tests.test_tasks import make_task_model

TEXT = "My name is Wolfgang and I live in Berlin"
GPT2_VOCAB = dict(vocab_size=50257, eos_token_id=50256, bos_token_id=50256)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, gpt2_model_dir):
    """task -> a directory with GPT-2's tokenizer: the shared causal LM, and random classifiers and a QA model."""
    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(TOKENIZER_DIR)
    out = {"causal-lm": gpt2_model_dir}
    labels = {
        "sequence-classification": ["negative", "neutral", "positive"],
        "token-classification": ["O", "B-PER", "I-PER"],
    }
    for task in ("sequence-classification", "token-classification", "question-answering"):
        model = make_task_model(task, num_labels=3, pad_token_id=None, **GPT2_VOCAB)
        if task in labels:
            model.config.id2label = dict(enumerate(labels[task]))
            model.config.label2id = {label: i for i, label in enumerate(labels[task])}
        directory = tmp_path_factory.mktemp(task)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        out[task] = directory
    return out


def same_entities(ours, theirs):
    assert len(ours) == len(theirs)
    for mine, expected in zip(ours, theirs, strict=True):
        assert mine.keys() == expected.keys()
        for key, value in expected.items():
            assert abs(mine[key] - value) <= 1e-5 if key == "score" else mine[key] == value, (key, mine, expected)


def test_greedy_text_generation_equals_transformers(checkpoints):
    ours = neo_jax.pipeline("text-generation", model=checkpoints["causal-lm"])
    theirs = transformers.pipeline("text-generation", model=str(checkpoints["causal-lm"]))
    cases = [
        dict(max_new_tokens=12),
        dict(max_length=9, return_full_text=False),
        dict(min_length=10, max_new_tokens=5),
        dict(min_new_tokens=3, max_new_tokens=6, repetition_penalty=1.3),
        dict(max_new_tokens=8, bad_words_ids=[[31], [262, 1110]]),
    ]
    for kwargs in cases:
        for prompts in ("EleutherAI has", ["EleutherAI has", "The quick brown"]):
            assert ours(prompts, do_sample=False, **kwargs) == theirs(prompts, do_sample=False, **kwargs), kwargs


def test_the_model_cards_example_and_the_pipelines_defaults(checkpoints, tmp_path):
    """The model card's call, verbatim: a list of one dict, a new sample each call unless seeded; the defaults
    are transformers' pipeline's (what transformers' pipeline adds to a call that sets nothing)."""
    generator = neo_jax.pipeline("text-generation", model=checkpoints["causal-lm"])
    first = generator("EleutherAI has", do_sample=True, min_length=20, max_new_tokens=20)
    assert isinstance(first, list) and len(first) == 1 and set(first[0]) == {"generated_text"}
    assert first[0]["generated_text"].startswith("EleutherAI has")
    assert generator("EleutherAI has", do_sample=True, min_length=20, max_new_tokens=20) != first
    seeded = [generator("EleutherAI has", do_sample=True, max_new_tokens=8, seed=5) for _ in range(2)]
    assert seeded[0] == seeded[1]
    many = generator(["EleutherAI has", "Hello"], do_sample=True, num_return_sequences=3, max_new_tokens=6)
    assert [len(row) for row in many] == [3, 3] and len({d["generated_text"] for d in many[0]}) > 1
    theirs = transformers.pipeline("text-generation", model=str(checkpoints["causal-lm"]))
    added = theirs._prepare_generate_kwargs({})
    settings = generator.settings({})
    assert {k: settings[k] for k in ("max_new_tokens", "do_sample", "temperature")} == {
        k: added[k] for k in ("max_new_tokens", "do_sample", "temperature")
    }
    assert settings["top_k"] == 50 and "max_new_tokens" not in generator.settings({"max_length": 30})
    # a checkpoint's own generation config comes before the pipeline's defaults, in both
    directory = tmp_path / "configured"
    directory.mkdir()
    for item in checkpoints["causal-lm"].iterdir():
        (directory / item.name).write_bytes(item.read_bytes())
    config = json.loads((directory / "generation_config.json").read_text())
    (directory / "generation_config.json").write_text(json.dumps({**config, "do_sample": False, "max_new_tokens": 7}))
    ours = neo_jax.pipeline("text-generation", model=directory)("EleutherAI has")
    assert ours == transformers.pipeline("text-generation", model=str(directory))("EleutherAI has")


def test_feature_extraction_equals_transformers(checkpoints):
    ours = neo_jax.pipeline("feature-extraction", model=checkpoints["causal-lm"])
    theirs = transformers.pipeline("feature-extraction", model=str(checkpoints["causal-lm"]))
    for text in (TEXT, "hi"):
        mine, expected = np.array(ours(text)), np.array(theirs(text))
        assert mine.shape == expected.shape and np.abs(mine - expected).max() <= 1e-5
    assert len(ours([TEXT, "hi"])) == 2 and ours(TEXT, return_tensors=True).shape == expected.shape[:1] + (9, 64)


def test_text_classification_equals_transformers(checkpoints):
    ours = neo_jax.pipeline("text-classification", model=checkpoints["sequence-classification"])
    theirs = transformers.pipeline("text-classification", model=str(checkpoints["sequence-classification"]))
    cases = [dict(), dict(top_k=None), dict(top_k=2, function_to_apply="sigmoid"), dict(function_to_apply="none")]
    for kwargs in cases:
        for inputs in (TEXT, [TEXT, "hi there", "a"]):
            mine, expected = ours(inputs, **kwargs), theirs(inputs, **kwargs)
            flat = lambda x: [d for item in x for d in (item if isinstance(item, list) else [item])]
            same_entities(flat(mine), flat(expected))
            assert type(mine) is type(expected) and [type(x) for x in mine] == [type(x) for x in expected]


@pytest.mark.parametrize("strategy", ["none", "simple"])
def test_token_classification_equals_transformers(checkpoints, strategy):
    ours = neo_jax.pipeline("token-classification", model=checkpoints["token-classification"])
    theirs = transformers.pipeline("token-classification", model=str(checkpoints["token-classification"]))
    for text in (TEXT, "Angela Merkel met Emmanuel Macron in Paris."):
        for ignore in (None, []):
            expected = theirs(text, aggregation_strategy=strategy, ignore_labels=ignore)
            same_entities(ours(text, aggregation_strategy=strategy, ignore_labels=ignore), expected)


def exhaustive_answers(model, tokenizer, question, context, max_answer_len=15):
    """Every (score, start char, end char) span of transformers' QA logits, by brute force: question first, the
    context's tokens only, softmax over them, score = p(start) * p(end)."""
    encoded = tokenizer(question, context, return_offsets_mapping=True)
    with torch.no_grad():
        out = model(torch.tensor([encoded["input_ids"]]))
    context_tokens = [i for i, s in enumerate(encoded.sequence_ids()) if s == 1]
    probs = lambda x: torch.softmax(x[0, context_tokens], -1).numpy()
    start, end = probs(out.start_logits), probs(out.end_logits)
    spans = []
    for a, s in enumerate(context_tokens):
        for b, e in enumerate(context_tokens):
            if s <= e < s + max_answer_len:
                first = encoded.word_to_chars(encoded.token_to_word(s), sequence_index=1)[0]
                last = encoded.word_to_chars(encoded.token_to_word(e), sequence_index=1)[1]
                spans.append((float(start[a] * end[b]), first, last))
    return sorted(spans, reverse=True)


def test_question_answering_finds_the_best_spans(checkpoints):
    directory = checkpoints["question-answering"]
    qa = neo_jax.pipeline("question-answering", model=directory)
    reference = transformers.GPTNeoForQuestionAnswering.from_pretrained(directory).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    question, context = "Where does Wolfgang live?", "My name is Wolfgang and I live in Berlin, close to the river."
    expected = exhaustive_answers(reference, tokenizer, question, context)
    best = qa(question=question, context=context)
    assert set(best) == {"score", "start", "end", "answer"}
    assert abs(best["score"] - expected[0][0]) <= 1e-5 and (best["start"], best["end"]) == expected[0][1:]
    assert best["answer"] == context[best["start"] : best["end"]]
    top = qa({"question": question, "context": context}, top_k=3)
    assert [(a["start"], a["end"]) for a in top] == [s[1:] for s in expected[:3]]
    assert max(abs(a["score"] - s[0]) for a, s in zip(top, expected, strict=False)) <= 1e-5
    with_null = qa(question=question, context=context, handle_impossible_answer=True, top_k=1000)  # every span
    assert {"score", "start", "end", "answer"} == set(with_null[0]) and any(a["answer"] == "" for a in with_null)
    long = " ".join(["The river flows past the old town."] * 60) + " Wolfgang lives in Berlin."
    answers = qa(question=question, context=long, top_k=2, max_seq_len=64, doc_stride=16)
    assert len(answers) == 2 and all(a["answer"] == long[a["start"] : a["end"]] for a in answers)


def test_nearby_lengths_share_a_program(checkpoints):
    classify = neo_jax.pipeline("token-classification", model=checkpoints["token-classification"])
    classify("a b c d e")
    with backend_compiles() as compiles:
        classify(["a b c", "a b c d e f g", "one two"])
    assert compiles == []


@pytest.mark.parametrize(
    ("task", "call", "message"),
    [
        ("summarization", None, "unknown pipeline task 'summarization'"),
        ("text-generation", dict(inputs="hi", max_new_tokens=3, num_beams=2), "unknown text-generation argument"),
        ("text-generation", dict(inputs="hi", num_return_sequences=2, do_sample=False), "Greedy methods"),
        ("text-generation", dict(inputs="", max_new_tokens=3), "non-empty prompts"),
        ("text-generation", dict(inputs="hi", max_new_tokens=3, min_new_tokens=-1), "min_new_tokens must be >= 0"),
        ("text-classification", dict(inputs="hi", function_to_apply="tanh"), "function_to_apply must be one of"),
        ("text-classification", dict(inputs="hi", top_k=0), "top_k must be >= 1"),
        ("token-classification", dict(inputs="hi", aggregation_strategy="first"), "aggregation_strategy must be"),
        ("token-classification", dict(inputs=""), "takes non-empty strings"),
        ("question-answering", dict(question="who?"), "takes question= and context="),
        ("question-answering", dict(inputs={"question": "who?", "context": ""}), "both non-empty"),
    ],
)
def test_bad_pipeline_input_is_a_one_line_error(checkpoints, task, call, message):
    model_task = neo_jax.pipelines.MODEL_TASKS.get(task, "causal-lm")
    directory = checkpoints.get(model_task, checkpoints["causal-lm"])
    with pytest.raises(ValueError, match=message) as error:
        neo_jax.pipeline(task, model=directory)(**call)
    assert "\n" not in str(error.value)


def test_a_loaded_model_of_another_task_is_refused(checkpoints):
    model = neo_jax.from_pretrained(checkpoints["causal-lm"], progress=False)
    with pytest.raises(ValueError, match="a text-classification pipeline needs a sequence-classification model"):
        neo_jax.pipeline("text-classification", model=model)
    tokenizer = checkpoints["causal-lm"]
    assert neo_jax.pipeline("text-generation", model=model, tokenizer=tokenizer)("hi", max_new_tokens=2)
