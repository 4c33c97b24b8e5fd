"""Fine-tuning runs: ``neo-jax train`` and ``neo_jax.finetune.finetune``.

A run reads its settings (``FinetuneConfig``: a YAML file from ``configs/``, overridden by flags), checks
them and the data before any model loads, then trains with ``neo_jax.train.train_step`` and writes into
its output directory:

    OUTPUT/run.yaml          the settings
    OUTPUT/config.json       the model config, and the tokenizer files: OUTPUT is itself a model source
    OUTPUT/data/             raw text given as --data, tokenized once (``neo_jax.prepare``); a prepared
                             directory given as --data is read where it is
    OUTPUT/checkpoints/N/    Orbax checkpoints (parameters, optimizer state, data position)
    OUTPUT/metrics.jsonl     one JSON object per step: step, loss, lr, grad_norm, tokens_per_s, tokens_seen,
                             mfu, data_wait_s, seconds, and eval_loss, eval_perplexity on evaluation steps
    OUTPUT/loss.png          the loss curves, drawn at the end
    OUTPUT/tensorboard/      TensorBoard events, with ``tensorboard: true``
    OUTPUT/adapter/          with ``lora_rank``: the trained adapters in PEFT's format (at the end); the
                             checkpoints then hold the adapters and their optimizer state only

``model`` may also be a ``config.json`` (a file, or a directory holding only it, e.g.
``configs/gpt-neo-125M.json``): the run then pretrains from GPT-Neo's own random init
(``neo_jax.model.init_model``), with the tokenizer of its prepared data.

Running the same command again resumes from the latest complete checkpoint: a run cut off by SIGTERM (it
saves and exits 0), by kill -9 or by a crash continues on exactly the batch it would have seen, and
``metrics.jsonl`` keeps one line per step. ``from_pretrained(OUTPUT)`` and ``neo-jax convert OUTPUT DIR
--to hf`` read the latest checkpoint's parameters.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import jax
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from neo_jax import distributed, validate
from neo_jax.attention import check_implementation, choose
from neo_jax.checkpoints import TRAINING_DIR, Checkpoints
from neo_jax.config import DTYPES, REMAT, GPTNeoConfig
from neo_jax.settings import FinetuneConfig
from neo_jax.sharding import make_mesh, parse_mesh, place_batch, use_mesh
from neo_jax.source import RUN_FILE, Source, resolve
from neo_jax.train import learning_rate_schedule, make_optimizer, mean_loss, train_step

if TYPE_CHECKING:
    from neo_jax.labelled import LabelledData

CHECKPOINTS, METRICS, ADAPTER_DIR, DATA_DIR = TRAINING_DIR, "metrics.jsonl", "adapter", "data"
# Settings that decide which batch each step sees: a resumed run must keep them. (The data itself is checked
# by a fingerprint kept in every checkpoint, so the same files may be named by other paths.)
RESUME_KEYS = (
    "model",
    "task",
    "num_labels",
    "seq_len",
    "batch_size",
    "seed",
    "validation_fraction",
    "lora_rank",
    "lora_alpha",
    "lora_base",
    "lora_targets",
)


@dataclasses.dataclass(frozen=True)
class Checked:
    """What ``check`` resolved, once, for the run to use: the device mesh (by default every device on the fsdp
    axis); the model's source (with ``adapter`` on it, checked); the config the run trains and writes (a head's
    with its label names and padding id); the model's tokenizer, loaded once (None when the source has none);
    and a head run's examples, read and tokenized."""

    mesh: Mesh
    source: Source
    model_config: GPTNeoConfig
    tokenizer: Any
    examples: LabelledData | None


