"""neo_jax's own formats on disk, all Orbax: a model's parameters (``save_pretrained(format="orbax")``),
fine-tuning checkpoints (``Checkpoints``: parameters, optimizer state, data position), and the atomic
directory every model write goes through (a temporary directory renamed into place at the end, so a failure
never leaves a half-written model)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from neo_jax.distributed import barrier
from neo_jax.model import GPTNeo

ORBAX_DIR = "params"
TRAINING_DIR = "checkpoints"  # a neo-jax train output directory: its latest checkpoint's parameters


def _orbax_checkpointer(**options):
    import orbax.checkpoint as ocp

    # Compression buys little on float weights and holds compressed copies of every array in memory.
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False, **options))


def load_orbax(directory: Path, state, placement):
    import orbax.checkpoint as ocp

    if placement is not None:  # restore each array straight into its shards
        for _, variable in nnx.to_flat_state(state):
            value = variable.get_value()
            variable.set_value(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=placement(variable)))
    target = nnx.to_pure_dict(state)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    # A 1 GB in-flight limit keeps the transient read buffers well below a copy of a large model.
    with _orbax_checkpointer(restore_concurrent_gb=1) as checkpointer:
        _check_orbax_shapes(directory, checkpointer.metadata(directory.absolute()).item_metadata.tree, target)
        restored = checkpointer.restore(directory.absolute(), args=ocp.args.PyTreeRestore(target, restore_args))
    nnx.replace_by_pure_dict(state, restored)
    return state


def holds_int8(directory: Path) -> bool:
    """Whether the Orbax parameters in ``directory`` are int8 weights (``neo_jax.quantize``): some array is
    int8, or the token embedding's scales are there (a damaged directory with one but not the other is then
    refused by the load's check, rather than read as float weights)."""
    with _orbax_checkpointer() as checkpointer:
        tree = checkpointer.metadata(directory.absolute()).item_metadata.tree
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: hasattr(x, "dtype"))
    return "wte_scale" in tree or any(_kind(leaf.dtype) == "int8" for leaf in leaves)


def _kind(dtype) -> str:
    return "int8" if np.issubdtype(np.dtype(dtype), np.integer) else "floating point"


