"""``neo-jax`` command line: thin wrappers over the library functions, one module per command family."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from neo_jax.cli import convert, embed, evaluate, generate, plan, serve, train
from neo_jax.cli.signals import INTERRUPTED, on_ctrl_c

FAMILIES = (convert, generate, serve, embed, plan, train, evaluate)  # in the order `neo-jax --help` lists them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neo-jax", description="GPT-Neo in JAX / Flax NNX.")
    commands = parser.add_subparsers(dest="command", required=True)
    for family in FAMILIES:
        family.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_mesh_values_attached(sys.argv[1:] if argv is None else argv))
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        if os.environ.get("NEO_JAX_DISTRIBUTED") == "1":  # set by tpu_scripts/run.sh on every worker
            from neo_jax import distributed

            distributed.initialize()
            if not distributed.is_main_process():  # results are printed once, by process 0
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
        status = args.run(args) or 0
        if INTERRUPTED.is_set():  # a Ctrl-C that something swallowed still stops with 130
            raise KeyboardInterrupt
        return status
    except (ValueError, OSError, ImportError, FloatingPointError) as e:
        print(f"neo-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"neo-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)
            INTERRUPTED.clear()


def _mesh_values_attached(argv: list[str]) -> list[str]:
    """``--mesh -1,1,1`` as ``--mesh=-1,1,1``: argparse would take a value starting with '-' for an option."""
    out = []
    for arg in argv:
        if out and out[-1] == "--mesh" and arg.startswith("-"):
            out[-1] = f"--mesh={arg}"
        else:
            out.append(arg)
    return out