def check(config: FinetuneConfig) -> Checked:
    """Every setting that can be checked without reading a raw corpus or loading weights (a prepared data
    directory's manifest and shard sizes are checked against the model, a head's examples are read and
    tokenized), before anything is written."""
    positive = {"steps": 1, "batch_size": 1, "seq_len": 2, "grad_accum": 1, "save_every": 1, "keep": 1}
    for key, least in positive.items():
        if getattr(config, key) < least:
            raise ValueError(f"{key} must be >= {least}, got {getattr(config, key)}")
    for name, kind in FinetuneConfig.types().items():
        if kind is float:
            validate.real(name, getattr(config, name))
    for key in ("warmup", "eval_every", "weight_decay", "max_grad_norm", "final_lr"):
        if getattr(config, key) < 0:
            raise ValueError(f"{key} must be >= 0, got {getattr(config, key)}")
    for key in ("adam_b1", "adam_b2"):
        if not 0 <= getattr(config, key) < 1:
            raise ValueError(f"{key} must be in [0, 1), got {getattr(config, key)}")
    if not config.adam_eps > 0:
        raise ValueError(f"adam_eps must be > 0, got {config.adam_eps}")
    if not config.lr > 0:
        raise ValueError(f"lr must be > 0, got {config.lr}")
    if not 0 <= config.validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {config.validation_fraction}")
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {config.dtype!r}")
    if config.remat not in REMAT:
        raise ValueError(f"remat must be one of {REMAT}, got {config.remat!r}")
    check_implementation(config.attention)
    if config.lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0 (0: full fine-tuning), got {config.lora_rank}")
    config.lora()  # checks the LoRA settings
    if config.lora_base is not None and not (config.lora_rank or config.adapter):
        raise ValueError("lora_base is the frozen base of a LoRA run: give --lora-rank (or --adapter) with it")
    if config.batch_size % config.grad_accum:
        raise ValueError(
            f"batch_size {config.batch_size} does not split into grad_accum={config.grad_accum} micro-batches"
        )
    mesh = make_mesh(**parse_mesh(config.mesh)) if config.mesh else make_mesh(data=1, fsdp=-1)
    replicas, micro = mesh.shape["data"] * mesh.shape["fsdp"], config.batch_size // config.grad_accum
    if micro % replicas:
        raise ValueError(
            f"the micro-batch of {micro} rows (batch_size / grad_accum) does not divide over the "
            f"{replicas} data-parallel devices (mesh data x fsdp): make it a multiple of {replicas}"
        )
    if config.adapter is not None and config.lora_rank:
        raise ValueError("give --adapter (it brings its own rank, alpha and targets) or --lora-rank, not both")
    if config.num_labels is not None and config.task == "causal-lm":
        raise ValueError("num_labels is for --task sequence-classification or token-classification")
    if config.num_labels is not None and config.num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {config.num_labels}")
    if config.label_field is not None and config.task == "causal-lm":
        raise ValueError("label_field is for --task sequence-classification or token-classification")
    data = _data_files(config)
    source = resolve(config.model)
    if config.task != "causal-lm" and source.format == "config":
        raise ValueError(
            f"--task {config.task} trains a head on a trained model: give --model a checkpoint, not a config"
        )
    if config.adapter is not None:
        source = source.with_adapter(config.adapter)
    model_config = source.config
    dropouts = {name: getattr(model_config, name) for name in ("embed_dropout", "resid_dropout", "attention_dropout")}
    if any(dropouts.values()):
        raise ValueError(
            f"the model's config sets dropout ({', '.join(f'{k}={v}' for k, v in dropouts.items() if v)}), which "
            "neo_jax does not apply: it trains without dropout. Set them to 0 in a copy of the model's config.json "
            "to fine-tune without it"
        )
    if config.seq_len > model_config.max_position_embeddings:
        raise ValueError(
            f"seq_len {config.seq_len} is beyond the model's {model_config.max_position_embeddings} positions "
            "(max_position_embeddings): lower --seq-len"
        )
    _check_fits(config, model_config, mesh)
    if config.export_hf is not None:
        if jax.process_count() > 1:
            raise ValueError(
                "export_hf writes from one process: after a multi-host run use `neo-jax convert OUTPUT DIR --to hf`"
            )
        export = Path(config.export_hf).expanduser()
        if export.exists() and (not export.is_dir() or any(export.iterdir())):
            raise FileExistsError(f"export_hf {export} exists and is not an empty directory")
    tokenizer = _tokenizer(config, source)
    if config.task == "causal-lm":
        _check_data(config, source, data, tokenizer)
        model_config, examples = _causal_config(source.config), None
    else:
        examples, model_config = _examples(config, source, tokenizer)  # every example and label checked
    _check_output(config, model_config)
    return Checked(mesh, source, model_config, tokenizer, examples)