def _check_orbax_shapes(directory: Path, saved, target) -> None:
    """Every array the config needs is in the checkpoint with the config's shape and the same kind of dtype
    (int8 where int8 weights are, floating point elsewhere), and nothing else is: a ``config.json`` that does
    not describe its parameters, or int8 weights that lost their scales, is an error naming the first array
    that differs."""
    flat = lambda tree: {
        ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    saved, target = flat(saved), flat(target)
    problem = None
    if missing := sorted(target.keys() - saved.keys()):
        problem = f"{missing[0]} is missing from the checkpoint"
    elif unexpected := sorted(saved.keys() - target.keys()):
        problem = f"the checkpoint holds {unexpected[0]}, which the config has no place for"
    else:
        for name, array in target.items():
            if tuple(saved[name].shape) != tuple(array.shape):
                problem = (
                    f"{name} is {tuple(saved[name].shape)} in the checkpoint, the config needs {tuple(array.shape)}"
                )
                break
            if _kind(saved[name].dtype) != _kind(array.dtype):
                problem = (
                    f"{name} is {np.dtype(saved[name].dtype)} in the checkpoint, where {_kind(array.dtype)} belongs"
                )
                break
    if problem:
        raise ValueError(
            f"{directory.parent / 'config.json'} does not match the parameters in {directory}: {problem}; "
            "restore the files that were saved together (or save the model again)"
        )


# ------------------------------------------------------------------------------------------- writing
@contextmanager
def atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``out_dir``; rename it to ``out_dir`` only on success.

    With several processes (a multi-host run) they all write into one temporary directory, collectively
    for Orbax, and process 0 alone prepares and renames it, between barriers.
    """
    main, multi = jax.process_index() == 0, jax.process_count() > 1
    if main:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    if multi:
        tmp = out_dir.parent / f".{out_dir.name}.partial"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier(f"prepare {out_dir}")
    else:
        _remove_stale_temporaries(out_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; the output gets the usual permissions
    try:
        yield tmp
        barrier(f"written {out_dir}")
        if main:
            if out_dir.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
                out_dir.rename(old / out_dir.name)
                tmp.rename(out_dir)
                shutil.rmtree(old)
            else:
                tmp.rename(out_dir)
        barrier(f"renamed {out_dir}")
    finally:
        if main and tmp.exists():
            shutil.rmtree(tmp)


# What a saved model directory holds (save_pretrained, peft.save, transformers' tokenizer files): all that
# ``overwrite`` may replace.
_MODEL_FILE = re.compile(
    r"config\.json|generation_config\.json|(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)"
    r"|(model\.safetensors|pytorch_model\.bin)\.index\.json|adapter_config\.json|adapter_model\.(safetensors|bin)"
    rf"|{ORBAX_DIR}|tokenizer\.json|tokenizer_config\.json|vocab\.json|merges\.txt|special_tokens_map\.json"
    r"|added_tokens\.json|tokenizer\.model|chat_template\.jinja"
)


def check_destination(out_dir: str | os.PathLike, overwrite: bool, source: str | os.PathLike | None = None) -> Path:
    """``out_dir`` (absolute) if a model may be written there: new, empty, or with ``overwrite`` a model
    directory (nothing in it but a saved model's files: anything else is named and refused, as replacing the
    directory would delete it), and never a directory that holds ``source`` (replacing it would delete the
    source). Writing over the source itself (converting in place) is allowed."""
    out_dir = Path(out_dir).expanduser().absolute()
    if source is not None:
        src, dst = Path(source).expanduser().resolve(), out_dir.resolve()
        if dst in src.parents:
            raise ValueError(
                f"{out_dir} holds the source {source}: replacing it would delete the source; write elsewhere"
            )
    if not out_dir.exists():
        return out_dir
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file: write the model to a directory")
    entries = sorted(p.name for p in out_dir.iterdir())
    if entries and not overwrite:
        raise FileExistsError(
            f"{out_dir} already exists and is not empty; pass overwrite=True (--overwrite) to replace it"
        )
    foreign = [name for name in entries if not _MODEL_FILE.fullmatch(name)]
    if foreign:
        raise FileExistsError(
            f"{out_dir} holds {foreign[0]!r}, which is not a saved model's file: overwrite replaces a model "
            "directory only; move it out, or write elsewhere"
        )
    return out_dir


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Temporary directories of ``out_dir`` that an interrupted write (a killed process) left behind."""
    for stale in (*out_dir.parent.glob(f".{out_dir.name}.tmp-*"), *out_dir.parent.glob(f".{out_dir.name}.old-*")):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
            print(f"removed {stale}, left by an interrupted write to {out_dir}", file=sys.stderr)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def _ctrl_c_after() -> Iterator[None]:
    """Hold a Ctrl-C until the block is done, then raise it: Orbax writes from background threads that a
    KeyboardInterrupt in the main thread does not stop, so removing its temporary directory at once would
    race them (and they print tracebacks as the interpreter exits). Outside the main thread, a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        signal.raise_signal(signal.SIGINT)  # the previous handler's turn: a KeyboardInterrupt, as a rule


def save_orbax(model: GPTNeo, directory: Path) -> None:
    """Write the parameters into ``directory`` with Orbax; a Ctrl-C meanwhile takes effect when the write is
    done (and the atomic directory around it then removes it)."""
    import orbax.checkpoint as ocp

    with _ctrl_c_after(), _orbax_checkpointer() as checkpointer:
        checkpointer.save(directory, args=ocp.args.PyTreeSave(nnx.to_pure_dict(nnx.state(model, nnx.Param))))


class Checkpoints:
    """Fine-tuning checkpoints with Orbax's ``CheckpointManager``: the model's parameters, the optimizer
    state and the step (which also fixes the data position, see ``neo_jax.data``).

    Saves are asynchronous and happen every ``save_every`` steps (or when forced); the last ``keep`` are
    kept. Orbax writes each checkpoint into a temporary directory and renames it when complete, so one cut
    off mid-write (a killed process) is never listed: ``latest_step`` and ``restore`` see the previous one.
    Leftover temporary directories are removed when the manager opens. Every process of a multi-host run
    creates its own ``Checkpoints`` on the same directory; Orbax coordinates the writes. A full disk is one
    OSError naming the directory (Orbax's background threads would log a traceback each: those records go).
    """

    def __init__(self, directory, *, save_every: int = 1000, keep: int = 3, read_only: bool = False):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory).expanduser().absolute()
        for logger in (logging.getLogger("absl"), logging.getLogger("asyncio")):
            if not any(isinstance(f, _NoSpace) for f in logger.filters):
                logger.addFilter(_NoSpace())
        quiet = logging.getLogger("absl")  # read_only: Orbax warns that it overrides the save options it ignores
        level = quiet.level
        quiet.setLevel(logging.ERROR if read_only else level)
        try:
            options = ocp.CheckpointManagerOptions(
                save_interval_steps=save_every,
                max_to_keep=keep,
                cleanup_tmp_directories=not read_only,
                create=not read_only,
                read_only=read_only,
            )
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        finally:
            quiet.setLevel(level)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self, step: int, model: GPTNeo, optimizer: nnx.Optimizer, *, metadata: dict | None = None, force: bool = False
    ) -> bool:
        """Start saving (asynchronously) if ``step`` is a save step or ``force``; True if a save started.
        ``metadata`` (JSON) travels with it: the fine-tuning loop keeps the data position there. What trains
        is saved (what ``optimizer`` updates, its ``wrt``): with LoRA adapters, the adapters alone."""
        if not (force or self.manager.should_save(step)):
            return False
        params, state = nnx.to_pure_dict(nnx.state(model, optimizer.wrt)), nnx.to_pure_dict(nnx.state(optimizer))
        self._check_space(sum(x.nbytes for x in jax.tree.leaves((params, state))) // jax.process_count())
        args = self._ocp.args.Composite(
            params=self._ocp.args.PyTreeSave(params),
            optimizer=self._ocp.args.PyTreeSave(state),
            metadata=self._ocp.args.JsonSave(metadata or {}),
        )
        with self._disk_full_said():
            return self.manager.save(step, args=args, force=force)

    def metadata(self, step: int) -> dict:
        """The ``metadata`` saved with checkpoint ``step``."""
        restored = self.manager.restore(step, args=self._ocp.args.Composite(metadata=self._ocp.args.JsonRestore()))
        return dict(restored["metadata"])

    def params_directory(self, step: int) -> Path:
        """Where checkpoint ``step`` keeps the parameters (an Orbax PyTree, as ``from_pretrained`` reads)."""
        return self.directory / str(step) / "params"

    def restore(self, model: GPTNeo, optimizer: nnx.Optimizer, step: int | None = None) -> int:
        """Load checkpoint ``step`` (default: the latest complete one) into ``model`` and ``optimizer`` in
        place, keeping their dtypes and shardings; returns the step."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.manager.directory}")
        states = {"params": nnx.state(model, optimizer.wrt), "optimizer": nnx.state(optimizer)}
        restore = {}
        for name, state in states.items():
            target = nnx.to_pure_dict(state)
            restore[name] = self._ocp.args.PyTreeRestore(
                target, restore_args=self._ocp.checkpoint_utils.construct_restore_args(target)
            )
        restored = self.manager.restore(step, args=self._ocp.args.Composite(**restore))
        for name, state in states.items():
            nnx.replace_by_pure_dict(state, restored[name])
        nnx.update(model, states["params"])
        nnx.update(optimizer, states["optimizer"])
        return step

    def wait(self) -> None:
        """Block until every save in flight is complete."""
        with self._disk_full_said():
            self.manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()

    def _check_space(self, needed: int) -> None:
        """A save of ``needed`` bytes is refused before Orbax starts it when the disk has less free: it would
        fail in Orbax's writer threads, with the disk full for whatever else runs there."""
        free = shutil.disk_usage(self.directory).free
        if needed > free:
            self.wait()
            raise self._no_space(f"it takes {needed / 2**20:,.1f} MiB and {free / 2**20:,.1f} MiB are free; ")

    @contextmanager
    def _disk_full_said(self) -> Iterator[None]:
        """A save that found the disk full (Orbax raises it from its writer, as RESOURCE_EXHAUSTED) as one
        OSError that says so and names the directory."""
        try:
            yield
        except Exception as e:
            if not _NoSpace.about(str(e)):
                raise
            raise self._no_space() from None

    def _no_space(self, detail: str = "") -> OSError:
        return OSError(
            f"no space left on device writing a checkpoint in {self.directory}: {detail}free some space and run the "
            "same command again (it resumes from the last complete checkpoint)"
        )


class _NoSpace(logging.Filter):
    """Drops Orbax's log records of a full disk (an error and a traceback from each of its writer threads):
    ``Checkpoints`` raises the one error that matters."""

    @staticmethod
    def about(text: str) -> bool:
        return "No space left on device" in text or "os_error_code='28'" in text

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (self.about(record.getMessage()) or (error is not None and self.about(str(error))))
