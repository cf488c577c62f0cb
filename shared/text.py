"""How numbers read in sentences people get: 99999999, not 1e+08; 1 node, 2 nodes."""

from __future__ import annotations


def amount(value: float) -> str:
    """A resource amount as written: whole numbers in full, others to two decimals."""
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.2f}".rstrip("0").rstrip(".")


def count(number: int, word: str, plural: str | None = None) -> str:
    return f"{number} {word if number == 1 else plural or word + 's'}"