def _causal_config(model_config):
    """The config a causal LM run trains and writes: the source's, as a causal LM (a bare model gains its tied
    head)."""
    return (
        model_config
        if model_config.task in ("causal-lm", "feature-extraction")
        else model_config.with_task("causal-lm")
    )


def _tokenizer(config: FinetuneConfig, source: Source):
    """The model's tokenizer, loaded once for the whole run (None when the source has no tokenizer files: a
    config pretraining on prepared data); for words (token classification) with a space before each, as GPT-2's
    tokenizer needs for words given one by one."""
    from neo_jax.hf import load_tokenizer

    if source.tokenizer is None:
        if config.task != "causal-lm":
            raise ValueError(f"{config.model} has no tokenizer files to read the examples with: add them to it")
        return None
    options = {"add_prefix_space": True} if config.task == "token-classification" else {}
    return load_tokenizer(source.tokenizer, **options)


def _examples(config: FinetuneConfig, source: Source, tokenizer) -> tuple[LabelledData, GPTNeoConfig]:
    """A head run's JSONL examples, read, checked and tokenized, and the config the run trains and writes: the
    source's with the task's head, its label names from the data, and a padding id (the model's, else the
    tokenizer's, else its EOS, as is usual for GPT-2's tokenizer), which the tokenizer is given too."""
    from neo_jax.data import expand_paths
    from neo_jax.labelled import LabelledData, label_ids, read_examples

    inputs, labels, _, _ = read_examples(expand_paths(config.data), config.task, config.text_field, config.label_field)
    own = source.config.labels if source.config.task == config.task else None
    if own is not None and config.num_labels is not None and config.num_labels != len(own):
        raise ValueError(
            f"num_labels={config.num_labels} disagrees with {config.model}'s {config.task} head, which has "
            f"{len(own)} labels: leave num_labels out"
        )
    ids, names = label_ids(labels, own, config.num_labels)
    model_config = source.config.with_task(config.task, None if source.config.task == config.task else len(names))
    pad = model_config.pad_token_id
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
    examples = LabelledData(
        inputs,
        ids,
        tokenizer,
        config.task,
        seq_len=config.seq_len,
        pad_id=pad,
        seed=config.seed,
        validation=config.validation_fraction,
    )
    return examples, dataclasses.replace(model_config, labels=names, pad_token_id=pad)


def _check_fits(config: FinetuneConfig, model_config, mesh: Mesh) -> None:
    """The model's state fits a device, from the config's arithmetic, before anything is allocated or written:
    float32 weights, gradients and AdamW's two moments (16 bytes a parameter), or a LoRA run's frozen base in
    its dtype, split over the mesh's fsdp and tensor axes."""
    import numpy as np

    from neo_jax.sharding import check_fits

    lora = bool(config.lora_rank or config.adapter)
    per_parameter = (1 if config.lora_base == "int8" else np.dtype(config.dtype).itemsize) if lora else 16
    split = mesh.shape["fsdp"] * mesh.shape["tensor"]
    check_fits(
        f"the model's {model_config.num_params():,} parameters ({'frozen' if lora else 'weights, gradients, AdamW'})",
        model_config.num_params() * per_parameter / split,
        "check vocab_size, max_position_embeddings and the layer sizes in its config, or split it over more devices "
        "(--mesh with fsdp)",
    )


def prepared_directory(config: FinetuneConfig) -> Path | None:
    """The prepared data directory ``data`` names, or None for raw text (prepared into ``OUTPUT/data``)."""
    from neo_jax.data import is_prepared

    if len(config.data) == 1 and is_prepared(config.data[0]):
        return Path(config.data[0]).expanduser()
    return None


def _data_files(config: FinetuneConfig):
    """The data's files, checked before the model is looked at (a hub model may be a long download): the
    prepared directory's ``TokenData``, or None for raw text whose files exist."""
    from neo_jax.data import TokenData, expand_paths, is_prepared

    directory = prepared_directory(config)
    if directory is not None:
        return TokenData(directory)
    if any(is_prepared(pattern) for pattern in config.data):
        raise ValueError("a prepared data directory is read alone: pass it as the only --data")
    expand_paths(config.data)
    return None


