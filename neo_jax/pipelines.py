"""``pipeline(task, model=...)``: transformers' pipelines, with their call signatures and output formats, over
neo_jax models.

- "text-generation": ``[{"generated_text": ...}]`` per prompt, with transformers' pipeline defaults (256 new
  tokens, sampling at temperature 0.7, generation's top-k of 50) under the checkpoint's own
  ``generation_config.json``; a different sample each call unless a ``seed`` is given.
- "feature-extraction": the last hidden state as nested lists ``[1, tokens, hidden]`` per text.
- "text-classification": ``[{"label", "score"}]``, with ``top_k`` and ``function_to_apply``.
- "token-classification": the entities of each text, ``aggregation_strategy`` "none" or "simple".
- "question-answering": ``{"score", "start", "end", "answer"}`` from a question and a context, with
  transformers 4's span search (``top_k``, ``max_answer_len``, ``doc_stride``, ``handle_impossible_answer``).

Each text runs alone, as transformers' pipelines run by default; its length is padded on the right to a bucket
(``neo_jax.shapes.bucket``), so texts of nearby lengths share one compiled program, and padding changes no
output of a real token.
"""

from __future__ import annotations

import os
from types import MappingProxyType

import jax.numpy as jnp
import numpy as np
from flax import nnx

from neo_jax import validate
from neo_jax.config import TASKS
from neo_jax.convert import from_pretrained, source_of
from neo_jax.generation import generate
from neo_jax.hf import load_tokenizer
from neo_jax.model import GPTNeo
from neo_jax.shapes import bucket

MODEL_TASKS = {  # pipeline task -> the model task (neo_jax.config.TASKS) it runs on
    "text-generation": "causal-lm",
    "feature-extraction": "feature-extraction",
    "text-classification": "sequence-classification",
    "token-classification": "token-classification",
    "question-answering": "question-answering",
}


def pipeline(task: str, model=None, tokenizer=None, **kwargs) -> Pipeline:
    """A pipeline for ``task`` (``MODEL_TASKS``) over ``model``: a loaded ``GPTNeo`` of the task's kind, or
    anything ``from_pretrained`` reads (loaded with the task's head; keywords of ``from_pretrained`` such as
    ``dtype``, ``weights``, ``mesh`` or ``adapter`` go to it). ``tokenizer``: a tokenizer or its directory;
    by default the model's own. Other keywords are the pipeline's call defaults, as in transformers."""
    if task not in MODEL_TASKS:
        raise ValueError(f"unknown pipeline task {task!r}; choose one of {', '.join(MODEL_TASKS)}")
    if model is None:
        raise ValueError(f"pipeline({task!r}) needs model=: a model directory, hub id or loaded neo_jax model")
    loading = {name: kwargs.pop(name) for name in LOADING if name in kwargs}
    if isinstance(model, GPTNeo):
        if loading:
            raise ValueError(f"{', '.join(loading)} apply when the pipeline loads the model; this one is loaded")
        if model.config.task != MODEL_TASKS[task]:
            raise ValueError(
                f"a {task} pipeline needs a {MODEL_TASKS[task]} model, got a {model.config.task} one: load it with "
                f"neo_jax.from_pretrained(src, task={MODEL_TASKS[task]!r})"
            )
    else:
        model = from_pretrained(model, task=MODEL_TASKS[task], progress=False, **loading)
    if tokenizer is None or isinstance(tokenizer, str | os.PathLike):
        directory = tokenizer or source_of(model)
        if directory is None:
            raise ValueError("this model was not loaded from a directory: pass tokenizer=...")
        tokenizer = load_tokenizer(directory)
    return PIPELINES[task](model, tokenizer, **kwargs)


LOADING = ("dtype", "param_dtype", "weights", "mesh", "rules", "attention", "adapter", "revision", "num_labels")


@nnx.jit
def _forward(model, input_ids, attention_mask):
    return model(input_ids, attention_mask)


class Pipeline:
    """Inputs in, transformers' output format out: ``__call__`` takes one input or a list of them."""

    def __init__(self, model: GPTNeo, tokenizer, **defaults):
        self.model, self.tokenizer, self.defaults = model, tokenizer, defaults

    def __call__(self, inputs, **kwargs):
        kwargs = {**self.defaults, **kwargs}
        if isinstance(inputs, list | tuple):
            return [self.one(item, **kwargs) for item in inputs]
        return self.one(inputs, **kwargs)

    def one(self, item, **kwargs):
        raise NotImplementedError

    def max_tokens(self) -> int:
        limit = self.tokenizer.model_max_length
        positions = self.model.config.max_position_embeddings
        return positions if not limit or limit > positions else limit

    def run(self, ids: list[int], pad: int | None = None):
        """The model's output for one text's tokens, run padded on the right to a bucket with ``pad`` (the real
        tokens' outputs do not depend on it); ``pad`` None runs the exact length."""
        if not ids:
            raise ValueError("the text encodes to no tokens: give some text")
        width = len(ids) if pad is None else min(bucket(len(ids)), self.model.config.max_position_embeddings)
        input_ids = np.full((1, width), 0 if pad is None else pad, np.int32)
        mask = np.zeros((1, width), np.int32)
        input_ids[0, : len(ids)], mask[0, : len(ids)] = ids, 1
        return _forward(self.model, jnp.asarray(input_ids), jnp.asarray(mask))

    def encode(self, text, **kwargs):
        if not isinstance(text, str) or not text:
            raise ValueError(f"{type(self).__name__} takes non-empty strings, got {text!r}")
        return self.tokenizer(text, truncation=True, max_length=self.max_tokens(), **kwargs)


