"""Checks of hyperparameters, shared by adapters and strategies."""

from __future__ import annotations

import math
from typing import Any


def check_positive_int(name: str, value: Any) -> None:
    """Raises ``ValueError`` unless ``value`` is an int >= 1.

    Example:
        >>> check_positive_int("rank", 0)
        Traceback (most recent call last):
        ...
        ValueError: rank must be a positive int, got 0
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_dropout(value: Any, name: str = "dropout") -> None:
    """Raises ``ValueError`` unless ``value`` is a probability in [0, 1).

    Example:
        >>> check_dropout(1.5)
        Traceback (most recent call last):
        ...
        ValueError: dropout must be a number in [0, 1), got 1.5
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def check_finite(name: str, value: Any) -> None:
    """Raises ``ValueError`` unless ``value`` is a finite number.

    Example:
        >>> check_finite("alpha", float("inf"))
        Traceback (most recent call last):
        ...
        ValueError: alpha must be a finite number, got inf
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_probability(name: str, value: Any) -> None:
    """Raises ``ValueError`` unless ``value`` is a number in [0, 1].

    Example:
        >>> check_probability("stochastic_depth", -0.1)
        Traceback (most recent call last):
        ...
        ValueError: stochastic_depth must be a number in [0, 1], got -0.1
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