def _check_data(config: FinetuneConfig, source: Source, data, tokenizer) -> None:
    """The data against the model: raw text needs a tokenizer; prepared data must fit the model's vocabulary
    (and tokenizer) and hold a batch."""
    from neo_jax.data import Batches

    if data is None:
        if tokenizer is None:
            kind = "a config" if source.format == "config" else "a model"
            raise ValueError(
                f"{config.model} is {kind} without a tokenizer to read raw text with: prepare the data first "
                "(neo-jax data prepare FILES... --tokenizer SRC --output DIR) and pass --data DIR"
            )
        return
    data.check_model(source.config, tokenizer)
    Batches(data, seq_len=config.seq_len, batch_size=config.batch_size, seed=config.seed)  # enough for a batch?


def _check_output(config: FinetuneConfig, model_config) -> None:
    """A new run goes into a new or empty ``output`` (or one holding only the data an interrupted start tokenized
    there); an existing run may only be resumed with its model and the settings that fix its batches (the data
    itself is checked against the checkpoint's fingerprint once it is read, before any write)."""
    output = Path(config.output).expanduser().absolute()
    existing = next(path for path in (output, *output.parents) if path.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"output {output} cannot be created: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"output {output} cannot be written: {existing} is not writable by this user")
    run_file = output / RUN_FILE
    if not run_file.exists():  # a new run: it writes config.json, tokenizer files, ... so DIR holds nothing else
        others = sorted(p.name for p in output.iterdir() if p.name != DATA_DIR) if output.is_dir() else []
        if others:
            raise FileExistsError(
                f"output {output} holds {others[0]!r} and no run ({RUN_FILE}): a new run goes into a new or empty "
                "directory (it would write over what is there), a resumed one into its own"
            )
        return
    import yaml

    if (output / "config.json").exists() and GPTNeoConfig.from_json_file(output / "config.json") != model_config:
        raise ValueError(
            f"{output} holds a run of a model with another architecture than {config.model}; resume it with its "
            "own model, or choose a new --output"
        )
    before = yaml.safe_load(run_file.read_text())
    defaults = FinetuneConfig.__dataclass_fields__  # runs written before a setting existed had its default
    before = {key: before.get(key, defaults[key].default) for key in RESUME_KEYS} | {"steps": before.get("steps")}
    changed = [key for key in RESUME_KEYS if before.get(key) != config.to_dict()[key]]
    if before.get("steps") != config.steps and not changed:
        distributed.log(
            f"steps changed from {before.get('steps')} to {config.steps}: the learning-rate schedule now ends "
            f"at step {config.steps}"
        )
    if changed:
        detail = ", ".join(f"{k}: {before.get(k)!r} -> {config.to_dict()[k]!r}" for k in changed)
        raise ValueError(
            f"{config.output} holds a run with other settings ({detail}); resume it with the same ones, "
            "or choose a new --output"
        )


@contextmanager
def _stop_signals():
    """A one-element list that becomes ``["SIGTERM"]`` on SIGTERM (TPU preemption) or ``["Ctrl-C"]`` on the
    first SIGINT, for the loop to save and stop cleanly. A second Ctrl-C ends the process at once with status
    130, as kill -9 would (a save in flight is left incomplete, and the next run resumes from the last
    complete checkpoint): raising KeyboardInterrupt wherever the main thread happens to be could leave an
    asynchronous checkpoint write waiting forever."""
    flag: list[str | None] = [None]
    names = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}
    previous = {}

    def handler(signum, frame):
        if signum == signal.SIGINT and flag[0] == "Ctrl-C":
            distributed.log("\nCtrl-C again: stopped at once, without saving; run the same command to resume")
            os._exit(130)
        flag[0] = flag[0] or names[signum]
        if signum == signal.SIGINT:
            distributed.log("\nCtrl-C: saving at the end of this step (press Ctrl-C again to stop at once)")

    try:
        for signum in names:
            previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread: no handler can be installed
        yield flag
        return
    try:
        yield flag
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