class TextGenerationPipeline(Pipeline):
    """transformers' text-generation pipeline: ``generator("EleutherAI has", do_sample=True, min_length=20)``."""

    # transformers' generation defaults (its GenerationConfig's global ones), under the pipeline's own
    GLOBAL = MappingProxyType(
        {"max_length": 20, "min_length": 0, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
        | {"repetition_penalty": 1.0, "num_return_sequences": 1}
    )
    DEFAULTS = MappingProxyType({"max_new_tokens": 256, "do_sample": True, "temperature": 0.7})
    GENERATION = ("max_new_tokens", "max_length", "min_length", "min_new_tokens", "do_sample", "temperature")
    GENERATION += ("top_k", "top_p", "repetition_penalty", "bad_words_ids", "num_return_sequences")

    def __init__(self, model: GPTNeo, tokenizer, **defaults):
        from transformers import GenerationConfig

        super().__init__(model, tokenizer, **defaults)
        directory = source_of(model)
        config = GenerationConfig()
        if directory is not None and (directory / "generation_config.json").exists():
            config = GenerationConfig.from_pretrained(directory)
        self.checkpoint = {name: getattr(config, name) for name in self.GENERATION if getattr(config, name) is not None}
        self.eos_token_id = model.config.eos_token_id if config.eos_token_id is None else config.eos_token_id
        if isinstance(self.eos_token_id, list):
            self.eos_token_id = self.eos_token_id[0]

    def one(self, text, *, return_full_text: bool = True, seed: int | None = None, **kwargs):
        unknown = sorted(set(kwargs) - set(self.GENERATION) - {"logit_bias", "eos_token_id", "pad_token_id"})
        if unknown:
            raise ValueError(f"unknown text-generation argument(s) {', '.join(unknown)}")
        settings = self.settings(kwargs)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if isinstance(text, str) and text else None
        if not ids:
            raise ValueError(f"text-generation takes non-empty prompts, got {text!r}")
        count = validate.integer("num_return_sequences", settings.pop("num_return_sequences"), least=1)
        if count > 1 and not settings.get("do_sample"):
            raise ValueError(
                f"Greedy methods without beam search do not support `num_return_sequences` different than 1 (got {count})."
            )
        max_length = settings.pop("max_length", None)
        new = settings.pop("max_new_tokens", None)
        if new is None:
            new = validate.integer("max_length", max_length, least=1) - len(ids)
        if not settings.get("do_sample"):
            for name in ("temperature", "top_k", "top_p"):
                settings.pop(name, None)
        seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else settings["eos_token_id"]
        settings.setdefault("pad_token_id", pad)
        out = generate(self.model, np.array([ids] * count), max_new_tokens=max(new, 0), seed=seed, **settings)
        texts = [self.tokenizer.decode(row[len(ids) :], skip_special_tokens=True) for row in out]
        return [{"generated_text": text + new_text if return_full_text else new_text} for new_text in texts]

    def settings(self, kwargs: dict) -> dict:
        """transformers' pipeline order: the call's settings, over the checkpoint's, over the pipeline's defaults
        (``max_new_tokens`` not when a ``max_length`` is set; the sampling ones only when sampling), over
        generation's global defaults."""
        explicit = set(self.checkpoint) | set(kwargs)
        defaults = {k: v for k, v in self.DEFAULTS.items() if k not in explicit}
        if "max_length" in explicit:
            defaults.pop("max_new_tokens", None)
        return {**self.GLOBAL, "eos_token_id": self.eos_token_id, **self.checkpoint, **defaults, **kwargs}


class FeatureExtractionPipeline(Pipeline):
    """transformers' feature-extraction pipeline: ``[1, tokens, hidden]`` nested lists per text (a NumPy array
    with ``return_tensors=True``)."""

    def one(self, text, *, return_tensors: bool = False, tokenize_kwargs: dict | None = None):
        ids = self.encode(text, **(tokenize_kwargs or {}))["input_ids"]
        hidden = np.asarray(self.run(ids, pad=0))[:, : len(ids)]
        return hidden if return_tensors else hidden.tolist()


class TextClassificationPipeline(Pipeline):
    """transformers' text-classification pipeline: ``[{"label", "score"}]`` for a text (all labels, by score,
    with ``top_k=None``), with the score function of transformers' defaults or ``function_to_apply``."""

    FUNCTIONS = ("softmax", "sigmoid", "none")

    def __call__(self, inputs, **kwargs):
        result = super().__call__(inputs, **kwargs)
        legacy = "top_k" not in {**self.defaults, **kwargs}
        return [result] if isinstance(inputs, str) and legacy else result

    def one(self, text, *, top_k: int | None | str = "", function_to_apply: str | None = None):
        config = self.model.config
        ids = self.encode(text)["input_ids"]
        logits = np.asarray(self.run(ids, pad=config.pad_token_id), np.float32)[0]
        if function_to_apply is None:
            if config.problem_type == "regression":
                function_to_apply = "none"
            elif config.problem_type == "multi_label_classification" or config.num_labels == 1:
                function_to_apply = "sigmoid"
            else:
                function_to_apply = "softmax"
        function_to_apply = str(function_to_apply).lower()
        if function_to_apply not in self.FUNCTIONS:
            raise ValueError(f"function_to_apply must be one of {', '.join(self.FUNCTIONS)}, got {function_to_apply!r}")
        scores = {"softmax": _softmax, "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)), "none": lambda x: x}
        scores = scores[function_to_apply](logits)
        if top_k == "":  # transformers' legacy form: the best label alone
            return {"label": config.labels[int(scores.argmax())], "score": float(scores.max())}
        ranked = sorted(
            ({"label": label, "score": float(s)} for label, s in zip(config.labels, scores, strict=True)),
            key=lambda x: x["score"],
            reverse=True,
        )
        return ranked if top_k is None else ranked[: validate.integer("top_k", top_k, least=1)]


class TokenClassificationPipeline(Pipeline):
    """transformers' token-classification pipeline with ``aggregation_strategy`` "none" (one entity per token:
    ``entity``, ``score``, ``index``, ``word``, ``start``, ``end``) or "simple" (adjacent tokens of one entity
    grouped, B-/I- tags as transformers reads them), leaving out ``ignore_labels`` (default ``["O"]``)."""

    STRATEGIES = ("none", "simple")

    def one(self, text, *, aggregation_strategy: str = "none", ignore_labels=None):
        strategy = str(aggregation_strategy).lower()
        if strategy not in self.STRATEGIES:
            raise ValueError(f"aggregation_strategy must be one of {', '.join(self.STRATEGIES)}, got {strategy!r}")
        encoded = self.encode(text, return_offsets_mapping=True, return_special_tokens_mask=True)
        ids = encoded["input_ids"]
        logits = np.asarray(self.run(ids, pad=0), np.float32)[0, : len(ids)]
        scores = _softmax(logits)
        labels = self.model.config.labels
        entities = []
        for index, (token, (start, end)) in enumerate(zip(ids, encoded["offset_mapping"], strict=True)):
            if encoded["special_tokens_mask"][index]:
                continue
            word = self.tokenizer.convert_ids_to_tokens(int(token))
            if int(token) == self.tokenizer.unk_token_id:
                word = text[start:end]
            best = int(scores[index].argmax())
            entity = {"entity": labels[best], "score": float(scores[index, best]), "index": index, "word": word}
            entities.append(entity | {"start": int(start), "end": int(end)})
        if strategy == "simple":
            entities = self.group(entities)
        ignore = ["O"] if ignore_labels is None else ignore_labels
        return [e for e in entities if e.get("entity", e.get("entity_group")) not in ignore]

    def group(self, entities: list[dict]) -> list[dict]:
        """Adjacent tokens of one entity type as one group (a B- tag starts a new one), as transformers groups."""

        def tag(name: str) -> tuple[str, str]:
            return (name[0], name[2:]) if name.startswith(("B-", "I-")) else ("I", name)

        groups: list[list[dict]] = []
        for entity in entities:
            bi, kind = tag(entity["entity"])
            if groups and kind == tag(groups[-1][-1]["entity"])[1] and bi != "B":
                groups[-1].append(entity)
            else:
                groups.append([entity])
        return [
            {
                "entity_group": group[0]["entity"].split("-", 1)[-1],
                "score": float(np.mean([e["score"] for e in group])),
                "word": self.tokenizer.convert_tokens_to_string([e["word"] for e in group]),
                "start": group[0]["start"],
                "end": group[-1]["end"],
            }
            for group in groups
        ]


class QuestionAnsweringPipeline(Pipeline):
    """transformers 4's question-answering pipeline (transformers 5 dropped it): ``qa(question=..., context=...)``
    or ``qa({"question": ..., "context": ...})`` gives ``{"score", "start", "end", "answer"}`` (a list of the
    ``top_k`` best when ``top_k`` > 1). A context too long for ``max_seq_len`` tokens is read in overlapping
    spans ``doc_stride`` tokens apart; an answer is at most ``max_answer_len`` tokens, within the context."""

    def __call__(self, inputs=None, question=None, context=None, **kwargs):
        if inputs is None:
            if question is None or context is None:
                raise ValueError(
                    "question-answering takes question= and context=, or {'question': ..., 'context': ...}"
                )
            inputs = (
                [{"question": q, "context": context} for q in question]
                if isinstance(question, list)
                else {"question": question, "context": context}
            )
        return super().__call__(inputs, **kwargs)

    def one(
        self,
        item,
        *,
        top_k: int = 1,
        max_answer_len: int = 15,
        max_seq_len: int | None = None,
        doc_stride: int | None = None,
        handle_impossible_answer: bool = False,
    ):
        if not isinstance(item, dict) or not all(
            isinstance(item.get(k), str) and item[k] for k in ("question", "context")
        ):
            raise ValueError(
                f"question-answering takes {{'question': str, 'context': str}}, both non-empty; got {item!r}"
            )
        top_k = validate.integer("top_k", top_k, least=1)
        max_answer_len = validate.integer("max_answer_len", max_answer_len, least=1)
        max_seq_len = max_seq_len or min(self.max_tokens(), 384)
        doc_stride = min(max_seq_len // 2, 128) if doc_stride is None else doc_stride
        question_first = self.tokenizer.padding_side == "right"
        first, second = (item["question"], item["context"]) if question_first else (item["context"], item["question"])
        encoded = self.tokenizer(
            text=first,
            text_pair=second,
            truncation="only_second" if question_first else "only_first",
            max_length=max_seq_len,
            stride=doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
        context_sequence = 1 if question_first else 0
        answers, null_score = [], 1_000_000.0
        for span in range(len(encoded["input_ids"])):
            ids = encoded["input_ids"][span]
            start, end = (np.asarray(x, np.float32)[0, : len(ids)] for x in self.run(ids, pad=0))
            in_context = np.array([s == context_sequence for s in encoded.sequence_ids(span)])
            start, end = (_softmax(np.where(in_context, x, -10000.0)[None])[0] for x in (start, end))
            if handle_impossible_answer:
                null_score = min(null_score, float(start[0] * end[0]))
            start[0] = end[0] = 0.0  # transformers masks the first (CLS) position
            enc = encoded[span]
            for s, e, score in _best_spans(start, end, top_k, max_answer_len, in_context):
                try:
                    first_char = enc.word_to_chars(enc.token_to_word(s), sequence_index=context_sequence)[0]
                    last_char = enc.word_to_chars(enc.token_to_word(e), sequence_index=context_sequence)[1]
                except (TypeError, ValueError):  # no words (token_to_word gives None): offsets, as transformers does
                    first_char, last_char = enc.offsets[s][0], enc.offsets[e][1]
                answers.append(
                    {
                        "score": score,
                        "start": first_char,
                        "end": last_char,
                        "answer": item["context"][first_char:last_char],
                    }
                )
        if handle_impossible_answer:
            answers.append({"score": null_score, "start": 0, "end": 0, "answer": ""})
        answers = sorted(answers, key=lambda x: x["score"], reverse=True)[:top_k]
        return answers[0] if len(answers) == 1 else answers


def _best_spans(start, end, top_k: int, max_answer_len: int, allowed):
    """The ``top_k`` most likely (start, end, score) token spans of at most ``max_answer_len`` tokens, start <=
    end, both in ``allowed`` positions: transformers' ``decode_spans``."""
    candidates = np.tril(np.triu(np.outer(start, end)), max_answer_len - 1)
    flat = candidates.flatten()
    if top_k == 1:
        order = np.array([np.argmax(flat)])
    elif len(flat) < top_k:
        order = np.argsort(-flat)
    else:
        order = np.argpartition(-flat, top_k)[:top_k]
        order = order[np.argsort(-flat[order])]
    starts, ends = np.unravel_index(order, candidates.shape)
    keep = allowed[starts] & allowed[ends]
    return [(int(s), int(e), float(candidates[s, e])) for s, e in zip(starts[keep], ends[keep], strict=True)]


def _softmax(x):
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


PIPELINES = {
    "text-generation": TextGenerationPipeline,
    "feature-extraction": FeatureExtractionPipeline,
    "text-classification": TextClassificationPipeline,
    "token-classification": TokenClassificationPipeline,
    "question-answering": QuestionAnsweringPipeline,
}
assert set(PIPELINES) == set(MODEL_TASKS) and set(MODEL_TASKS.values()) == set(TASKS)
