"""GPT-Neo hyperparameters, read from and written to Hugging Face ``config.json``."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from neo_jax import validate

ATTENTION_KINDS = ("global", "local")
DTYPES = ("float32", "bfloat16")  # compute and storage dtypes of the command line and fine-tuning settings
WEIGHTS = ("float32", "bfloat16", "int8")  # inference weight formats (neo_jax.quantize)
REMAT = ("none", "full", "dots")  # activation recomputation in training (the policies: model.REMAT_POLICIES)
# EleutherAI's released sizes; configs/gpt-neo-*.json are these, written out (a test keeps them equal).
PRESETS = {
    "125M": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "attention_types": [[["global", "local"], 6]]},
    "1.3B": {"hidden_size": 2048, "num_layers": 24, "num_heads": 16, "attention_types": [[["global", "local"], 12]]},
    "2.7B": {"hidden_size": 2560, "num_layers": 32, "num_heads": 20, "attention_types": [[["global", "local"], 16]]},
}
INTEGER_FIELDS = ("vocab_size", "max_position_embeddings", "hidden_size", "num_layers", "num_heads", "window_size")
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
FLOAT_FIELDS = (
    *("resid_dropout", "embed_dropout", "attention_dropout", "classifier_dropout"),
    *("layer_norm_epsilon", "initializer_range"),
)
# Activations of transformers' ACT2FN that GPT-Neo checkpoints use or could use; see model.ACTIVATIONS.
ACTIVATION_NAMES = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu", "silu", "swish")
# What a model is for, and transformers' class for each (config.json's "architectures"): neo_jax.model.GPTNeo
# carries the matching head (none for the first two: the LM head is tied to the token embedding).
TASKS = {
    "causal-lm": "GPTNeoForCausalLM",
    "feature-extraction": "GPTNeoModel",
    "sequence-classification": "GPTNeoForSequenceClassification",
    "token-classification": "GPTNeoForTokenClassification",
    "question-answering": "GPTNeoForQuestionAnswering",
}
LABELLED_TASKS = ("sequence-classification", "token-classification")  # the tasks whose head has num_labels outputs


@dataclasses.dataclass(frozen=True)
class GPTNeoConfig:
    """Every GPT-Neo hyperparameter, with the defaults of transformers' ``GPTNeoConfig``.

    ``attention_types`` is the compact Hugging Face form, e.g. ``((("global", "local"), 12),)``;
    ``attention_layers`` is its per-layer expansion.
    """

    vocab_size: int = 50257
    max_position_embeddings: int = 2048
    hidden_size: int = 2048
    num_layers: int = 24
    attention_types: tuple = ((("global", "local"), 12),)
    num_heads: int = 16
    intermediate_size: int | None = None
    window_size: int = 256
    activation_function: str = "gelu_new"
    resid_dropout: float = 0.0
    embed_dropout: float = 0.0
    attention_dropout: float = 0.0
    classifier_dropout: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True
    # The task (TASKS) and, for a classifier, its label names by id (len = num_labels) and transformers'
    # problem_type. A model's compiled programs see only its ``architecture()``, in which the names are
    # placeholders: classifiers that differ only in label names share their programs.
    task: str = "causal-lm"
    labels: tuple = ("LABEL_0", "LABEL_1")
    problem_type: str | None = None

    def __post_init__(self):
        self._check_types()
        # Normalise lists (as JSON gives them) to tuples so the config stays hashable.
        types = tuple((tuple(kinds), repeat) for kinds, repeat in self.attention_types)
        object.__setattr__(self, "attention_types", types)
        object.__setattr__(self, "labels", tuple(self.labels))
        self.validate()

    # ----------------------------------------------------------------- derived values
    @property
    def attention_layers(self) -> tuple[str, ...]:
        """The attention kind of every layer, in order."""
        return tuple(kind for kinds, repeat in self.attention_types for _ in range(repeat) for kind in kinds)

    @property
    def layer_period(self) -> tuple[str, ...]:
        """The shortest pattern whose repetition gives ``attention_layers`` (the whole list if none)."""
        return shortest_period(self.attention_layers)

    def architecture(self) -> GPTNeoConfig:
        """This config with placeholder label names and no problem_type: what a compiled program depends on."""
        placeholders = tuple(f"LABEL_{i}" for i in range(self.num_labels))
        return dataclasses.replace(self, labels=placeholders, problem_type=None)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def head_outputs(self) -> int:
        """Outputs per token of the task's head (0: none, the tied LM head or the features themselves)."""
        return {"question-answering": 2}.get(self.task, self.num_labels if self.task in LABELLED_TASKS else 0)

    @property
    def num_periods(self) -> int:
        return self.num_layers // len(self.layer_period)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def inner_size(self) -> int:
        return self.intermediate_size if self.intermediate_size is not None else 4 * self.hidden_size

    def num_params(self) -> int:
        d, layers = self.hidden_size, self.num_layers
        per_layer = 4 * d * d + d + 2 * d * self.inner_size + self.inner_size + d + 4 * d
        return (self.vocab_size + self.max_position_embeddings) * d + layers * per_layer + 2 * d

    # ----------------------------------------------------------------- validation
    def _check_types(self) -> None:
        """Every field has its JSON type (a float where an integer belongs, a string for a number, a list for
        an object and the like are refused, never converted); the first that does not is a ValueError."""
        integer = lambda v: isinstance(v, int) and not isinstance(v, bool)
        number = lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        expected = {
            "an integer": (integer, INTEGER_FIELDS),
            "an integer or null": (lambda v: v is None or integer(v), ("intermediate_size", *TOKEN_ID_FIELDS)),
            "a finite number": (number, FLOAT_FIELDS),
            "true or false": (lambda v: isinstance(v, bool), ("use_cache", "tie_word_embeddings")),
            "a string": (lambda v: isinstance(v, str), ("activation_function", "task")),
            "a string or null": (lambda v: v is None or isinstance(v, str), ("problem_type",)),
        }
        for what, (ok, names) in expected.items():
            for name in names:
                if not ok(getattr(self, name)):
                    raise ValueError(f"Invalid GPT-Neo config: {name} must be {what}, got {getattr(self, name)!r}")
        pair = lambda p: (
            isinstance(p, list | tuple)
            and len(p) == 2
            and isinstance(p[0], list | tuple)
            and all(isinstance(kind, str) for kind in p[0])
            and integer(p[1])
            and p[1] >= 1
        )
        if not isinstance(self.attention_types, list | tuple) or not all(pair(p) for p in self.attention_types):
            raise ValueError(
                "Invalid GPT-Neo config: attention_types must be a list of [[kinds...], count] pairs with a whole "
                f'count >= 1, e.g. [[["global", "local"], 12]]; got {self.attention_types!r}'
            )
        if not isinstance(self.labels, list | tuple) or not all(isinstance(label, str) for label in self.labels):
            raise ValueError(f"Invalid GPT-Neo config: labels must be a list of label names, got {self.labels!r}")
        for name in TOKEN_ID_FIELDS:
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"Invalid GPT-Neo config: {name} must be >= 0 or null, got {getattr(self, name)}")

    def validate(self) -> None:
        problems = []
        for name in INTEGER_FIELDS:
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if problems:
            raise ValueError("Invalid GPT-Neo config: " + "; ".join(problems))
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            problems.append(f"intermediate_size must be positive or null, got {self.intermediate_size}")
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        unknown = sorted({kind for kinds, _ in self.attention_types for kind in kinds} - set(ATTENTION_KINDS))
        if unknown:
            problems.append(f"unknown attention type(s) {unknown}; GPT-Neo has only {list(ATTENTION_KINDS)}")
        if len(self.attention_layers) != self.num_layers:
            problems.append(
                f"attention_types {self.to_hf_dict()['attention_types']} expands to "
                f"{len(self.attention_layers)} layers but num_layers is {self.num_layers}"
            )
        if self.activation_function not in ACTIVATION_NAMES:
            problems.append(
                f"unknown activation_function {self.activation_function!r}; supported: {list(ACTIVATION_NAMES)}"
            )
        if not self.layer_norm_epsilon > 0:
            problems.append(f"layer_norm_epsilon must be positive, got {self.layer_norm_epsilon}")
        for name in ("resid_dropout", "embed_dropout", "attention_dropout", "classifier_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.initializer_range < 0:
            problems.append(f"initializer_range must be >= 0, got {self.initializer_range}")
        if self.task not in TASKS:
            problems.append(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if not self.labels:
            problems.append("a model needs at least one label (num_labels >= 1)")
        elif len(set(self.labels)) != len(self.labels):
            problems.append(f"label names must be distinct, got {list(self.labels)}")
        if not self.tie_word_embeddings:
            problems.append("tie_word_embeddings=false is not GPT-Neo: its LM head is tied to the token embedding")
        if problems:
            raise ValueError("Invalid GPT-Neo config: " + "; ".join(problems))

    # ----------------------------------------------------------------- Hugging Face config.json
    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> GPTNeoConfig:
        """Build from a Hugging Face ``config.json`` dict; unknown keys (``torch_dtype``, …) are ignored."""
        if not isinstance(data, dict):
            raise ValueError(f"a config must be a JSON object of settings, got {type(data).__name__}")
        model_type = data.get("model_type", "gpt_neo")
        if model_type != "gpt_neo":
            raise ValueError(f"config.json has model_type {model_type!r}; neo_jax reads only 'gpt_neo' models")
        data = dict(data)
        layers = data.get("attention_layers", [])
        if not (isinstance(layers, list | tuple) and all(isinstance(k, str) for k in layers)):
            raise ValueError(f"Invalid GPT-Neo config: attention_layers must be a list of kinds, got {layers!r}")
        data.setdefault("num_layers", data.get("num_hidden_layers", cls.num_layers))
        data.setdefault("num_heads", data.get("num_attention_heads", cls.num_heads))
        if "attention_types" not in data and "attention_layers" in data:
            data["attention_types"] = compress_attention_layers(data["attention_layers"])
        data["task"] = task_of(data.get("architectures"))
        data["labels"] = _labels(data)
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        if isinstance(kwargs.get("eos_token_id"), list):  # transformers allows several; the first is the one we stop on
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0] if kwargs["eos_token_id"] else None
        config = cls(**kwargs)
        if "attention_layers" in data and tuple(data["attention_layers"]) != config.attention_layers:
            raise ValueError(
                "Invalid GPT-Neo config: attention_layers and attention_types disagree "
                f"({list(data['attention_layers'])} vs {list(config.attention_layers)})"
            )
        return config

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict that transformers' ``GPTNeoConfig`` reads."""
        data = dataclasses.asdict(self)
        del data["task"], data["labels"]
        if data["problem_type"] is None:
            del data["problem_type"]
        data["attention_types"] = [[list(kinds), repeat] for kinds, repeat in self.attention_types]
        data["attention_layers"] = list(self.attention_layers)
        data["id2label"] = {str(i): label for i, label in enumerate(self.labels)}
        data["label2id"] = {label: i for i, label in enumerate(self.labels)}
        return {"architectures": [TASKS[self.task]], "model_type": "gpt_neo", **data}

    def with_task(self, task: str | None = None, num_labels: int | None = None) -> GPTNeoConfig:
        """This config for ``task`` (default: its own) with ``num_labels`` labels (default: its own if the task
        is its own, else 2, transformers' default), checked: ``num_labels`` only for a classifier, and equal to
        the checkpoint's own head when the task is the checkpoint's."""
        task = self.task if task is None else task
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        if num_labels is None:
            return self if task == self.task else dataclasses.replace(self, task=task, labels=("LABEL_0", "LABEL_1"))
        if task not in LABELLED_TASKS:
            raise ValueError(f"num_labels is for {' and '.join(LABELLED_TASKS)} models, not {task}: leave it out")
        num_labels = validate.integer("num_labels", num_labels, least=1)
        if task == self.task and num_labels != self.num_labels:
            raise ValueError(
                f"num_labels={num_labels} disagrees with the checkpoint's {task} head, which has {self.num_labels} "
                f"labels ({', '.join(self.labels)}): leave num_labels out, or start a new head from a causal-lm "
                "checkpoint"
            )
        if task == self.task:
            return self
        return dataclasses.replace(self, task=task, labels=tuple(f"LABEL_{i}" for i in range(num_labels)))

    @classmethod
    def preset(cls, name: str) -> GPTNeoConfig:
        """``"125M"``, ``"1.3B"`` or ``"2.7B"``: the published hyperparameters."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_json_file(cls, path: str | Path) -> GPTNeoConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); fix or re-download it") from None
        try:
            return cls.from_hf_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")


def task_of(architectures) -> str:
    """The task of a ``config.json``'s ``architectures`` (transformers' class names; "TF"/"Flax" variants
    too); causal-lm when it names none."""
    if architectures is None or architectures == []:
        return "causal-lm"
    tasks = {name: task for task, name in TASKS.items()}
    names = [str(name).removeprefix("TF").removeprefix("Flax") for name in (architectures or [])]
    known = [tasks[name] for name in names if name in tasks]
    if not isinstance(architectures, list) or not known:
        raise ValueError(
            f"Invalid GPT-Neo config: architectures {architectures!r} names none of transformers' GPT-Neo classes "
            f"({', '.join(TASKS.values())})"
        )
    return known[0]


def _labels(data: dict) -> tuple:
    """The label names by id of a ``config.json``: its ``id2label`` (keys are ids, as strings in JSON), else
    ``num_labels`` placeholder names, else transformers' default two."""
    id2label = data.get("id2label")
    if id2label is None:
        count = data.get("num_labels", 2)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"Invalid GPT-Neo config: num_labels must be a positive integer, got {count!r}")
        return tuple(f"LABEL_{i}" for i in range(count))
    try:
        ids = sorted((int(key), label) for key, label in id2label.items())
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"Invalid GPT-Neo config: id2label must map ids 0..n-1 to names, got {id2label!r}") from None
    if [i for i, _ in ids] != list(range(len(ids))):
        raise ValueError(f"Invalid GPT-Neo config: id2label must map ids 0..n-1 to names, got {id2label!r}")
    return tuple(str(label) for _, label in ids)


def shortest_period(layers) -> tuple[str, ...]:
    """The shortest prefix whose repetition gives ``layers`` (all of ``layers`` when nothing shorter does)."""
    layers = tuple(layers)
    for size in range(1, len(layers)):
        if len(layers) % size == 0 and layers == layers[:size] * (len(layers) // size):
            return layers[:size]
    return layers


def compress_attention_layers(layers) -> list:
    """``["global", "local", "global", "local"]`` -> ``[[["global", "local"], 2]]``."""
    period = shortest_period(layers)
    return [[list(period), len(layers) // len(period)]] if period else []
