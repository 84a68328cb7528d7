"""Architecture description: the layer protocol, the registry, text and JSON forms.

A spec is a :class:`Serial` of layers. Each layer *kind* is one class, defined
with everything that layer is in one module of :mod:`limitkernel.layers`: its
name and parameters (here, through :class:`Layer`), how it lowers into the
program that the kernels and finite networks run, its diagonal update, its
per-entry kernel and its finite-network forward and backward. This module owns
the registry of layer names (:func:`register`) and knows no layer kind itself,
so nothing it imports depends on the layers.

The text form reads like the network::

    3 * [dense(w_std=1.5, b_std=0.05), relu], dense(w_std=1.5, b_std=0.05)

``N * [ ... ]`` repeats a group, ``dense`` without arguments means
``w_std=1, b_std=0``, and ``str(spec)`` parses back to an equal spec.

Blocks hold branches in square brackets, separated by ``;``::

    dense, 20 * [residual(beta=0.5)[relu, dense]], layernorm, dropout(p=0.1), dense
    dense, parallel[relu, dense; erf, dense], relu, dense
    dense, concat(widths=1:3)[relu, dense; erf, dense], dense

``residual(alpha, beta)[f]`` is ``α·x + β·f(x)``, ``parallel[f; g]`` the sum
``f(x) + g(x)`` and ``concat[f; g]`` the concatenation of the branch outputs.
"""

import difflib
import json
import math
from typing import ClassVar

__all__ = [
    "PARAMETERIZATIONS",
    "REGISTRY",
    "Block",
    "Layer",
    "Serial",
    "SpecError",
    "as_spec",
    "from_json",
    "layer_from_name",
    "parse",
    "register",
    "serial",
    "to_json",
]

PARAMETERIZATIONS = ("ntk", "standard")

# Layer name -> class, filled by :func:`register` as the layer modules load
# (``import limitkernel`` loads them all).
REGISTRY = {}


def register(cls):
    """Class decorator: make a layer kind known to the parser by its ``name``
    (and its ``aliases``)."""
    for name in (cls.name, *getattr(cls, "aliases", ())):
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise RuntimeError(f"layer name {name!r} is registered twice")
        REGISTRY[name] = cls
    return cls


class SpecError(ValueError):
    """A spec that cannot be parsed or does not describe a valid network."""


