"""Sharding rules on one device, and the simulated 8-device checks run in their own process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec as P

from neo_jax import sharding

ROOT = Path(__file__).parents[1]


def test_simulated_eight_device_mesh_checks():
    """tests/multidevice/sharded_checks.py on JAX_NUM_CPU_DEVICES=8, in a separate pytest process (a
    process's device count is fixed when JAX starts, and the rest of the suite keeps one device)."""
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}
    checks = "tests/multidevice/sharded_checks.py"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", checks],  # one process: 8 devices
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 20 and not re.search(r"skipped|failed|error", summary), summary


def test_train_steps_compile_without_involuntary_full_rematerialization():
    """Every shipped config's train step on its own mesh, and 125M on (2,2,2): XLA's SPMD partitioner never falls
    back to replicating a whole activation to re-split it (it did for the embedding lookup on (2,2,2), whose
    rows came out split along embed rather than over the batch)."""
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "tests/multidevice/compile_warnings.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    cases = re.split(r"^CASE ", result.stderr, flags=re.MULTILINE)[1:]
    names = [case.splitlines()[0] for case in cases]
    assert len(names) == len(list((ROOT / "configs").glob("*.yaml"))) + 2 and names[-1] == "done", names
    for case in cases:
        assert "Involuntary full rematerialization" not in case, case[:3000]


def test_make_mesh_sizes_and_errors():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.size == jax.device_count()
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh(-1, -1)
    with pytest.raises(ValueError, match="needs 4 devices"):
        sharding.make_mesh(1, 2, 2)


SIZES = {"data": 2, "fsdp": 2, "tensor": 4}  # a (2, 2, 4) mesh, by its axis sizes


@pytest.mark.parametrize(
    "names, shape, expected",
    [
        (("vocab", "embed"), (320, 64), P("tensor", "fsdp")),
        (("vocab", "embed"), (50257, 768), P(None, "fsdp")),  # 50257 does not split: replicated
        (("layers", "heads", "embed"), (6, 768, 768), P(None, "tensor", "fsdp")),
        (("layers", "embed"), (6, 768), P(None, "fsdp")),
        (("position", "embed"), (2048, 768), P(None, "fsdp")),
        (("batch", None), (8, 16), P(("data", "fsdp"), None)),
        (("batch", None), (6, 16), P(None, None)),
    ],
)
def test_spec_follows_the_rules(names, shape, expected):
    assert sharding.spec(names, shape, SIZES) == expected


def test_rules_can_be_overridden():
    rules = {**sharding.DEFAULT_RULES, "embed": (), "vocab": ("fsdp", "tensor")}
    assert sharding.spec(("vocab", "embed"), (320, 64), SIZES, rules) == P(("fsdp", "tensor"), None)


def test_shard_shape():
    assert sharding.shard_shape((6, 768, 3072), P(None, "tensor", "fsdp"), SIZES) == (6, 192, 1536)
    assert sharding.shard_shape((8, 16), P(("data", "fsdp")), SIZES) == (2, 16)
