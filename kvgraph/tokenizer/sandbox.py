"""The jinja2 sandbox chat templates render in (see chat.py): every step, string and call a template makes
is counted against its TemplateLimits."""
from __future__ import annotations

import contextvars
import functools
import json
import re
import time
import types
from datetime import datetime
from typing import Any, Callable

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from ..errors import short_repr
from .chat import DEFAULT_LIMITS, TemplateLimitError, TemplateLimits

# printf / str.format width or precision of 7+ digits: '%09999999d', '{:>9999999}'
_HUGE_FORMAT = re.compile(r"%[-#0 +]*(?:\d{7,}|\*)|%[-#0 +]*\d*\.\d{7,}|\{[^{}]*:[^{}]*\d{7,}[^{}]*\}")


class Budget:
    """The cost of the render running in this thread (contextvar BUDGET)."""

    def __init__(self, limits: TemplateLimits, chars: int):
        self.limits, self.chars = limits, chars
        self.left = limits.steps
        self.deadline = time.monotonic() + limits.seconds
        self.next_clock = self.left - 1024

    def tick(self, n: int = 1) -> None:
        self.left -= n
        if self.left < 0:
            raise TemplateLimitError(f"the chat template took more than {self.limits.steps:,} steps "
                                     "(loop iterations, calls and look-ups); it was stopped.")
        if self.left <= self.next_clock:
            self.next_clock = self.left - 1024
            self.clock()

    def clock(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"the chat template ran for more than {self.limits.seconds:g} s; it was "
                                     "stopped.")

    def size(self, n: int, what: str = "a string or list") -> None:
        if n > self.chars:
            raise TemplateLimitError(f"the chat template built {what} of {n:,} items, over the limit of "
                                     f"{self.chars:,}; it was stopped.")

    def result(self, value: Any) -> Any:
        if isinstance(value, types.GeneratorType):   # filters' lazy results: a plain list (no object repr)
            value = list(value)
        if isinstance(value, (str, list, tuple, dict)):
            self.size(len(value))
        return value

    def args(self, name: str, owner: Any, args: tuple, kwargs: dict) -> None:
        """Refuse arguments that would make one C-level call allocate without bound before it runs."""
        values = list(args) + list(kwargs.values())
        for v in values:
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > self.limits.chars:
                raise TemplateLimitError(f"the chat template passed {short_repr(v)} to {name!r}, over the limit "
                                         f"of {self.limits.chars:,}; it was stopped.")
        strs = ([owner] if isinstance(owner, str) else []) + [v for v in values if isinstance(v, str)]
        if name in ("format", "format_map") and strs and (_HUGE_FORMAT.search(strs[0]) or any(
                len(v) >= 7 and v.isdigit() for v in strs[1:])):
            raise TemplateLimitError("the chat template formats with a width or precision of millions of "
                                     "characters; it was stopped.")
        if name == "replace" and len(strs) >= 3:
            text, old, new = strs[:3]
            self.size(len(text) + (text.count(old) if old else len(text) + 1) * max(0, len(new) - len(old)))
        if name == "join" and strs:
            items = next((v for v in values if isinstance(v, (list, tuple, dict))), ())
            self.size(len(strs[0]) * max(0, len(items) - 1))


BUDGET: contextvars.ContextVar[Budget] = contextvars.ContextVar("kvgraph_template_budget")


def _budget() -> Budget:
    try:
        return BUDGET.get()
    except LookupError:   # a template object used outside ChatTemplate.render: the default limits
        b = Budget(DEFAULT_LIMITS, DEFAULT_LIMITS.chars)
        BUDGET.set(b)
        return b


class SafeFunction:
    """A callable handed to templates: calls go through, but printing it shows a name, never an object
    repr with a memory address."""

    def __init__(self, fn: Callable, name: str | None = None):
        self._fn, self._name = fn, name or getattr(fn, "__name__", "function")   # '_': out of the sandbox's reach

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<function {self._name}>"

    __str__ = __repr__


class _Cycler(jinja2.utils.Cycler):
    def __repr__(self) -> str:
        return "<cycler>"


class _Joiner(jinja2.utils.Joiner):
    def __repr__(self) -> str:
        return "<joiner>"


class _CountedIterable:
    """What every {% for %} iterates: the template's own sequence, one step per item."""

    def __init__(self, iterable: Any):
        self.iterable = iterable

    def __iter__(self):
        b = _budget()
        for item in self.iterable:
            b.tick()
            yield item

    def __len__(self) -> int:
        return len(self.iterable)