class Layer:
    """A layer, described by its parameters.

    Subclasses set ``name`` (the word used in the text form) and
    ``defaults`` (parameter name -> default value, in text-form order). A layer
    kind also implements the protocol that :mod:`limitkernel.layers` documents
    (``lower`` and what its ops need); the spec itself only stores, checks,
    compares and prints parameters.
    """

    name = None
    defaults: ClassVar[dict] = {}
    takes_branches = False

    def __init__(self, **params):
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise SpecError(
                f"{self.name}: unknown parameter {unknown[0]!r}; "
                f"it takes {_describe_params(self.defaults)}"
            )
        values = dict(self.defaults)
        values.update(params)
        self.params = {k: self._check(k, v) for k, v in values.items()}

    def _check(self, key, value):
        default = self.defaults[key]
        if value is None and default is None:
            return None
        if isinstance(default, str):
            if not isinstance(value, str):
                raise SpecError(f"{self.name}: {key} must be a word, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{self.name}: {key} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise SpecError(f"{self.name}: {key} must be finite, got {value!r}")
        return value

    def __getattr__(self, key):
        params = self.__dict__.get("params", {})
        if key in params:
            return params[key]
        raise AttributeError(key)

    def __eq__(self, other):
        return type(self) is type(other) and self.params == other.params

    def __hash__(self):
        return hash((type(self).__name__, tuple(sorted(self.params.items(), key=str))))

    def __str__(self):
        shown = [
            f"{k}={_format_value(v)}"
            for k, v in self.params.items()
            if v != self.defaults[k]
        ]
        return f"{self.name}({', '.join(shown)})" if shown else self.name

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    def to_dict(self):
        return {"layer": self.name, **self.params}


class Block(Layer):
    """A layer made of branches, each a :class:`Serial` applied to the block input."""

    n_branches = None  # exact number of branches, or None for two or more
    takes_branches = True

    def __init__(self, branches, **params):
        super().__init__(**params)
        branches = [as_spec(b) for b in branches]
        if self.n_branches is not None and len(branches) != self.n_branches:
            raise SpecError(
                f"{self.name} takes {self.n_branches} branch, got {len(branches)}; "
                "for a sum of several branches use parallel[...; ...]"
            )
        if self.n_branches is None and len(branches) < 2:
            raise SpecError(
                f"{self.name} needs at least two branches separated by ';', got "
                f"{len(branches)}; for x + f(x) use residual[...]"
            )
        for index, branch in enumerate(branches):
            if not len(branch):
                raise SpecError(f"{self.name}: branch {index + 1} is empty; write "
                                "'identity' for a branch that passes its input on")
        self.branches = tuple(branches)

    @classmethod
    def from_branches(cls, branches, **params):
        """The block with these branches (a list of specs) and parameters."""
        return cls(*branches, **params)

    def __eq__(self, other):
        return super().__eq__(other) and self.branches == other.branches

    def __hash__(self):
        return hash((super().__hash__(), self.branches))

    def __str__(self):
        return f"{super().__str__()}[{'; '.join(str(b) for b in self.branches)}]"

    def __repr__(self):
        return f"parse({str(self)!r}).layers[0]"

    def to_dict(self):
        return {**super().to_dict(),
                "branches": [b.to_dict()["layers"] for b in self.branches]}


class Serial:
    """A network: layers applied in order. Nested serials are flattened."""

    def __init__(self, layers):
        flat = []
        for layer in layers:
            if isinstance(layer, Serial):
                flat.extend(layer.layers)
            elif isinstance(layer, Layer):
                flat.append(layer)
            else:
                raise SpecError(
                    f"a spec holds layers (Dense, activations, serial(...)), got {layer!r}"
                )
        self.layers = tuple(flat)

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    def __eq__(self, other):
        return isinstance(other, Serial) and self.layers == other.layers

    def __hash__(self):
        return hash(self.layers)

    def __str__(self):
        return _compress([str(layer) for layer in self.layers])

    def __repr__(self):
        return f"parse({str(self)!r})"

    def to_dict(self):
        return {"layers": [layer.to_dict() for layer in self.layers]}


def serial(*layers):
    """Chain layers (or other serials) into a network."""
    return Serial(layers)


def as_spec(spec):
    """Accept a Serial, a single layer, a list of layers, or the text form."""
    if isinstance(spec, Serial):
        return spec
    if isinstance(spec, Layer):
        return Serial([spec])
    if isinstance(spec, str):
        return parse(spec)
    if isinstance(spec, dict):
        return from_dict(spec)
    if isinstance(spec, (list, tuple)):
        return Serial(spec)
    raise SpecError(
        f"expected a spec (text such as 'dense, relu, dense', layer objects or "
        f"serial(...)), got {type(spec).__name__}"
    )


def _blocks():
    return sorted(name for name, cls in REGISTRY.items() if cls.takes_branches)


def layer_from_name(name, params, where="", branches=None):
    """Build the layer called ``name`` with keyword ``params`` (and ``branches``,
    a list of specs, for the blocks residual, parallel and concat)."""
    cls = REGISTRY.get(name)
    if cls is not None:
        unknown = sorted(set(params) - set(cls.defaults))
        if unknown:
            raise SpecError(f"{name}: unknown parameter {unknown[0]!r}{where}; "
                            f"it takes {_describe_params(cls.defaults)}")
        if cls.takes_branches:
            if branches is None:
                raise SpecError(f"{name}{where} needs its branches in brackets, e.g. "
                                f"'{name}[dense, relu, dense]'"
                                + ("" if cls.n_branches == 1 else
                                   f" or '{name}[relu, dense; erf, dense]'"))
            return cls.from_branches(branches, **params)
        if branches is not None:
            raise SpecError(f"{name}{where} takes no branches; only "
                            f"{', '.join(_blocks())} do")
        return cls(**params)
    ranked = sorted(sorted(REGISTRY),
                    key=lambda k: -difflib.SequenceMatcher(None, name, k).ratio())
    raise SpecError(
        f"unknown layer {name!r}{where}; known, closest first: {', '.join(ranked)}"
    )


# ---------------------------------------------------------------- text form


def _format_value(value):
    if isinstance(value, str):
        return value
    if isinstance(value, tuple):
        return ":".join(_format_value(v) for v in value)
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _describe_params(defaults):
    if not defaults:
        return "no parameters"
    return ", ".join(f"{k} (default {_format_value(v) if v is not None else 'none'})"
                     for k, v in defaults.items())


def _compress(items):
    """Join layer strings, folding a run of a repeated group into ``n * [...]``."""
    out, i, n = [], 0, len(items)
    while i < n:
        best = (1, 1)  # (group length, repeats)
        for size in range(1, (n - i) // 2 + 1):
            group = items[i:i + size]
            reps = 1
            while items[i + reps * size:i + (reps + 1) * size] == group:
                reps += 1
            if reps > 1 and size * reps > best[0] * best[1]:
                best = (size, reps)
        size, reps = best
        if reps > 1:
            out.append(f"{reps} * [{', '.join(items[i:i + size])}]")
        else:
            out.append(items[i])
        i += size * reps
    return ", ".join(out)


class _Parser:
    def __init__(self, text):
        self.text = text
        self.pos = 0

    def fail(self, expected):
        found = self.text[self.pos:self.pos + 12]
        found = repr(found) if found else "end of spec"
        lo = max(0, self.pos - 25)
        context = self.text[lo:self.pos] + " <HERE> " + self.text[self.pos:self.pos + 25]
        raise SpecError(
            f"bad spec at character {self.pos + 1}: expected {expected}, "
            f"found {found} (in {context.strip()!r})"
        )

    def skip(self):
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self):
        self.skip()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def eat(self, char, expected=None):
        if self.peek() != char:
            self.fail(expected or repr(char))
        self.pos += 1

    def word(self):
        self.skip()
        start = self.pos
        while self.pos < len(self.text) and (
            self.text[self.pos].isalnum() or self.text[self.pos] == "_"
        ):
            self.pos += 1
        return self.text[start:self.pos]

    def number(self):
        self.skip()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in "0123456789+-.eE":
            self.pos += 1
        token = self.text[start:self.pos]
        try:
            return float(token)
        except ValueError:
            self.pos = start
            self.fail("a number")

    def spec(self, closing=""):
        """Layers up to (not including) one of the characters in ``closing``."""
        items = list(self.element())
        while self.peek() == ",":
            self.pos += 1
            items.extend(self.element())
        char = self.peek()
        if (char not in closing or not char) if closing else char:
            self.fail("',' or " + (" or ".join(repr(c) for c in closing)
                                   if closing else "end of spec"))
        return items

    def element(self):
        char = self.peek()
        if char.isdigit():
            start = self.pos
            count = self.word()
            if not count.isdigit():
                self.pos = start
                self.fail("a repeat count such as '3 * [...]'")
            self.eat("*", "'*' after a repeat count")
            if self.peek() == "[":
                self.pos += 1
                group = self.spec("]")
                self.pos += 1
            else:
                group = self.layer()
            return group * int(count)
        if char == "[":
            self.pos += 1
            group = self.spec("]")
            self.pos += 1
            return group
        return self.layer()

    def layer(self):
        start = self.pos
        self.skip()
        start = self.pos
        name = self.word()
        if not name or not (name[0].isalpha() or name[0] == "_"):
            self.fail("a layer name such as 'dense' or 'relu'")
        params = {}
        if self.peek() == "(":
            self.pos += 1
            while self.peek() != ")":
                key = self.word()
                if not key:
                    self.fail("a parameter name or ')'")
                self.eat("=", f"'=' after parameter {key!r}")
                if self.peek().isalpha():
                    value = self.word()
                    is_number = value.lower() in ("nan", "inf", "infinity")
                    params[key] = float(value) if is_number else value
                else:
                    params[key] = self.number()
                    if self.peek() == ":":
                        values = [params[key]]
                        while self.peek() == ":":
                            self.pos += 1
                            values.append(self.number())
                        params[key] = tuple(values)
                if self.peek() == ",":
                    self.pos += 1
                elif self.peek() != ")":
                    self.fail("',' or ')' after a parameter")
            self.pos += 1
        branches = None
        if self.peek() == "[":
            if name not in REGISTRY or not REGISTRY[name].takes_branches:
                self.fail(f"',' after {name!r} ('[' follows only "
                          f"{', '.join(_blocks())})")
            self.pos += 1
            branches = [Serial(self.spec("];"))]
            while self.peek() == ";":
                self.pos += 1
                branches.append(Serial(self.spec("];")))
            self.pos += 1
        try:
            return [layer_from_name(name, params, f" at character {start + 1}", branches)]
        except SpecError as err:
            if "at character" in str(err):
                raise
            raise SpecError(f"{err} (layer at character {start + 1})") from None


def parse(text):
    """Parse the text form of a spec, e.g. ``'3 * [dense, relu], dense'``."""
    if not isinstance(text, str):
        raise SpecError(f"spec text must be a string, got {type(text).__name__}")
    stripped = text.strip()
    if stripped.startswith("{"):
        return from_json(stripped)
    if not stripped:
        raise SpecError("empty spec: give layers such as 'dense, relu, dense'")
    return Serial(_Parser(text).spec())


# ---------------------------------------------------------------- JSON form


def to_json(spec, indent=None):
    """JSON form: ``{"layers": [{"layer": "dense", "w_std": 1.5, ...}, ...]}``."""
    return json.dumps(as_spec(spec).to_dict(), indent=indent)


def from_dict(data):
    if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
        raise SpecError('a JSON spec is an object {"layers": [{"layer": "dense", ...}, ...]}')
    layers = []
    for index, entry in enumerate(data["layers"]):
        if not isinstance(entry, dict) or "layer" not in entry:
            raise SpecError(f'JSON spec layer {index}: expected {{"layer": NAME, ...}}, got {entry!r}')
        params = {k: v for k, v in entry.items() if k not in ("layer", "branches")}
        branches = entry.get("branches")
        if branches is not None:
            if not isinstance(branches, list) or not all(isinstance(b, list) for b in branches):
                raise SpecError(f"JSON spec layer {index}: 'branches' must be a list of "
                                f"layer lists, got {branches!r}")
            branches = [from_dict({"layers": b}) for b in branches]
        layers.append(layer_from_name(entry["layer"], params, f" (JSON layer {index})",
                                      branches))
    return Serial(layers)


def from_json(text):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise SpecError(f"bad JSON spec at character {err.pos + 1}: {err.msg}") from None
    return from_dict(data)
