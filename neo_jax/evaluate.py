"""Evaluation: the log-probability of every token of many token sequences, and strided sliding-window
perplexity over a corpus. The lm-evaluation-harness adapter (``neo_jax.lm_eval``) scores through ``score``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from neo_jax import validate
from neo_jax.model import GPTNeo
from neo_jax.shapes import bucket
from neo_jax.sharding import model_mesh, place_batch, use_mesh


def token_logprobs(logits, targets):
    """``log p(target)`` per position, in float32, from logits ``[..., vocab]``: the one place the next-token
    log-likelihood is computed (the training loss is its negative). ``log_softmax`` is never materialised
    next to the logits."""
    return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)


@nnx.jit
def _token_scores(model: GPTNeo, input_ids, targets):
    logits = model(input_ids)  # float32
    return token_logprobs(logits, targets), jnp.argmax(logits, axis=-1) == targets


def score(
    model: GPTNeo, sequences: Sequence[Sequence[int]], *, batch_size: int = 8, progress: bool = False
) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each token sequence ``s`` (2 to ``max_position_embeddings + 1`` tokens): ``(logprobs, greedy)``,
    both of length ``len(s) - 1``: ``log p(s[i + 1] | s[: i + 1])`` in float32, and whether ``s[i + 1]`` is
    the most likely next token.

    Sequences are scored longest first in batches of ``batch_size``, right-padded to a few bucketed
    lengths (nothing after a position changes its logits), so a whole task compiles a handful of programs.
    """
    limit = model.config.max_position_embeddings
    batch_size = validate.integer("batch_size", batch_size, least=1)
    for s in sequences:
        if not 2 <= len(s) <= limit + 1:
            raise ValueError(f"a scored sequence needs 2 to {limit + 1} tokens, got {len(s)}")
        validate.token_ids(s, model.config.vocab_size)
    mesh = model_mesh(model)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    results: list = [None] * len(sequences)
    bar = tqdm(total=len(sequences), desc="scoring", unit="seq", disable=not progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = min(bucket(len(sequences[chunk[0]]) - 1), limit)
        rows = np.zeros((batch_size, width + 1), np.int32)  # padded rows are scored and thrown away
        for row, i in enumerate(chunk):
            rows[row, : len(sequences[i])] = sequences[i]
        inputs, targets = place_batch(rows[:, :-1], mesh), place_batch(rows[:, 1:], mesh)
        with use_mesh(mesh):
            logprobs, greedy = jax.device_get(_token_scores(model, inputs, targets))
        for row, i in enumerate(chunk):
            n = len(sequences[i]) - 1
            results[i] = (logprobs[row, :n], greedy[row, :n])
        bar.update(len(chunk))
    bar.close()
    return results


def perplexity(
    model: GPTNeo,
    token_ids: Sequence[int],
    *,
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Strided sliding-window perplexity of one token stream, as in transformers' perplexity guide: windows
    of up to ``seq_len`` tokens (default: the model's maximum) start every ``stride`` tokens (default 512,
    at most ``seq_len``), and each
    window scores only the tokens the previous one did not, so with ``stride < seq_len`` every token but
    the first is scored once, with up to ``seq_len - 1`` tokens of context (disjoint windows, ``stride ==
    seq_len``, cannot score the first token of each window). Returns ``{"perplexity", "nll", "tokens"}``, where
    ``nll`` is the mean negative log-likelihood per scored token (nats)."""
    seq_len, stride = windows_of(seq_len, stride, model.config.max_position_embeddings)
    token_ids = list(token_ids)
    if len(token_ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(token_ids)}")
    windows, scored = [], []  # each window and how many of its last tokens it scores
    previous_end = 0
    for begin in range(0, len(token_ids), stride):
        end = min(begin + seq_len, len(token_ids))
        if end - begin < 2:  # a last window of one token has nothing to score
            break
        windows.append(token_ids[begin:end])
        scored.append(min(end - previous_end, end - begin - 1))
        previous_end = end
        if end == len(token_ids):
            break
    total, count = 0.0, 0
    for (logprobs, _), n in zip(score(model, windows, batch_size=batch_size, progress=progress), scored, strict=True):
        total -= float(np.sum(logprobs[len(logprobs) - n :], dtype=np.float64))
        count += n
    nll = total / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count}


def windows_of(seq_len: int | None, stride: int | None, limit: int) -> tuple[int, int]:
    """``perplexity``'s window length and stride, defaults filled in, checked for a model of ``limit``
    positions."""
    seq_len = limit if seq_len is None else validate.integer("seq_len", seq_len)
    stride = min(512, seq_len) if stride is None else validate.integer("stride", stride)
    if not 2 <= seq_len <= limit:
        raise ValueError(f"seq_len must be in [2, {limit}] (the model's positions), got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    return seq_len, stride


def corpus_tokens(patterns: Sequence[str], tokenizer, *, text_field: str = "text", split: str = "train") -> list[int]:
    """The documents of ``patterns`` (as ``neo_jax.data`` reads them) tokenized and joined with EOS; or, for one
    directory written by ``neo-jax data prepare``, its ``split`` (train or validation) as prepared."""
    from neo_jax.data import is_prepared, tokenized_documents

    if len(patterns) == 1 and is_prepared(patterns[0]):
        return _prepared_tokens(Path(patterns[0]).expanduser(), tokenizer, split)

    tokens: list[int] = []
    for number, ids in enumerate(tokenized_documents(patterns, tokenizer, text_field, split)):
        if number and tokenizer.eos_token_id is not None:
            tokens.append(tokenizer.eos_token_id)
        tokens.extend(ids)
    return tokens


def _prepared_tokens(directory: Path, tokenizer, split: str) -> list[int]:
    """A prepared split's tokens: its documents, each followed by EOS, the last EOS dropped (as if joined)."""
    from neo_jax.data import SPLITS, TokenData, vocab_hash

    data = TokenData(directory)  # an incomplete or damaged directory is named here
    if split not in SPLITS:
        raise ValueError(f"{directory} is prepared data: --split is train or validation, not {split!r}")
    recorded = data.manifest["tokenizer"].get("vocab_sha256")
    if recorded is not None and (recorded != vocab_hash(tokenizer) or data.eos_token_id != tokenizer.eos_token_id):
        raise ValueError(
            f"{directory} was prepared with another tokenizer than the model's: prepare it with the model's"
        )
    stream = data.train if split == "train" else data.validation
    tokens = stream.read(0, stream.tokens).tolist()
    return tokens[:-1] if tokens and tokens[-1] == data.eos_token_id else tokens