def _sized(value: Any) -> Any:
    return _budget().result(value)


def _range(*args: int) -> range:
    r = range(*args)
    _budget().tick(len(r))   # charged up front: nested ranges cost their product
    return r


def _bounded_filter(name: str, f: Callable) -> Callable:
    @functools.wraps(f)   # keeps jinja's pass_context / pass_eval_context marker
    def run(*args, **kwargs):
        b = _budget()
        b.tick()
        b.args(name, None, args, kwargs)
        return b.result(f(*args, **kwargs))
    return run


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox with a cost bound on everything a template can do (see TemplateLimits)
    and no object reprs (memory addresses) in what it prints."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        # The stock sandbox returns an Undefined that prints as ''; a template probing internals is hostile
        # or broken either way, so fail loudly.
        raise jinja2.sandbox.SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} is unsafe")

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        b = _budget()
        b.tick()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    b.size(len(seq) * max(n, 0))
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            if max(1, abs(left).bit_length()) * right > 1 << 16:
                raise TemplateLimitError("the chat template computes a power of tens of thousands of digits; "
                                         "it was stopped.")
        elif operator == "%" and isinstance(left, str) and _HUGE_FORMAT.search(left):
            raise TemplateLimitError("the chat template formats with a width or precision of millions of "
                                     "characters; it was stopped.")
        elif operator == "+" and isinstance(left, jinja2.Undefined) != isinstance(right, jinja2.Undefined) \
                and isinstance(right if isinstance(left, jinja2.Undefined) else left, str):
            # text + an undefined variable is the text, as llama.cpp's template engine renders it (templates
            # written for it, such as firefunction's `... + functions` without tools, rely on that)
            return left if isinstance(right, jinja2.Undefined) else right
        return b.result(super().call_binop(context, operator, left, right))

    def getattr(self, obj: Any, attribute: str) -> Any:
        _budget().tick()
        return _no_repr(super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        _budget().tick()
        return _no_repr(super().getitem(obj, argument))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        fn = __obj._fn if isinstance(__obj, SafeFunction) else __obj
        b = _budget()
        b.tick()
        owner = getattr(fn, "__self__", None) or getattr(getattr(fn, "__wrapped__", None), "__self__", None)
        name = __obj._name if isinstance(__obj, SafeFunction) else getattr(fn, "__name__", "")
        b.args(name, owner, args, kwargs)
        return b.result(super().call(__context, fn, *args, **kwargs))


def _no_repr(value: Any) -> Any:
    """Methods and functions a template reaches by attribute are handed over as SafeFunction."""
    if isinstance(value, (types.BuiltinMethodType, types.MethodType, types.FunctionType)):
        return SafeFunction(value)
    return value


def _finalize(value: Any) -> Any:
    """What {{ ... }} prints: plain values as they are, anything else by its type name only."""
    if value is None or isinstance(value, (str, int, float, list, tuple, dict, jinja2.Undefined)):
        return value
    if callable(value) and not isinstance(value, (SafeFunction, type)):
        return f"<{type(value).__name__}>"
    return value


class BoundLoops(NodeTransformer):
    """Every for-loop iterates through _CountedIterable and every ~ concatenation is size-checked: the two costs a
    template can run up without a call, a look-up or an operator, which the sandbox hooks count."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = _global_call("__kvg_counted", node.iter)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        return _global_call("__kvg_sized", self.generic_visit(node))


def _global_call(name: str, arg: nodes.Expr) -> nodes.Call:
    return nodes.Call(nodes.Name(name, "load", lineno=arg.lineno), [arg], [], None, None, lineno=arg.lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def environment() -> ImmutableSandboxedEnvironment:
    # Same settings as transformers' chat template renderer, so templates written for HF render identically.
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols],
                          finalize=_finalize)
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    del env.globals["lipsum"]          # lorem ipsum generator: unbounded, and no template needs it
    env.globals.update(
        range=SafeFunction(_range, "range"), cycler=_Cycler, joiner=_Joiner,
        raise_exception=SafeFunction(_raise_exception, "raise_exception"),
        strftime_now=SafeFunction(_strftime_now, "strftime_now"),
        __kvg_counted=_CountedIterable, __kvg_sized=_sized)
    return env