class Metrics:
    """``metrics.jsonl`` (and TensorBoard events), written by process 0."""

    def __init__(self, output: Path, tensorboard: bool):
        self.path = output / METRICS
        self.main = distributed.is_main_process()
        self.writer = None
        if tensorboard and self.main:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise ImportError("tensorboard: true needs tensorboardX: pip install 'neo_jax[train]'") from None
            self.writer = SummaryWriter(str(output / "tensorboard"))

    def keep_until(self, step: int) -> None:
        """Drop lines after ``step`` (steps a resumed run repeats), so each step is written once."""
        if not self.main or not self.path.exists():
            return
        kept = [line for line, record in _records(self.path) if record["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def tokens_seen(self, step: int) -> int:
        """The tokens trained on up to ``step``, as its line says."""
        records = [record for _, record in _records(self.path)] if step and self.path.exists() else []
        return next((r.get("tokens_seen", 0) for r in records if r["step"] == step), 0)

    def write(self, record: dict) -> None:
        if not self.main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _records(path: Path) -> list[tuple[str, dict]]:
    """The lines of ``metrics.jsonl`` with their records; a line cut off by a killed process is skipped."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:
            continue
    return out


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Training loss per step and evaluation loss where measured, from ``metrics.jsonl``. Without matplotlib
    (the ``train`` extra) the picture is skipped with a message; the metrics are all in the JSONL file."""
    try:
        import matplotlib
    except ImportError:
        distributed.log(f"{png_path.name} not drawn: it needs matplotlib (pip install 'neo_jax[train]')")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [record for _, record in _records(metrics_path)]
    evals = [r for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss", linewidth=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("next-token cross entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def _check_resumed_data(output: Path, fingerprint: str) -> None:
    """The data of a resumed run must be the data its latest checkpoint was trained on (read only: nothing in
    ``output`` is written or created)."""
    if not (output / CHECKPOINTS).is_dir():
        return
    saved = Checkpoints(output / CHECKPOINTS, read_only=True)
    try:
        step = saved.latest_step()
        if step and saved.metadata(step).get("fingerprint") != fingerprint:
            raise ValueError(
                f"the data differs from the data checkpoint {step} in {output / CHECKPOINTS} was trained on; "
                "resume with the same files, or choose a new --output"
            )
    finally:
        saved.close()


def _prepare_output(config: FinetuneConfig, model_config, tokenizer_source: Path, tokenizer) -> Path:
    """``run.yaml``, the model config and the tokenizer files in ``output`` (process 0): a head run's the
    tokenizer it was trained with (its padding token and, for words, the space before each), as transformers'
    ``run_classification`` and ``run_ner`` save theirs."""
    from neo_jax.hf import copy_companion_files

    output = Path(config.output).expanduser().absolute()
    if distributed.is_main_process():
        import yaml

        output.mkdir(parents=True, exist_ok=True)
        (output / RUN_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        model_config.to_json_file(output / "config.json")
        if tokenizer_source != output:
            copy_companion_files(tokenizer_source, output)
        if config.task != "causal-lm":
            tokenizer.save_pretrained(output)
    distributed.barrier("neo_jax.finetune.output")
    return output


def _prepare_raw(config: FinetuneConfig, tokenizer, output: Path) -> Path:
    """Raw text given as ``data``, tokenized once into ``OUTPUT/data`` (process 0 first; a host that does not
    see its directory, on a disk of its own, prepares its own identical copy). A resumed run reads what is
    there, after checking the sources' names and sizes are the ones it was prepared from."""
    from neo_jax.data import MANIFEST
    from neo_jax.prepare import describe_sources, prepare

    directory = output / DATA_DIR
    if (directory / MANIFEST).is_file():
        before = [(s["name"], s["size"]) for s in json.loads((directory / MANIFEST).read_text())["sources"]]
        now = [(s["name"], s["size"]) for s in describe_sources(config.data)]
        if before != now:
            raise ValueError(
                f"the data differs from the data {directory} was prepared from; resume with the same files, or "
                "choose a new --output"
            )
        return directory
    for turn in ("main", "others"):
        if (turn == "main") == distributed.is_main_process() and not (directory / MANIFEST).is_file():
            distributed.log(f"tokenizing the data once into {directory}")
            prepare(
                config.data,
                directory,
                tokenizer,
                num_proc=min(os.cpu_count() or 1, 8),
                validation_fraction=config.validation_fraction,
                text_field=config.text_field or "text",
                split=config.split,
                progress=distributed.is_main_process(),
            )
        distributed.barrier(f"neo_jax.finetune.data.{turn}")
    return directory


def _model(config: FinetuneConfig, checked: Checked, mesh, new_adapters, uses_lora: bool, progress: bool, created):
    """The model to train: GPT-Neo's init for a config, else the checkpoint's weights; new LoRA adapters on it.
    A failure here removes ``created`` (the run directory this call made), so the same command can run again."""
    from neo_jax.convert import from_pretrained

    source = checked.source
    scratch, model_config = source.format == "config", source.config
    try:
        if scratch:
            from neo_jax.model import init_model

            distributed.log(
                f"model: {model_config.num_params() / 1e6:.1f}M parameters from GPT-Neo's init (seed {config.seed})"
            )
            model = init_model(
                model_config, dtype=config.dtype, seed=config.seed, mesh=mesh, attention=config.attention
            )
        else:
            frozen_dtype = config.dtype if uses_lora else "float32"  # a frozen base may be stored in the compute dtype
            head = checked.model_config
            model = from_pretrained(
                source,
                dtype=config.dtype,
                param_dtype=frozen_dtype,
                weights=config.lora_base,  # ... or as lora_base says (int8: QLoRA-style)
                mesh=mesh,
                attention=config.attention,
                progress=progress,
                task=head.task,
                num_labels=head.num_labels if head.task != source.config.task and head.head_outputs else None,
            )
        if new_adapters is not None:  # PEFT's init, seeded by --seed: only they train and are saved
            from neo_jax.lora import add

            add(model, new_adapters, seed=config.seed)
    except Exception:
        if created is not None and distributed.is_main_process():
            shutil.rmtree(created, ignore_errors=True)
        raise
    return model


def finetune(config: FinetuneConfig, *, progress: bool = True) -> dict:
    """Train (or resume) the run ``config`` describes; returns the last step's metrics plus ``stopped``:
    "done", or "sigterm" / "sigint" when a SIGTERM / Ctrl-C cut it short after saving. A non-finite loss raises
    ``FloatingPointError`` naming the step, after the checkpoints in flight are complete."""
    checked = check(config)
    with _stop_signals() as stop:  # from here on SIGTERM (TPU preemption) or Ctrl-C stop the run cleanly
        return _train(config, checked, stop, progress)


class TextFeed:
    """A causal LM's batches: windows of the token shards (``neo_jax.data``), read ahead by a ``Loader``; its
    evaluation is the validation split's next-token loss."""

    def __init__(self, config: FinetuneConfig, directory: Path, mesh):
        from neo_jax.data import Batches, TokenData

        self.data = TokenData(directory)
        self.batches = Batches(self.data, seq_len=config.seq_len, batch_size=config.batch_size, seed=config.seed)
        self.mesh, self.loader, self.config = mesh, None, config
        self.fingerprint = self.batches.fingerprint()
        self.evaluates = self.data.validation.tokens >= config.seq_len
        self.description = (
            f"data: {directory}, {self.data.train.tokens:,} training tokens ({self.batches.windows:,} windows of "
            f"{config.seq_len}, {self.batches.steps_per_epoch:,} steps per epoch), {self.data.validation.tokens:,} "
            "validation tokens"
        ) + ("" if self.evaluates else f"; no validation split of {config.seq_len} tokens: training without evaluation")

    def start(self, step: int) -> None:
        from neo_jax.data import Loader

        self.loader = Loader(self.batches, self.mesh, start=step)

    def next(self, step: int) -> tuple[dict, float, tuple[int, int]]:
        """The step's ``train_step`` arguments, the seconds waited for them, and their (rows, width)."""
        batch, waited = cast(Any, self.loader).next()
        return {"input_ids": batch}, waited, (self.config.batch_size, self.config.seq_len)

    def evaluate(self, model) -> dict:
        loss = mean_loss(model, (place_batch(rows, self.mesh) for rows in self.batches.validation_batches()))
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()


class LabelledFeed:
    """A task head's batches (``neo_jax.labelled``), and its evaluation: loss, accuracy and macro-F1 on the
    held-out examples."""

    def __init__(self, config: FinetuneConfig, data, mesh):
        self.data, self.mesh, self.config = data, mesh, config
        self.fingerprint = data.fingerprint()
        self.evaluates = bool(data.validation)
        cut = f", {data.truncated} cut to {config.seq_len} tokens" if data.truncated else ""
        self.description = (
            f"data: {len(data.train):,} training and {len(data.validation):,} validation examples{cut}"
            + ("" if self.evaluates else "; none held out (validation_fraction 0): training without evaluation")
        )

    def start(self, step: int) -> None:
        pass

    def next(self, step: int) -> tuple[dict, float, tuple[int, int]]:
        began = time.perf_counter()
        ids, mask, labels = self.data.batch(self.data.step_indices(step, self.config.batch_size))
        args = {"input_ids": ids, "loss_mask": mask, "labels": labels}
        return {k: place_batch(v, self.mesh) for k, v in args.items()}, time.perf_counter() - began, ids.shape

    def evaluate(self, model) -> dict:
        import numpy as np

        from neo_jax.labelled import scores

        logits, labels = [], []
        rows = self.data.validation
        for first in range(0, len(rows), self.config.batch_size):
            ids, mask, target = self.data.batch(rows[first : first + self.config.batch_size])
            with use_mesh(self.mesh):
                out = _head_outputs(model, place_batch(ids, self.mesh), place_batch(mask, self.mesh))
            logits.append(np.asarray(out, np.float32).reshape(-1, out.shape[-1]))
            labels.append(target.reshape(-1))
        return scores(np.concatenate(logits), np.concatenate(labels))

    def close(self) -> None:
        pass


@nnx.jit
def _head_outputs(model, input_ids, attention_mask):
    return model(input_ids, attention_mask)


def _train(config: FinetuneConfig, checked: Checked, stop: list[str | None], progress: bool) -> dict:
    from neo_jax.convert import from_pretrained

    source, model_config = checked.source, checked.model_config
    mesh = checked.mesh if checked.mesh.size > 1 else None
    scratch = source.format == "config"
    output = Path(config.output).expanduser().absolute()
    directory = prepared_directory(config)
    created = not output.exists()
    try:
        if config.task != "causal-lm":
            feed: TextFeed | LabelledFeed = LabelledFeed(config, cast("LabelledData", checked.examples), mesh)
        else:
            if directory is None:  # raw text: tokenized once, into the run directory
                output.mkdir(parents=True, exist_ok=True)
                directory = _prepare_raw(config, checked.tokenizer, output)
            feed = TextFeed(config, directory, mesh)
        _check_resumed_data(output, feed.fingerprint)
    except ValueError:
        if created and distributed.is_main_process():  # bad data: leave nothing behind
            shutil.rmtree(output, ignore_errors=True)
        raise
    distributed.log(feed.description)
    new_adapters = config.lora()
    uses_lora = new_adapters is not None or config.adapter is not None
    model = _model(config, checked, mesh, new_adapters, uses_lora, progress, output if created else None)
    model.config = model_config  # a head's label names and padding id
    tokenizer_source = directory if scratch and directory is not None else source.require_directory()
    output = _prepare_output(config, model_config, tokenizer_source, checked.tokenizer)
    with use_mesh(mesh):
        chosen = choose(config.attention, config.seq_len, config.dtype)
    distributed.log(f"attention: {config.attention}" + (f" ({chosen})" if chosen != config.attention else ""))
    optimizer = make_optimizer(model, config.optimizer())
    schedule = learning_rate_schedule(config.optimizer())
    checkpoints = Checkpoints(output / CHECKPOINTS, save_every=config.save_every, keep=config.keep)
    metrics = Metrics(output, config.tensorboard)

    start = checkpoints.latest_step() or 0
    if start:
        checkpoints.restore(model, optimizer, start)
        distributed.log(f"resuming from step {start} (checkpoint in {output / CHECKPOINTS})")
    metrics.keep_until(start)
    if start >= config.steps:
        distributed.log(f"{output} is already trained to step {start}: raise --steps to go on")

    from neo_jax.aot import peak_flops, train_flops

    peak = peak_flops(mesh.devices.flat if mesh is not None else jax.devices()[:1], config.dtype)
    if start < config.steps:
        feed.start(start)
    record, stopped = {}, "done"
    tokens_seen = metrics.tokens_seen(start)  # a head's batches vary in width: counted as they come
    bar = tqdm(
        total=config.steps,
        initial=start,
        desc="training",
        unit="step",
        disable=not (progress and distributed.is_main_process()),
    )
    interrupted = distributed.any_process(bool(stop[0]))  # a signal while loading: stop before training
    step = start
    dropout_key = jax.random.key(config.seed)
    try:
        while start < config.steps and step < config.steps and not interrupted:
            step += 1
            began = time.perf_counter()
            batch, waited, (rows, width) = feed.next(step)
            out = train_step(
                model,
                optimizer,
                **batch,
                grad_accum=config.grad_accum,
                remat=config.remat,
                rng=jax.random.fold_in(dropout_key, step),  # LoRA dropout's masks: the same on a resume
            )
            loss, grad_norm = float(out["loss"]), float(out["grad_norm"])
            seconds = time.perf_counter() - began
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                checkpoints.wait()
                last = checkpoints.latest_step()
                kept = (
                    f"the last good checkpoint is step {last} in {output / CHECKPOINTS}" if last else "none saved yet"
                )
                raise FloatingPointError(
                    f"loss {loss} / gradient norm {grad_norm} at step {step}: stopped without saving it; {kept}. "
                    "Lower --lr (or raise --warmup) and run again to resume from there"
                )
            record = {
                "step": step,
                "loss": loss,
                "lr": float(jax.device_get(schedule(step - 1))),
                "grad_norm": grad_norm,
                "tokens_per_s": round(rows * width / seconds, 1),
                "tokens_seen": (tokens_seen := tokens_seen + rows * width),
                "mfu": round(train_flops(model_config, rows, width)[0] / seconds / peak, 5),
                "data_wait_s": round(waited, 5),
                "seconds": round(seconds, 4),
            }
            evaluates = (config.eval_every and step % config.eval_every == 0) or step == config.steps
            if evaluates and feed.evaluates:
                record |= feed.evaluate(model)
            metrics.write(record)
            shown = {"loss": f"{loss:.4f}", "tokens": f"{tokens_seen:.3g}", "mfu": f"{record['mfu']:.1%}"}
            shown |= {"wait": f"{waited:.3f}s"}
            shown |= {k[5:]: f"{v:.3f}" for k, v in record.items() if k in ("eval_accuracy", "eval_macro_f1")}
            bar.set_postfix(shown, refresh=False)
            bar.update()
            interrupted = distributed.any_process(bool(stop[0]))
            metadata = {"fingerprint": feed.fingerprint, "data": str(directory or config.data), "step": step}
            checkpoints.save(step, model, optimizer, metadata=metadata, force=interrupted or step == config.steps)
        if interrupted:
            stopped = "sigint" if stop[0] == "Ctrl-C" else "sigterm"
            distributed.log(
                f"\n{stop[0] or 'SIGTERM'}: stopped at step {step}, saved; run the same command again to resume"
            )
    finally:
        feed.close()
        bar.close()
        checkpoints.close()
        metrics.close()
    if stopped == "done" and distributed.is_main_process():
        plot_losses(output / METRICS, output / "loss.png")
        if uses_lora:  # the adapters in PEFT's format, for PeftModel or --adapter
            from neo_jax import peft

            peft.save(model, output / ADAPTER_DIR, base_model=config.model, overwrite=True)
            distributed.log(f"wrote the adapters in PEFT's format to {output / ADAPTER_DIR}")
    if stopped == "done" and config.export_hf is not None:
        from neo_jax.convert import save_pretrained

        if uses_lora:
            from neo_jax.lora import merge

            if config.lora_base == "int8":  # merge into the float base, as the adapters' users will
                model = from_pretrained(output, dtype=config.dtype, param_dtype=config.dtype, progress=progress)
            merge(model)
        elif scratch:  # read back from the run directory, whose tokenizer files the export then carries
            model = from_pretrained(output, dtype=config.dtype, progress=progress)
        save_pretrained(model, config.export_hf, format="hf", progress=progress)
        distributed.log(f"exported the model for transformers to {config.export_hf}")
    return record | {"stopped": stopped}
