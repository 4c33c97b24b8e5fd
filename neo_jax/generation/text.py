"""``TextGenerator``: prompts in, continuations out, with the model's own Hugging Face tokenizer."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from neo_jax.generation.loop import generate, stream
from neo_jax.model import GPTNeo


class TextGenerator:
    """Prompts in, continuations out, with the model's own Hugging Face tokenizer.

    ``TextGenerator(model_or_src)`` takes a loaded ``GPTNeo`` or anything ``from_pretrained`` reads (with a PEFT
    ``adapter`` if given); the
    tokenizer comes from the same directory (``transformers.AutoTokenizer``) unless one is passed. Prompts
    are left-padded into one batch; generation stops at the model's EOS token.
    """

    def __init__(
        self,
        model_or_src,
        *,
        tokenizer=None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        attention: str = "auto",
        adapter=None,
        weights: str | None = None,
    ):
        if isinstance(model_or_src, GPTNeo):
            self.model = model_or_src
        else:
            from neo_jax.convert import from_pretrained

            self.model = from_pretrained(
                model_or_src,
                dtype=dtype,
                param_dtype=param_dtype,
                attention=attention,
                adapter=adapter,
                weights=weights,
            )
        if tokenizer is None:
            from neo_jax.convert import source_of
            from neo_jax.hf import load_tokenizer

            directory = source_of(self.model)
            if directory is None:
                raise ValueError("this model was not loaded from a directory: pass tokenizer=... explicitly")
            tokenizer = load_tokenizer(directory)
        self.tokenizer = tokenizer  # used as given: padding is done here, the tokenizer's settings stay the caller's
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = 0 if pad is None else pad

    def encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)``: the prompts' tokens, left-padded into one batch."""
        if not prompts or any(not p for p in prompts):
            raise ValueError("empty prompt: give at least one non-empty prompt")
        rows = self.tokenizer(prompts)["input_ids"]
        if any(not row for row in rows):
            raise ValueError("a prompt encodes to no tokens")
        width = max(len(row) for row in rows)
        input_ids = np.full((len(rows), width), self.pad_token_id, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
        return input_ids, mask

    def _ids(self, **sampling):
        return {"eos_token_id": self.model.config.eos_token_id, "pad_token_id": self.pad_token_id, **sampling}

    def decode(self, tokens: Sequence[int] | np.ndarray, stop: list[str] | None = None) -> str:
        eos = self.model.config.eos_token_id
        ids = [int(t) for t in tokens]
        if eos is not None and eos in ids:
            ids = ids[: ids.index(eos)]
        return _cut(self.tokenizer.decode(ids, skip_special_tokens=True), stop)

    def __call__(
        self, prompts: str | list[str], *, max_new_tokens: int = 50, stop: list[str] | None = None, **sampling
    ) -> list[str]:
        """Continuations of ``prompts`` (without the prompt), cut before any of the ``stop`` strings.
        ``sampling``: the keyword arguments of ``generate``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        check_stop(stop)
        input_ids, mask = self.encode(prompts)
        out = generate(self.model, input_ids, mask, max_new_tokens=max_new_tokens, **self._ids(**sampling))
        return [self.decode(row[input_ids.shape[1] :], stop) for row in out]

    def stream(
        self, prompt: str, *, max_new_tokens: int = 50, stop: list[str] | None = None, chunk_size: int = 8, **sampling
    ) -> TextStream:
        """The continuation of one prompt, piece by piece as tokens are produced: iterate the returned
        ``TextStream``; its ``new_tokens`` counts the tokens generated so far. Settings are checked here,
        before anything runs."""
        check_stop(stop)
        input_ids, mask = self.encode([prompt])
        chunks = stream(
            self.model, input_ids, mask, max_new_tokens=max_new_tokens, chunk_size=chunk_size, **self._ids(**sampling)
        )
        return TextStream(self, chunks, stop)


class TextStream:
    """The text pieces of one continuation (iterate it), and ``new_tokens``, the tokens generated so far."""

    def __init__(self, generator: TextGenerator, chunks: Iterator[np.ndarray], stop: list[str] | None):
        self.new_tokens = 0
        self._pieces = self._run(generator, chunks, stop)

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def _run(self, generator: TextGenerator, chunks: Iterator[np.ndarray], stop: list[str] | None) -> Iterator[str]:
        tokens, shown = [], ""
        for chunk in chunks:
            tokens.extend(chunk[0].tolist())
            self.new_tokens = len(tokens)
            text = generator.decode(tokens, stop)
            if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for the rest
                continue
            if len(text) > len(shown):
                yield text[len(shown) :]
                shown = text
            if stop and any(s in generator.tokenizer.decode(tokens) for s in stop):
                return


def check_stop(stop: list[str] | None) -> None:
    if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop or ()):
        raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")


def _cut(text: str, stop: list[str] | None) -> str:
    for s in stop or ():
        if s and s in text:
            text = text[: text.index(s)]
    return text
