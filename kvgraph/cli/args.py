"""Argument types shared by the commands: a bad value is argparse's one-line usage error (exit 2), never a
traceback."""
from __future__ import annotations

import argparse
from typing import Callable


def int_in(lo: int, hi: int | None = None, what: str = "") -> Callable[[str], int]:
    """An argparse type: an integer in [lo, hi] (hi None: no upper bound)."""
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            span = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            raise argparse.ArgumentTypeError(f"must be {span}{what}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def seed_arg(text: str) -> int:
    """--seed: 0 .. 2^64-1, or -1 for a random seed (llama.cpp's convention)."""
    return int_in(-1, (1 << 64) - 1, " (-1: random)")(text)


def port_arg(text: str) -> int:
    return int_in(0, 65535, " (0: any free port)")(text)


POSITIVE = int_in(1)
NON_NEGATIVE = int_in(0)
