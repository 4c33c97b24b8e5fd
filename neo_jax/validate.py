"""Checks of values that come from users (Python arguments, flags, YAML, config.json), each raising a
one-line ``ValueError`` that names the setting and what it must be. Used before any long work starts."""

from __future__ import annotations

import math
import numbers

import numpy as np


def integer(name: str, value, least: int | None = None, most: int | None = None) -> int:
    """``value`` as an ``int`` if it is an integer (not a bool, not a float such as 2.5 or 2.0) within
    ``[least, most]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if least is not None and value < least:
        raise ValueError(f"{name} must be >= {least}, got {value}")
    if most is not None and value > most:
        raise ValueError(f"{name} must be <= {most}, got {value}")
    return value


def real(name: str, value) -> float:
    """``value`` as a ``float`` if it is a finite number (not a bool, NaN or infinity); ranges are the caller's."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def token_ids(ids, vocab_size: int, name: str = "input_ids") -> np.ndarray:
    """``ids`` as an integer array whose values are all token ids of a ``vocab_size`` vocabulary."""
    ids = np.asarray(ids)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be integer token ids, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(
            f"{name} must be in [0, {vocab_size}) (the model's vocab_size), got values in [{ids.min()}, {ids.max()}]"
        )
    return ids


def attention_mask(mask, shape: tuple[int, ...], left_padded: bool = True) -> np.ndarray:
    """``mask`` ([batch, seq]) if it is 0/1, has a token in every row and, if ``left_padded`` (generation), is
    left-padded: each row's zeros come before its ones. Generation refuses right padding rather than follow it:
    it would continue after the padding. A forward pass takes padding on either side."""
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"attention_mask has shape {mask.shape} but input_ids has {tuple(shape)}")
    if mask.size == 0:
        return mask
    if not np.isin(mask, (0, 1)).all():
        raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (token), got values {np.unique(mask)[:5]}")
    right_padded = (np.diff(mask.astype(np.int8), axis=-1) < 0).any(axis=-1)
    if left_padded and right_padded.any():
        row = int(np.nonzero(right_padded)[0][0])
        raise ValueError(
            f"attention_mask row {row} has padding after a token: neo_jax takes left padding only (pad on the left, "
            "as generation needs; tokenizer.padding_side = 'left')"
        )
    if not mask.any(axis=-1).all():
        row = int(np.nonzero(~mask.any(axis=-1))[0][0])
        raise ValueError(f"row {row} is empty: its attention_mask is all zeros")
    return mask
