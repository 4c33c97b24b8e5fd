"""``neo-jax eval perplexity`` and ``neo-jax eval harness``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from neo_jax.cli.common import ADAPTER_HELP, MODEL_HELP, WEIGHTS_HELP
from neo_jax.config import DTYPES, WEIGHTS


def add_parser(commands) -> None:
    p = commands.add_parser("eval", help="perplexity, or lm-evaluation-harness tasks")
    which = p.add_subparsers(dest="evaluation", required=True)
    e = which.add_parser(
        "perplexity",
        help="strided sliding-window perplexity of text files",
        description="Documents are tokenized and joined with EOS; windows of --seq-len tokens start every "
        "--stride tokens and each scores only its new tokens, so every token is scored once with up to "
        "--seq-len tokens of context. Prints JSON {perplexity, nll, tokens}.",
    )
    e.add_argument("--model", required=True, help=MODEL_HELP)
    e.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="text files, globs, .jsonl, saved datasets, hf:NAME, or a directory from neo-jax data prepare",
    )
    e.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's maximum)")
    e.add_argument("--stride", type=int, default=None, help="tokens between window starts (default 512)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--dtype", choices=DTYPES, default="float32")
    e.add_argument("--weights", choices=WEIGHTS, help=WEIGHTS_HELP)
    e.add_argument("--text-field", default="text")
    e.add_argument("--split", default="train")
    e.add_argument("--revision", default=None)
    e.add_argument("--adapter", help=ADAPTER_HELP)
    e.set_defaults(run=perplexity, command="eval perplexity")
    e = which.add_parser(
        "harness",
        help="run lm-evaluation-harness tasks through the neo-jax model adapter",
        description="lm_eval.simple_evaluate with model neo-jax; prints (and with --output writes) the results.",
    )
    e.add_argument("--model", required=True, help=MODEL_HELP)
    e.add_argument("--tasks", required=True, help="comma-separated task names")
    e.add_argument("--num-fewshot", type=int, default=None)
    e.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if below 1)")
    e.add_argument("--include-path", default=None, help="directory of extra task YAML files")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--dtype", choices=DTYPES, default="float32")
    e.add_argument("--weights", choices=WEIGHTS, help=WEIGHTS_HELP)
    e.add_argument("--mesh", default=None, help="D,F,T: shard the model over a device mesh")
    e.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed (lm-eval's default)")
    e.add_argument("--adapter", help=ADAPTER_HELP)
    e.add_argument("--output", default=None, help="also write the results JSON here")
    e.set_defaults(run=harness, command="eval harness")


def perplexity(args: argparse.Namespace) -> None:
    from neo_jax.data import TokenData, expand_paths, is_prepared

    if len(args.data) == 1 and is_prepared(args.data[0]):  # a prepared directory: read as prepared
        TokenData(args.data[0])  # an incomplete or damaged one fails before the model loads
    else:
        expand_paths(args.data)  # missing files fail before the model loads

    from neo_jax import evaluate, validate
    from neo_jax.convert import from_pretrained
    from neo_jax.hf import load_tokenizer
    from neo_jax.source import resolve

    source = resolve(args.model, args.revision)
    evaluate.windows_of(args.seq_len, args.stride, source.config.max_position_embeddings)
    validate.integer("--batch-size", args.batch_size, least=1)
    if args.adapter is not None:
        source = source.with_adapter(args.adapter)
    tokens = evaluate.corpus_tokens(
        args.data, load_tokenizer(source.require_directory()), text_field=args.text_field, split=args.split
    )
    model = from_pretrained(source, dtype=args.dtype, param_dtype=args.dtype, weights=args.weights)
    result = evaluate.perplexity(
        model, tokens, seq_len=args.seq_len, stride=args.stride, batch_size=args.batch_size, progress=True
    )
    print(json.dumps(result))


def _load_tasks(tasks: list[str], include_path: str | None):
    """lm-eval's task manager, with each task and its data read before the model loads: a broken one is named."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}: check the names, or add --include-path DIR with their YAML")
    for task in tasks:
        try:
            manager.load([task])
        except Exception as e:  # noqa: BLE001 (lm-eval and datasets raise anything, StopIteration to IndexError)
            entry = manager.task_index.get(task)
            where = getattr(entry, "yaml_path", None)
            data = ((getattr(entry, "cfg", None) or {}).get("dataset_kwargs") or {}).get("data_files")
            detail = " ".join(f"{type(e).__name__} {e}".split())[:300]
            raise ValueError(
                f"task {task} ({where}{f', data {data}' if data else ''}) could not be read: {detail}; check its files"
            ) from None
    return manager


def harness(args: argparse.Namespace) -> None:
    try:
        import lm_eval
        import lm_eval.tasks
    except ImportError:
        raise ImportError("neo-jax eval harness needs lm-evaluation-harness: pip install 'neo_jax[eval]'") from None
    import neo_jax.lm_eval  # noqa: F401 (registers the model name "neo-jax")

    tasks = [t for t in args.tasks.split(",") if t]
    manager = _load_tasks(tasks, args.include_path)
    model_args = {"pretrained": args.model, "dtype": args.dtype, "batch_size": args.batch_size}
    optional = {"mesh": args.mesh, "peft": args.adapter, "weights": args.weights}
    model_args |= {key: value for key, value in optional.items() if value}
    simple_evaluate: Callable[..., Any] = lm_eval.simple_evaluate  # its decorator hides the signature
    results = simple_evaluate(
        model="neo-jax",
        model_args=model_args,
        tasks=tasks,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        task_manager=manager,
        log_samples=False,
        random_seed=args.seed,
        numpy_random_seed=args.seed,
        fewshot_random_seed=args.seed,
    )
    summary = {"model": args.model, "results": results["results"], "n-shot": results.get("n-shot", {})}
    text = json.dumps(summary, indent=1, default=str)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
