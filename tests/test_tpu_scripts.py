"""tpu_scripts/*.sh --dry-run: the gcloud commands they would run (shellcheck runs in .ci/run)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
COMMON = ["--name", "neo", "--zone", "us-central2-b", "--project", "my-proj", "--dry-run"]
TARGET = ["neo", "--zone=us-central2-b", "--project=my-proj"]


def dry_run(script, *args):
    result = subprocess.run(
        ["bash", str(ROOT / "tpu_scripts" / script), *args], capture_output=True, text=True, check=False, timeout=60
    )
    return result.returncode, [shlex.split(line) for line in result.stdout.splitlines()], result.stderr


def test_create():
    rc, commands, _ = dry_run("create.sh", *COMMON, "--accelerator-type", "v5litepod-8", "--spot")
    assert rc == 0
    assert commands == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", *TARGET]
        + ["--accelerator-type=v5litepod-8", "--version=tpu-ubuntu2204-base", "--spot"]
    ]
    rc, commands, _ = dry_run("create.sh", *COMMON, "--runtime-version", "v2-alpha-tpuv5-lite")
    assert commands[0][-2:] == ["--accelerator-type=v4-8", "--version=v2-alpha-tpuv5-lite"]


def test_setup_installs_the_tpu_extra_on_every_worker():
    rc, commands, _ = dry_run("setup.sh", *COMMON)
    assert rc == 0
    archive = commands[0][-2]
    assert commands[0][:3] == ["git", "-C", str(ROOT)] and archive.endswith(".tar.gz")
    assert commands[1] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, "neo:neo_jax.tar.gz"] + TARGET[1:] + [
        "--worker=all"
    ]
    ssh = commands[2]
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "neo"] and "--worker=all" in ssh
    assert 'pip install -e "$HOME/neo_jax[tpu]"' in ssh[-1]
    assert commands[3] == ["rm", "-f", archive]


def test_run_passes_the_neo_jax_command_to_every_worker():
    rc, commands, _ = dry_run("run.sh", *COMMON, "--", "generate", "--model", "my model", "--prompt", "it's")
    assert rc == 0
    (ssh,) = commands
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "neo"] and "--worker=all" in ssh
    remote = ssh[-1].removeprefix("--command=")
    assert shlex.split(remote)[-6:] == ["neo-jax", "generate", "--model", "my model", "--prompt", "it's"]
    assert "NEO_JAX_DISTRIBUTED=1" in remote


def test_delete():
    rc, commands, _ = dry_run("delete.sh", *COMMON)
    assert rc == 0 and commands == [["gcloud", "compute", "tpus", "tpu-vm", "delete", *TARGET, "--quiet"]]


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("create.sh", ["--zone", "z", "--project", "p", "--dry-run"], "--name is required"),
        ("delete.sh", ["--name", "n", "--project", "p", "--dry-run"], "--zone is required"),
        ("create.sh", [*COMMON, "--accelerator", "v4-8"], "unknown option --accelerator"),
        ("run.sh", COMMON, "nothing to run"),
        ("setup.sh", [*COMMON, "--source", "/nonexistent"], "not a neo_jax checkout"),
    ],
)
def test_bad_flags_are_clear_errors(script, args, message):
    rc, commands, err = dry_run(script, *args)
    assert rc == 2 and commands == [] and message in err


def test_mount_puts_a_bucket_on_every_worker_read_only():
    rc, commands, _ = dry_run("mount.sh", *COMMON, "--bucket", "gs://my-corpus/", "--only-dir", "data v1")
    assert rc == 0
    (ssh,) = commands
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "neo"] and "--worker=all" in ssh
    remote = ssh[-1].removeprefix("--command=")
    assert "mountpoint -q /mnt/my-corpus ||" in remote  # mounting twice is harmless
    assert shlex.split(remote.split("|| gcsfuse", 1)[1].rstrip("; }"))[-5:] == [
        "ro",
        "--only-dir",
        "data v1",
        "my-corpus",
        "/mnt/my-corpus",
    ]
    rc, commands, _ = dry_run("mount.sh", *COMMON, "--bucket", "b", "--mount-point", "/data", "--read-write")
    assert "-o ro" not in commands[0][-1] and "gcsfuse --implicit-dirs  b /data" in commands[0][-1]
    rc, commands, _ = dry_run("mount.sh", *COMMON, "--bucket", "b", "--unmount")
    assert "fusermount -u /mnt/b" in commands[0][-1]
    for flags, message in [([], "--bucket is required"), (["--bucket", "Bad/Name"], "is not a bucket name")]:
        rc, commands, err = dry_run("mount.sh", *COMMON, *flags)
        assert rc == 2 and message in err and not commands
