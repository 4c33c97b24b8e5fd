"""``neo-jax generate``: continue a prompt, streaming the text as it is produced."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from neo_jax.cli.common import (
    ADAPTER_HELP,
    ATTENTION_HELP,
    CACHE_HELP,
    MODEL_HELP,
    WEIGHTS_HELP,
    enable_compilation_cache,
)
from neo_jax.cli.signals import INTERRUPTED
from neo_jax.config import DTYPES, WEIGHTS


def add_parser(commands) -> None:
    p = commands.add_parser(
        "generate",
        help="continue a prompt, streaming the text as it is produced",
        description="Greedy by default; --temperature/--top-k/--top-p/--min-p switch to sampling, "
        "--num-beams > 1 to beam search. Time to first token and tokens/s go to stderr.",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, help="sampling temperature (> 0 samples, 0 is greedy)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="nucleus sampling: smallest set reaching this probability")
    p.add_argument("--min-p", type=float, help="drop tokens below this fraction of the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--min-new-tokens", type=int, default=0, help="generate at least this many tokens before EOS")
    p.add_argument(
        "--min-length", type=int, default=0, help="no EOS before the prompt plus the new tokens are this long"
    )
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams")
    p.add_argument(
        "--draft",
        help="speculative decoding: a smaller GPT-Neo with the model's tokenizer (a source, as --model), or "
        "'ngram' (prompt lookup); the output follows the same law (greedy: the same text)",
    )
    p.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes a round (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", help="stop before this string (repeatable)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="compute and weight dtype")
    p.add_argument("--weights", choices=WEIGHTS, help=WEIGHTS_HELP)
    p.add_argument("--attention", default="auto", help=ATTENTION_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    p.add_argument("--adapter", help=ADAPTER_HELP)
    p.add_argument("--compilation-cache", help=CACHE_HELP)
    p.set_defaults(run=generate)


def sampling_options(args: argparse.Namespace) -> dict:
    """Greedy unless a sampling knob is given; validated (``SamplingParams.of``) before anything loads or
    compiles. The flags carry ``SamplingParams.of``'s keyword names."""
    from neo_jax.generation import SamplingParams, check_beams

    knobs = {name: getattr(args, name) for name in ("temperature", "top_k", "top_p", "min_p")}
    knobs = {name: value for name, value in knobs.items() if value is not None}
    if args.top_k is not None and args.top_k <= 0:
        raise ValueError(f"--top-k must be a positive number of tokens, got {args.top_k}")
    if args.num_beams > 1 and knobs:
        raise ValueError("--num-beams is beam search: it cannot be combined with --temperature/--top-k/--top-p/--min-p")
    options = {"do_sample": bool(knobs), **knobs, "repetition_penalty": args.repetition_penalty}
    options |= {"min_new_tokens": args.min_new_tokens, "min_length": args.min_length}
    check_beams(SamplingParams.of(**options, eos_token_id=-1), args.num_beams)  # -1: whatever EOS the model has
    return options | {"num_beams": args.num_beams, "seed": args.seed}


def _checked(args: argparse.Namespace) -> tuple[str, dict, Any, Any]:
    """The prompt, the sampling options, the model (resolved with a draft, else as given) and the draft
    (``speculative.draft_source``, or None), every flag checked before anything loads."""
    from neo_jax.attention import check_implementation
    from neo_jax.generation import check_stop
    from neo_jax.generation.speculative import draft_source
    from neo_jax.source import resolve

    prompt = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
    if not prompt:
        raise ValueError("empty prompt: pass --prompt TEXT or --prompt-file FILE with some text")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    options = sampling_options(args)
    check_stop(args.stop)
    check_implementation(args.attention)
    if args.draft is None:
        return prompt, options, args.model, None
    if args.draft_tokens < 1:
        raise ValueError(f"--draft-tokens must be >= 1, got {args.draft_tokens}")
    if args.num_beams > 1:
        raise ValueError("--draft speeds up sampling and greedy decoding, not beam search: drop --num-beams")
    model = resolve(args.model)
    return prompt, options, model, draft_source(model, args.draft)


def generate(args: argparse.Namespace) -> None:
    from neo_jax.generation import TextGenerator

    prompt, options, model, draft = _checked(args)
    enable_compilation_cache(args.compilation_cache)
    loading = dict(dtype=args.dtype, param_dtype=args.dtype, weights=args.weights, attention=args.attention)
    generator = TextGenerator(model, adapter=args.adapter, **loading)
    statistics: dict = {}
    if draft is not None:
        from neo_jax.convert import from_pretrained

        draft = draft if isinstance(draft, str) else from_pretrained(draft, progress=False, **loading)
        options |= {"draft": draft, "num_draft_tokens": args.draft_tokens, "statistics": statistics}
    beams = options.pop("num_beams")
    start = time.perf_counter()
    first, pieces = None, []
    if beams > 1:  # beam search decides at the end: nothing to stream
        pieces = generator(prompt, max_new_tokens=args.max_new_tokens, stop=args.stop, num_beams=beams, **options)
        tokens = len(generator.tokenizer(pieces[0])["input_ids"])
    else:
        continuation = generator.stream(prompt, max_new_tokens=args.max_new_tokens, stop=args.stop, **options)
        for piece in continuation:
            if INTERRUPTED.is_set():
                raise KeyboardInterrupt
            first = first or time.perf_counter() - start
            pieces.append(piece)
            if not args.json:
                print(piece, end="", flush=True)
        tokens = continuation.new_tokens
    speculation = _speculation(statistics, args.draft_tokens) if args.draft else None
    _report(args, prompt, "".join(pieces), tokens, first, time.perf_counter() - start, beams, speculation)


def _speculation(statistics: dict, k: int) -> dict:
    """The draft's figures: its tokens proposed and accepted, the acceptance rate, and per verification step
    of a row the mean tokens accepted (of ``k``) and emitted (accepted + the target's own)."""
    drafted, accepted = statistics.get("draft_tokens", 0), statistics.get("accepted_tokens", 0)
    steps = drafted // k
    return {
        "draft_tokens": drafted,
        "accepted_tokens": accepted,
        "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
        "mean_accepted_per_step": round(accepted / steps, 3) if steps else None,
        "mean_tokens_per_step": round(statistics.get("tokens", 0) / steps, 3) if steps else None,
    }


def _report(
    args, prompt: str, completion: str, tokens: int, first: float | None, elapsed: float, beams: int, speculation
) -> None:
    first = first or elapsed
    if args.json:
        result = {
            "prompt": prompt,
            "completion": completion,
            "new_tokens": tokens,
            "time_to_first_token_s": round(first, 3),
            "seconds": round(elapsed, 3),
        }
        print(json.dumps(result | ({"speculative": speculation} if speculation else {})))
    else:
        print(completion if beams > 1 else "")
    print(
        f"time to first token {first:.2f}s; {tokens} tokens in {elapsed:.2f}s = {tokens / elapsed:.1f} tokens/s "
        "(a first run includes compilation)",
        file=sys.stderr,
    )
    if speculation and speculation["acceptance_rate"] is not None:
        print(
            f"draft: {speculation['accepted_tokens']} of {speculation['draft_tokens']} proposed tokens accepted "
            f"({speculation['acceptance_rate']:.1%}); per step {speculation['mean_accepted_per_step']:.2f} accepted, "
            f"{speculation['mean_tokens_per_step']:.2f} tokens",
            file=sys.stderr,
        )
