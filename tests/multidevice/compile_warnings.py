"""The train step of every shipped config, compiled on its own mesh (its slice's chip count, as simulated CPU
devices) and on (2,2,2), printing ``CASE name`` to stderr before each, so that the XLA log lines that follow
(the SPMD partitioner's "Involuntary full rematerialization" among them) can be told apart by case.
tests/test_sharding.py runs it in its own process with 8 CPU devices.

The configs keep their width, batch, sequence length, remat, accumulation and dtype, with 2 layers: how
activations are split does not depend on depth, and XLA:CPU compiles them in seconds.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import yaml

from neo_jax import aot, plan
from neo_jax.config import GPTNeoConfig
from neo_jax.sharding import make_mesh, parse_mesh
from neo_jax.source import config_of

ROOT = Path(__file__).parents[2]


def two_layers(config: GPTNeoConfig) -> GPTNeoConfig:
    return dataclasses.replace(config, num_layers=2, attention_types=((("global", "local"), 1),))


def cases():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        run = yaml.safe_load(path.read_text())
        model = run["model"]
        config = (
            config_of(path.parent / model) if model.endswith(".json") else GPTNeoConfig.preset(model.rsplit("-", 1)[1])
        )
        sizes = plan.slice_mesh_sizes(run["topology"], parse_mesh(run["mesh"]) if run.get("mesh") else None)
        settings = dict(batch=run["batch_size"], seq=run["seq_len"], remat=run["remat"], grad_accum=run["grad_accum"])
        yield path.name, two_layers(config), sizes, settings | {"dtype": jnp.dtype(run["dtype"])}
    small = dict(batch=8, seq=512, remat="none", grad_accum=1, dtype=jnp.bfloat16)
    yield "125M on (2,2,2)", two_layers(GPTNeoConfig.preset("125M")), {"data": 2, "fsdp": 2, "tensor": 2}, small


def main() -> None:
    for name, config, sizes, settings in cases():
        print(f"CASE {name} {sizes}", file=sys.stderr, flush=True)
        count = sizes["data"] * sizes["fsdp"] * sizes["tensor"]
        mesh = make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"], devices=jax.devices()[:count])
        aot.train_program(config, mesh, **settings).compile()
    print("CASE done", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
