"""Where a model comes from, resolved once.

``resolve(src)`` turns what a user names (a hub id, a Hugging Face directory, a neo_jax Orbax directory, a
``neo-jax train`` run, a ``config.json`` to start from GPT-Neo's init) into a ``Source``: a small frozen value
that says what it is (its config, its weight format, where its weights and tokenizer files are, a run's latest
step, the LoRA adapters and the base they need). ``from_pretrained``, ``neo-jax train``, ``serve``, ``eval``
and ``convert`` start from it, so the directory is looked at and ``config.json`` read once.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from neo_jax.checkpoints import ORBAX_DIR, TRAINING_DIR, Checkpoints, holds_int8
from neo_jax.config import GPTNeoConfig
from neo_jax.hf import BIN_INDEX, BIN_WEIGHTS, COMPANION_FILES, SAFE_INDEX, SAFE_WEIGHTS
from neo_jax.lora import LoRAConfig

FORMATS = ("hf", "orbax", "run", "config")
RUN_FILE = "run.yaml"  # a neo-jax train output's settings
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


@dataclasses.dataclass(frozen=True)
class Adapter:
    """LoRA adapters to put on a base: a PEFT directory (``format="peft"``, its ``tensors`` read and checked
    against the base once, as float32 arrays by name) or a LoRA run's latest checkpoint (``"orbax"``)."""

    directory: Path
    lora: LoRAConfig
    format: str
    tensors: dict | None = dataclasses.field(default=None, repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class Source:
    """A resolved model source.

    ``format``: "hf" (Hugging Face weights), "orbax" (``save_pretrained(format="orbax")``), "run" (a
    ``neo-jax train`` output: its latest checkpoint, ``step``) or "config" (a config alone: GPT-Neo's init).
    ``directory``: the local model directory, where its tokenizer and generation-config files are (None for a
    bare ``config.json`` file). ``weights``: where the weights are read from (None for "config", and for a LoRA
    run, whose weights are its ``base``'s plus its ``adapter``). ``int8``: stored as int8 weights."""

    name: str
    format: str
    config: GPTNeoConfig
    directory: Path | None
    weights: Path | None
    int8: bool = False
    step: int | None = None
    base: Source | None = None
    adapter: Adapter | None = None

    def require_directory(self) -> Path:
        """The model's directory; a bare ``config.json`` file has none to read weights or tokenizer files from."""
        if self.directory is None:
            raise _a_file(self.name)
        return self.directory

    @property
    def tokenizer(self) -> Path | None:
        """The directory holding the tokenizer files, if this source has them."""
        has = self.directory is not None and any((self.directory / name).is_file() for name in TOKENIZER_FILES)
        return self.directory if has else None

    def with_adapter(self, adapter: str | os.PathLike) -> Source:
        """This source with a PEFT adapter (a directory or hub id) on it, read and checked against the config
        now: before any weights of the base load."""
        from neo_jax import peft

        if self.adapter is not None:
            raise ValueError(f"{self.name} is a LoRA run and brings its own adapters: leave out the adapter")
        directory = local_directory(adapter)
        lora, tensors = peft.check_adapter(directory, self.config)
        return dataclasses.replace(self, adapter=Adapter(directory, lora, "peft", tensors))


def resolve(src: str | os.PathLike, revision: str | None = None) -> Source:
    """The ``Source`` that ``src`` names: a hub id (downloads config, weights and tokenizer files only), a local
    directory, a ``neo-jax train`` output, or a ``.json`` config file (GPT-Neo's init)."""
    path = Path(src).expanduser()
    if path.is_file() and path.suffix == ".json":
        return Source(str(src), "config", GPTNeoConfig.from_json_file(path), None, None)
    directory = local_directory(src, revision)
    if (directory / TRAINING_DIR).is_dir() and (directory / RUN_FILE).is_file():
        run = _lora_run(str(src), directory)
        if run is not None:
            return run
    if (directory / ORBAX_DIR).is_dir():
        params = directory / ORBAX_DIR
        return Source(str(src), "orbax", _config(directory), directory, params, int8=holds_int8(params))
    if (directory / TRAINING_DIR).is_dir():
        step, params = _latest(directory)
        return Source(str(src), "run", _config(directory), directory, params, step=step)
    kind = "hf" if holds_weights(directory) else "config"
    return Source(str(src), kind, _config(directory), directory, directory if kind == "hf" else None)


def local_directory(src: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory for ``src``: the directory itself, or a Hugging Face hub download."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise _a_file(path)
        return path
    if not is_hub_id(src):
        raise FileNotFoundError(f"{src} is neither an existing directory nor a Hugging Face hub id like 'org/name'")
    return _download(str(src), revision)


def _a_file(name) -> NotADirectoryError:
    return NotADirectoryError(f"{name} is a file; pass the directory holding config.json and the weights")


def is_hub_id(src: str | os.PathLike) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", str(src)) is not None


def config_of(src: str | os.PathLike, revision: str | None = None) -> GPTNeoConfig:
    """Only the config of ``src``, for a plan: a ``config.json`` file, a local directory's ``config.json``
    (a LoRA run's too: its base is not resolved, nor its checkpoints listed), or a hub id's ``config.json``
    alone (no weights are fetched)."""
    path = Path(src).expanduser()
    if path.is_file() and path.suffix == ".json":
        return GPTNeoConfig.from_json_file(path)
    if path.exists() or not is_hub_id(src):
        return _config(local_directory(src))
    from huggingface_hub import hf_hub_download

    return GPTNeoConfig.from_json_file(hf_hub_download(str(src), "config.json", revision=revision))


def holds_weights(directory: Path) -> bool:
    """Whether a model directory has weights (Hugging Face files, neo_jax's Orbax parameters or a training
    run's checkpoints), rather than a config alone."""
    names = (ORBAX_DIR, TRAINING_DIR, SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX, "adapter_config.json")
    return any((directory / name).exists() for name in names) or any(directory.glob("*.safetensors"))


def _config(directory: Path) -> GPTNeoConfig:
    return GPTNeoConfig.from_json_file(directory / "config.json")


def _latest(directory: Path) -> tuple[int, Path]:
    """A training run's latest complete checkpoint: (step, its parameters' directory)."""
    checkpoints = Checkpoints(directory / TRAINING_DIR, read_only=True)
    step = checkpoints.latest_step()
    if step is None:
        raise FileNotFoundError(f"{directory / TRAINING_DIR} holds no complete checkpoint yet")
    return step, checkpoints.params_directory(step)


def _lora_run(name: str, directory: Path) -> Source | None:
    """A ``neo-jax train`` run of LoRA adapters: its base, resolved, plus the adapters of its latest checkpoint;
    None for a full fine-tuning run."""
    import yaml

    from neo_jax.settings import FinetuneConfig

    run = yaml.safe_load((directory / RUN_FILE).read_text()) or {}
    if run.get("adapter"):  # a run that went on training a PEFT adapter
        from neo_jax.peft import read_config

        lora = read_config(local_directory(run["adapter"]))
    elif run.get("lora_rank"):
        lora = FinetuneConfig.load(**{k: v for k, v in run.items() if k in FinetuneConfig.fields()}).lora()
    else:
        lora = None
    if lora is None:  # a full fine-tuning run
        return None
    base = resolve(run["model"])
    step, params = _latest(directory)
    adapter = Adapter(params, lora, "orbax")
    config = _config(directory)  # the base's, with the head the run trained, if any
    return Source(name, "run", config, directory, None, step=step, base=base, adapter=adapter)


def _download(repo_id: str, revision: str | None) -> Path:
    """Fetch config, weights (safetensors if the repo has them, else .bin) and tokenizer files only."""
    from huggingface_hub import list_repo_files, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        files = list_repo_files(repo_id, revision=revision)
    except OfflineModeIsEnabled:
        files = None  # take whatever the local cache holds
    except Exception as e:
        # The hub cannot be reached (the HTTP client's own error, whichever client the hub library uses): the
        # local cache, as offline; snapshot_download says in one line if it lacks the model. An answer from the
        # hub (no such repository, no access) is the hub library's own error and goes on.
        if not type(e).__module__.startswith(("httpx", "requests", "urllib3")):
            raise
        files = None
    has_safetensors = files is None or any(f.endswith(".safetensors") for f in files)
    weights = ["*.safetensors", SAFE_INDEX] if has_safetensors else ["pytorch_model*.bin", BIN_INDEX]
    if files is None:
        weights += ["pytorch_model*.bin", BIN_INDEX]
    try:
        directory = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=["config.json", "adapter_config.json", *COMPANION_FILES, *weights],
        )
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{repo_id} cannot be downloaded: the Hugging Face hub cannot be reached and the model is not in the "
            "local cache; check the connection (or HF_ENDPOINT), or give a local directory"
        ) from None
    return Path(directory)
