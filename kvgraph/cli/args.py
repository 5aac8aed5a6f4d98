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


def float_in(lo: float, hi: float, lo_open: bool = False, what: str = "") -> Callable[[str], float]:
    """An argparse type: a finite number in [lo, hi] ((lo, hi] when lo_open)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (lo < value if lo_open else lo <= value) or not value <= hi:
            raise argparse.ArgumentTypeError(f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}]{what}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


def backend_arg(text: str) -> str:
    """--backend: one of the CPU backends (a GPU name gets told there is none yet)."""
    name = text.strip().lower()
    if name in ("auto", "native", "torch", "numpy"):
        return name
    if name in ("cuda", "gpu", "metal", "vulkan", "rocm", "hip", "sycl", "opencl"):
        raise argparse.ArgumentTypeError(f"{text!r}: kvgraph has no GPU backend yet; it runs on the CPU with native "
                                         "(default), torch or numpy")
    raise argparse.ArgumentTypeError(f"unknown backend {text!r}; choose native, torch, numpy or auto")


def seed_arg(text: str) -> int:
    """--seed: 0 .. 2^64-1, or -1 for a random seed (llama.cpp's convention)."""
    return int_in(-1, (1 << 64) - 1, " (-1: random)")(text)


def port_arg(text: str) -> int:
    return int_in(0, 65535, " (0: any free port)")(text)


POSITIVE = int_in(1)
NON_NEGATIVE = int_in(0)
