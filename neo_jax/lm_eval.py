"""lm-evaluation-harness model ``neo-jax``: GPT-Neo in JAX behind lm-eval's tasks.

    import neo_jax.lm_eval  # registers the model name
    lm_eval.simple_evaluate(model="neo-jax", model_args="pretrained=EleutherAI/gpt-neo-125M", tasks=[...])

or ``neo-jax eval harness --model SRC --tasks T1,T2``. It follows lm-eval's ``hf`` backend request by
request: the same tokenization (lm-eval's ``TemplateLM``), context truncated from the left to the model's
``max_length``, rolling windows built by lm-eval's own helpers, greedy generation cut at ``until``. The
model arguments that overlap the ``hf`` backend mean the same: ``pretrained``, ``revision``, ``dtype``,
``batch_size``, ``max_length``, ``max_gen_toks``; ``mesh=D.F.T`` (dots, since lm-eval splits arguments on
commas) shards the model over a device mesh.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm.auto import tqdm

from neo_jax.config import DTYPES
from neo_jax.evaluate import score


@register_model("neo-jax", "neo_jax")
class NeoJaxLM(TemplateLM):
    def __init__(
        self,
        pretrained: str,
        *,
        revision: str | None = None,
        dtype: str = "float32",
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        mesh: str | None = None,
        peft: str | None = None,  # a PEFT LoRA adapter directory (the name lm-eval's hf model uses)
        weights: str | None = None,  # float32, bfloat16 or int8 (neo_jax.quantize); default: dtype
        device: str | None = None,  # lm-eval passes it to every model; JAX places the work itself
        max_batch_size: int | None = None,  # ditto, for batch_size=auto
        **unused,
    ):
        super().__init__()
        from neo_jax.convert import from_pretrained
        from neo_jax.hf import load_tokenizer
        from neo_jax.sharding import make_mesh, parse_mesh
        from neo_jax.source import resolve

        if unused:
            logging.getLogger(__name__).warning(
                "neo-jax ignores model_args %s (it takes pretrained, revision, dtype, batch_size, max_length, "
                "max_gen_toks, mesh, peft, weights)",
                sorted(unused),
            )
        dtype = {"auto": "float32", "float": "float32", "bf16": "bfloat16"}.get(str(dtype), str(dtype))
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.batch_size = _batch_size(batch_size)
        placement = None
        if mesh is not None:
            placement = make_mesh(**parse_mesh(mesh))
        source = resolve(pretrained, revision)
        self.model = from_pretrained(
            source, dtype=dtype, param_dtype=dtype, weights=weights, mesh=placement, adapter=peft
        )
        self.tokenizer = load_tokenizer(source.require_directory())
        limit = self.model.config.max_position_embeddings
        self.max_length = min(int(max_length or limit), limit)
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation | context), whether the continuation is the greedy one)`` for
        ``((context, continuation), context_tokens, continuation_tokens)`` requests."""
        rows = [(context + continuation)[-(self.max_length + 1) :] for _, context, continuation in requests]
        scored = score(self.model, rows, batch_size=self.batch_size, progress=not disable_tqdm)
        out = []
        for (_, _, continuation), (logprobs, greedy) in zip(requests, scored, strict=True):
            n = len(continuation)
            out.append((float(np.sum(logprobs[-n:], dtype=np.float64)), bool(greedy[-n:].all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, over disjoint windows of ``max_length`` tokens (each window's
        context is the one before it), built as lm-eval's ``hf`` backend builds them."""
        windows, owners = [], []
        for number, (text,) in enumerate(request.args for request in requests):
            rolling = utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(utils.make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owners.append(number)
        totals = [0.0] * len(requests)
        for owner, (loglikelihood, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[owner] += loglikelihood
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations (greedy unless the task asks to sample), cut before the first ``until`` string or
        EOS, at most ``max_gen_toks`` tokens."""
        from neo_jax.generation import generate

        eos = self.tokenizer.decode([self.eot_token_id])
        groups: dict[str, list[int]] = {}  # requests sharing generation settings run in batches together
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        results: list = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generating", disable=disable_tqdm)
        for members in groups.values():
            settings: dict[str, Any] = dict(normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks))
            until = handle_stop_sequences(settings.pop("until", None), eos=eos)
            max_new = settings.pop("max_gen_toks")
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks {max_new} must be below the model's max_length {self.max_length}")
            sampling: dict[str, Any] = {"do_sample": bool(settings.pop("do_sample", False))}
            if sampling["do_sample"]:
                sampling |= {k: settings[k] for k in ("temperature", "top_k", "top_p") if settings.get(k) is not None}
            contexts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_new) :] for i in members}
            order = sorted(members, key=lambda i: -len(contexts[i]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                width = max(len(contexts[i]) for i in chunk)
                input_ids = np.full((len(chunk), width), self.eot_token_id, np.int32)
                mask = np.zeros((len(chunk), width), np.int32)
                for row, i in enumerate(chunk):  # left padding
                    input_ids[row, width - len(contexts[i]) :] = contexts[i]
                    mask[row, width - len(contexts[i]) :] = 1
                out = generate(
                    self.model,
                    input_ids,
                    mask,
                    max_new_tokens=max_new,
                    eos_token_id=self.eot_token_id,
                    pad_token_id=self.eot_token_id,
                    **sampling,
                )
                for row, i in enumerate(chunk):
                    text = self.tok_decode(np.asarray(out[row, width:]).tolist())
                    results[i] = postprocess_generated_text(text, stop=until, think_end_token=None)
                bar.update(len(chunk))
        bar.close()
        return results


def _batch_size(value: int | str) -> int:
    """lm-eval passes ``batch_size`` as given on its command line: a number, or ``auto`` (here: 8)."""
    if str(value).startswith("auto"):
        return 8
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {value}")
    return size
