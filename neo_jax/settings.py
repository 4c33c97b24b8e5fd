"""Fine-tuning settings (``FinetuneConfig``, and the optimizer's, ``OptimizerConfig``): the one place their names, types, defaults, help and checks of
form live. ``neo-jax train``'s flags are generated from it, and the YAML files in ``configs/`` use its
names."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

from neo_jax.config import DTYPES, REMAT, WEIGHTS


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay, global-norm clipping, and weight decay on the weight
    matrices only (never biases or LayerNorms; token/position embeddings when ``decay_embeddings``).
    Adam's defaults are PyTorch's (``betas=(0.9, 0.999)``, ``eps=1e-8``)."""

    learning_rate: float = 1e-4
    warmup_steps: int = 0
    total_steps: int = 0  # the cosine decays over total_steps - warmup_steps; 0 keeps the rate constant
    final_learning_rate: float = 0.0
    weight_decay: float = 0.0
    decay_embeddings: bool = False
    max_grad_norm: float = 0.0  # 0: no clipping
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


def setting(default, help: str, choices: tuple | None = None):
    """A ``FinetuneConfig`` field with its help text (and choices) for the generated flags."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Everything a fine-tuning run needs; the YAML files in ``configs/`` use these names. ``model``,
    ``data`` and ``output`` have no default: ``load`` requires them."""

    model: str = setting(
        None,
        "hub id, Hugging Face directory, Orbax directory or earlier train output; a config.json (or a directory "
        "holding only one) pretrains from GPT-Neo's init",
    )
    data: tuple[str, ...] = setting(
        None, "a directory from neo-jax data prepare, or text files, globs, .jsonl, saved datasets, hf:NAME[:CONFIG]"
    )
    output: str = setting(None, "run directory: checkpoints, metrics, loss.png")
    steps: int = setting(1000, "optimizer steps in all")
    batch_size: int = setting(8, "global batch in sequences, over every device and host")
    seq_len: int = setting(2048, "tokens per sequence")
    grad_accum: int = setting(1, "micro-batches per step (the batch is split into them)")
    lr: float = setting(5e-5, "peak learning rate")
    warmup: int = setting(100, "linear warmup steps, then cosine decay")
    final_lr: float = setting(5e-6, "learning rate the cosine decays to by the last step")
    weight_decay: float = setting(0.01, "AdamW decay of weight matrices")
    decay_embeddings: bool = setting(False, "decay the embeddings too")
    max_grad_norm: float = setting(1.0, "clip the gradient's global norm to this; 0: no clipping")
    adam_b1: float = setting(0.9, "AdamW's beta1")
    adam_b2: float = setting(0.999, "AdamW's beta2 (GPT-Neo was pretrained with 0.95)")
    adam_eps: float = setting(1e-8, "AdamW's epsilon")
    save_every: int = setting(500, "checkpoint every this many steps")
    keep: int = setting(3, "checkpoints kept")
    eval_every: int = setting(0, "validation loss every this many steps; 0: at the end only")
    validation_fraction: float = setting(
        0.01, "raw text: share of documents held out whole for validation (a prepared directory has its own split)"
    )
    seed: int = setting(0, "data order seed")
    dtype: str = setting(
        "bfloat16",
        "compute dtype; parameters and optimizer state stay float32 (a LoRA run's frozen base: this)",
        DTYPES,
    )
    remat: str = setting("none", "recompute activations in the backward pass", REMAT)
    attention: str = setting("auto", "attention: auto, dense, blockwise, splash (TPU), cudnn (GPU)")
    mesh: str | None = setting(None, "D,F,T data, fsdp and tensor sizes (default: every device on fsdp)")
    task: str = setting(
        "causal-lm",
        "what to train: the next-token loss, or a classifier head on JSONL examples",
        ("causal-lm", "sequence-classification", "token-classification"),
    )
    num_labels: int | None = setting(None, "a new head's outputs (default: the data's labels; 1: a regression head)")
    text_field: str | None = setting(
        None, "JSONL/dataset field holding the text (default: text; tokens, a list of words, for token-classification)"
    )
    label_field: str | None = setting(
        None, "JSONL field holding the label (default: label; tags, one per word, for token-classification)"
    )
    split: str = setting("train", "dataset split")
    tensorboard: bool = setting(False, "also write TensorBoard events")
    export_hf: str | None = setting(None, "at the end, write the model for transformers to this directory")
    topology: str | None = setting(None, "the TPU slice these settings are sized for (neo-jax plan --config)")
    lora_rank: int = setting(0, "LoRA: train rank-R adapters only, the base frozen (0: full fine-tuning)")
    lora_alpha: float = setting(8.0, "LoRA scaling: alpha / rank")
    lora_dropout: float = setting(0.0, "LoRA: dropout on the adapters' input in training, as PEFT's")
    lora_targets: str = setting("q_proj,v_proj", "LoRA: comma-separated layers to adapt (q_proj, k_proj, ...)")
    adapter: str | None = setting(None, "continue training this PEFT LoRA adapter (it brings its own settings)")
    lora_base: str | None = setting(
        None, "LoRA: the frozen base's weight format, int8 for QLoRA-style training (default: --dtype)", WEIGHTS
    )

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def types(cls) -> dict[str, type]:
        """Each setting's type, resolved from the annotations (``int | None``: int; None means the default)."""
        hints = typing.get_type_hints(cls)
        optional = lambda hint: [a for a in typing.get_args(hint) if a is not type(None)]
        return {name: optional(hint)[0] if len(optional(hint)) == 1 else hint for name, hint in hints.items()}

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides) -> FinetuneConfig:
        """Settings from a YAML file (optional), then ``overrides`` that are not None. A null in the file
        means the default; a mistake in a value is a ValueError naming the file (when it came from there),
        the setting and what it must be."""
        values = {}
        if path is not None:
            import yaml

            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"no config file {path}")
            try:
                values = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
            if not isinstance(values, dict):
                raise ValueError(f"{path} must hold a mapping of settings, not {type(values).__name__}")
            model = values.get("model")
            if isinstance(model, str) and not Path(model).is_absolute() and (path.parent / model).exists():
                values["model"] = str((path.parent / model).absolute())  # a config beside the YAML file
        given = {key: value for key, value in overrides.items() if value is not None}
        from_file = set(values) - set(given)
        values = {key: value for key, value in (values | given).items() if value is not None}
        unknown = sorted(set(values) - set(cls.fields()), key=str)
        if unknown:
            where = f"{path}: " if path else ""
            raise ValueError(f"{where}unknown setting(s) {unknown}; known: {', '.join(cls.fields())}")

        def bad(name: str, what: str) -> ValueError:
            return ValueError(f"{f'{path}: ' if name in from_file else ''}{name} must be {what}, got {values[name]!r}")

        types = cls.types()
        for name, kind in types.items():  # YAML reads 1e-4 as a string: numbers are converted here
            value = values.get(name)
            if kind not in (int, float, bool) or value is None:
                continue
            scalar = isinstance(value, str | int | float) and not isinstance(value, bool)
            if type(value) is not kind and (kind is bool or not scalar or (kind is int and isinstance(value, float))):
                raise bad(name, kind.__name__)
            try:
                values[name] = kind(value)
            except ValueError:
                raise bad(name, kind.__name__) from None
            if kind is float and not math.isfinite(values[name]):
                raise bad(name, "a finite number")
        missing = [key for key in ("model", "data", "output") if not values.get(key)]
        if missing:
            raise ValueError(f"missing setting(s) {missing}: pass --{' --'.join(missing)} or put them in the config")
        if isinstance(values["data"], str):
            values["data"] = [values["data"]]
        if not isinstance(values["data"], list | tuple) or not all(isinstance(d, str) and d for d in values["data"]):
            raise bad("data", "a file pattern or a list of them")
        values["data"] = tuple(values["data"])
        for name, kind in types.items():
            value = values.get(name)
            if kind is str and value is not None:
                if isinstance(value, bool) or not isinstance(value, str | int | float) or value == "":
                    raise bad(name, "a non-empty string")
                values[name] = str(value)
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"data": list(self.data)}

    def lora(self):
        """The ``neo_jax.lora.LoRAConfig`` of new adapters these settings ask for, or None (full fine-tuning,
        or an ``adapter`` that brings its own)."""
        if self.lora_rank == 0:
            return None
        from neo_jax.lora import LoRAConfig

        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        return LoRAConfig(r=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=targets)

    def optimizer(self):
        """The ``OptimizerConfig`` of these settings."""
        return OptimizerConfig(
            learning_rate=self.lr,
            warmup_steps=self.warmup,
            total_steps=self.steps,
            final_learning_rate=self.final_lr,
            weight_decay=self.weight_decay,
            decay_embeddings=self.decay_embeddings,
            max_grad_norm=self.max_grad_norm,
            b1=self.adam_b1,
            b2=self.adam_b2,
            eps=self.adam_eps,
        )
