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

A word-valued parameter is written bare or quoted, alike::

    dense(parameterization=standard, width=512), relu, dense(parameterization='standard')

A spec holds at most :data:`MAX_LAYERS` layers once its repeats are expanded
(counting the layers inside blocks) and nests brackets at most
:data:`MAX_NESTING` deep; numeric parameters are real numbers of magnitude at
most :data:`MAX_PARAMETER` (the kernels square them).
"""

import difflib
import json
import math
import numbers
from typing import ClassVar

import numpy as np

__all__ = [
    "MAX_LAYERS",
    "MAX_NESTING",
    "MAX_PARAMETER",
    "PARAMETERIZATIONS",
    "REGISTRY",
    "Block",
    "Layer",
    "Serial",
    "SpecError",
    "as_spec",
    "check_number",
    "from_json",
    "layer_from_name",
    "parse",
    "register",
    "serial",
    "to_json",
]

PARAMETERIZATIONS = ("ntk", "standard")

# Layers a spec may hold once its repeats are expanded, counting those inside
# blocks: far beyond any network whose kernel is worth computing, and small
# enough that a mistyped repeat count fails at once instead of filling memory.
MAX_LAYERS = 100_000

# Brackets (groups and blocks) a spec may nest.
MAX_NESTING = 50

# Largest magnitude of a numeric parameter. The kernels square parameters
# (σ_w², α², b²...), and a square overflows float64 above about 1.34e154.
MAX_PARAMETER = 1e150

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
        for key, value in self.params.items():
            for number in value if isinstance(value, tuple) else (value,):
                if isinstance(number, float):
                    _check_magnitude(self.name, key, number)

    # Layers this one counts for (itself and those inside its branches) and the
    # depth of blocks nested in it: what MAX_LAYERS and MAX_NESTING bound.
    _count = 1
    _nesting = 0

    def _check(self, key, value):
        """The stored form of parameter ``key``: a word, or a float checked by
        :func:`check_number`."""
        default = self.defaults[key]
        if value is None and default is None:
            return None
        if isinstance(default, str):
            if not isinstance(value, str):
                raise SpecError(f"{self.name}: {key} must be a word such as {default!r}, "
                                f"got {value!r}")
            return value
        return check_number(self.name, key, value)

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
        self._nesting = 1 + max(b._nesting for b in branches)
        if self._nesting > MAX_NESTING:
            raise SpecError(f"{self.name}: blocks nest {self._nesting} deep, more than the "
                            f"{MAX_NESTING} a spec may nest; flatten the architecture")
        self._count = 1 + sum(b._count for b in branches)
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
        flat, count = [], 0
        for layer in layers:
            if isinstance(layer, Serial):
                flat.extend(layer.layers)
            elif isinstance(layer, Layer):
                flat.append(layer)
            else:
                raise SpecError(
                    f"a spec holds layers (Dense, activations, serial(...)), got "
                    f"{_short_repr(layer)}"
                )
            count += layer._count
            if count > MAX_LAYERS:
                raise SpecError(_too_many_layers(f"at least {count}"))
        self.layers = tuple(flat)
        self._count = count
        self._nesting = max((layer._nesting for layer in flat), default=0)

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


def _too_many_layers(count):
    return (f"the spec has {count} layers (after expanding repeats, counting those "
            f"inside blocks), more than the {MAX_LAYERS} a spec may hold; check the "
            "repeat counts")


def _short_repr(value, limit=60):
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_number(layer, key, value):
    """``value`` as a finite float of magnitude at most :data:`MAX_PARAMETER`.

    Any real number is accepted (Python or numpy ints and floats, fractions);
    booleans, complex numbers, strings and other objects are refused with a
    :class:`SpecError` naming ``layer`` and ``key``.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        kind = ("a complex" if isinstance(value, numbers.Complex)
                and not isinstance(value, (bool, np.bool_)) else f"a {type(value).__name__}")
        raise SpecError(f"{layer}: {key} must be a real number, got {kind} "
                        f"({_short_repr(value)})")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf if value > 0 else -math.inf
    if math.isnan(number):
        raise SpecError(f"{layer}: {key} must be finite, got nan")
    _check_magnitude(layer, key, number)
    return number


def _check_magnitude(layer, key, number):
    if not math.isfinite(number):
        raise SpecError(f"{layer}: {key} must be finite, got {number!r}")
    if abs(number) > MAX_PARAMETER:
        raise SpecError(
            f"{layer}: {key}={number:.3g} is too large: the kernels square it, which "
            f"overflows float64; lower {key} to at most {MAX_PARAMETER:g} in magnitude"
        )


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
    if not isinstance(name, str):
        raise SpecError(f"a layer name is a string such as 'dense'{where}, got "
                        f"{_short_repr(name)}")
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

_NUMBER_WORDS = ("nan", "inf", "infinity")

# Longest group that str() looks for when it folds repeats into ``n * [...]``:
# the search costs O(n · _MAX_GROUP) for n layers.
_MAX_GROUP = 256


def _is_word(text):
    """Whether ``text`` reads back as a bare word (not a number, not quoted)."""
    return (bool(text) and (text[0].isalpha() or text[0] == "_")
            and all(c.isalnum() or c == "_" for c in text)
            and text.lower() not in _NUMBER_WORDS)


def _format_value(value):
    if isinstance(value, str):
        if _is_word(value):
            return value
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
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


def _run_lengths(eq):
    """For each j, how many consecutive entries of the bool array ``eq`` from j are True."""
    index = np.arange(len(eq))
    stop = np.where(eq, len(eq), index)
    return np.minimum.accumulate(stop[::-1])[::-1] - index


def _compress(items):
    """Join layer strings, folding a run of a repeated group into ``n * [...]``.

    Greedy from the left: at each position the group (of at most ``_MAX_GROUP``
    layers; the shortest among equals) whose repeats cover the most layers is
    folded, and the group itself is folded the same way. The search compares
    the sequence with itself shifted by each group length, in O(n) vectorised
    steps per length, so the whole costs O(n · _MAX_GROUP).
    """
    n = len(items)
    if n < 2:
        return ", ".join(items)
    ids = {}
    codes = np.fromiter((ids.setdefault(item, len(ids)) for item in items),
                        dtype=np.int64, count=n)
    cover = np.ones(n, dtype=np.int64)  # layers covered by the best fold from i
    size = np.ones(n, dtype=np.int64)   # its group length
    if len(ids) < n:
        for length in range(1, min(_MAX_GROUP, n // 2) + 1):
            run = _run_lengths(codes[:-length] == codes[length:])
            covered = length * (1 + run // length)
            better = (covered > length) & (covered > cover[:n - length])
            cover[:n - length][better] = covered[better]
            size[:n - length][better] = length
    out, i = [], 0
    while i < n:
        if cover[i] > 1:
            length = int(size[i])
            out.append(f"{int(cover[i]) // length} * "
                       f"[{_compress(items[i:i + length])}]")
            i += int(cover[i])
        else:
            out.append(items[i])
            i += 1
    return ", ".join(out)


def _count(layers):
    return sum(layer._count for layer in layers)


class _Parser:
    def __init__(self, text):
        self.text = text
        self.pos = 0
        self.depth = 0

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

    def digits(self):
        self.skip()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in "0123456789":
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

    def quoted(self):
        """A string in single or double quotes; a backslash escapes the next character."""
        quote = self.text[self.pos]
        start = self.pos
        self.pos += 1
        chars = []
        while self.pos < len(self.text) and self.text[self.pos] != quote:
            if self.text[self.pos] == "\\" and self.pos + 1 < len(self.text):
                self.pos += 1
            chars.append(self.text[self.pos])
            self.pos += 1
        if self.pos >= len(self.text):
            self.pos = start
            self.fail(f"a closing {quote} for the string that starts here")
        self.pos += 1
        return "".join(chars)

    def open_bracket(self):
        """Step past '[' into one more level of nesting."""
        if self.depth >= MAX_NESTING:
            raise SpecError(f"bad spec at character {self.pos + 1}: brackets nest more than "
                            f"{MAX_NESTING} deep; flatten the architecture")
        self.depth += 1
        self.pos += 1

    def close_bracket(self):
        self.depth -= 1
        self.pos += 1

    def spec(self, closing=""):
        """Layers up to (not including) one of the characters in ``closing``."""
        items = list(self.element())
        count = _count(items)
        while self.peek() == ",":
            self.pos += 1
            more = self.element()
            count += _count(more)
            if count > MAX_LAYERS:
                raise SpecError(f"bad spec at character {self.pos}: "
                                + _too_many_layers(f"at least {count}"))
            items.extend(more)
        char = self.peek()
        if (char not in closing or not char) if closing else char:
            self.fail("',' or " + (" or ".join(repr(c) for c in closing)
                                   if closing else "end of spec"))
        return items

    def element(self):
        char = self.peek()
        if char and char in "0123456789":
            start = self.pos
            count = self.digits()
            if self.text[self.pos:self.pos + 1].isalnum():
                self.pos = start
                self.fail("a repeat count such as '3 * [...]'")
            self.eat("*", "'*' after a repeat count")
            if self.peek() == "[":
                self.open_bracket()
                group = self.spec("]")
                self.close_bracket()
            else:
                group = self.layer()
            size = _count(group)
            # The count is checked before the group is repeated (and before the
            # digits become a number, which Python limits to 4300 digits).
            significant = count.lstrip("0")
            if size and (len(significant) > len(str(MAX_LAYERS))
                         or int(count) * size > MAX_LAYERS):
                raise SpecError(
                    f"bad spec at character {start + 1}: the repeat {count} * [...] of "
                    f"{size} layer(s) gives more than the {MAX_LAYERS} layers a spec may "
                    "hold; check the repeat count"
                )
            return group * int(count) if size else []
        if char == "[":
            self.open_bracket()
            group = self.spec("]")
            self.close_bracket()
            return group
        return self.layer()

    def value(self, key):
        """A parameter value: a number, numbers joined by ':', a word or a quoted string."""
        char = self.peek()
        if char in ("'", '"'):
            return self.quoted()
        if char.isalpha() or char == "_":
            value = self.word()
            return float(value) if value.lower() in _NUMBER_WORDS else value
        value = self.number()
        if self.peek() != ":":
            return value
        values = [value]
        while self.peek() == ":":
            self.pos += 1
            values.append(self.number())
        return tuple(values)

    def layer(self):
        self.skip()
        start = self.pos
        name = self.word()
        if not name or not (name[0].isalpha() or name[0] == "_"):
            self.fail("a layer name such as 'dense' or 'relu'")
        params = {}
        if self.peek() == "(":
            self.pos += 1
            while self.peek() != ")":
                self.skip()
                at = self.pos
                key = self.word()
                if not key:
                    self.fail("a parameter name or ')'")
                if key in params:
                    raise SpecError(f"{name}: parameter {key!r} is given twice (again at "
                                    f"character {at + 1}); give each parameter once")
                self.eat("=", f"'=' after parameter {key!r}")
                params[key] = self.value(key)
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
            self.open_bracket()
            branches = [Serial(self.spec("];"))]
            while self.peek() == ";":
                self.pos += 1
                branches.append(Serial(self.spec("];")))
            self.close_bracket()
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
    return _not_empty(Serial(_Parser(text).spec()), " (a repeat count of 0 leaves none)")


def _not_empty(spec, why=""):
    if not len(spec):
        raise SpecError(f"the spec has no layers{why}; give layers such as "
                        "'dense, relu, dense'")
    return spec


# ---------------------------------------------------------------- JSON form


def to_json(spec, indent=None):
    """JSON form: ``{"layers": [{"layer": "dense", "w_std": 1.5, ...}, ...]}``."""
    return json.dumps(as_spec(spec).to_dict(), indent=indent)


def from_dict(data, _depth=0):
    """The spec of a JSON object ``{"layers": [{"layer": NAME, ...}, ...]}`` (parsed)."""
    if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
        raise SpecError('a JSON spec is an object {"layers": [{"layer": "dense", ...}, ...]}'
                        f", got {_short_repr(data)}")
    if _depth > MAX_NESTING:
        raise SpecError(f"JSON spec: blocks nest more than {MAX_NESTING} deep; flatten the "
                        "architecture")
    if len(data["layers"]) > MAX_LAYERS:
        raise SpecError("JSON spec: " + _too_many_layers(len(data["layers"])))
    layers = []
    for index, entry in enumerate(data["layers"]):
        where = f" (JSON layer {index})"
        if not isinstance(entry, dict) or not isinstance(entry.get("layer"), str):
            raise SpecError(f'JSON spec layer {index}: expected {{"layer": NAME, ...}} with '
                            f"NAME a string such as \"dense\", got {_short_repr(entry)}")
        params = {k: v for k, v in entry.items() if k not in ("layer", "branches")}
        branches = entry.get("branches")
        if branches is not None:
            if not isinstance(branches, list) or not all(isinstance(b, list) for b in branches):
                raise SpecError(f"JSON spec layer {index}: 'branches' must be a list of "
                                f"layer lists, got {_short_repr(branches)}")
            branches = [from_dict({"layers": b}, _depth + 1) for b in branches]
        try:
            layers.append(layer_from_name(entry["layer"], params, where, branches))
        except SpecError as err:
            if "JSON layer" in str(err):
                raise
            raise SpecError(f"{err}{where}") from None
    return Serial(layers)


def _unique_keys(pairs):
    data = {}
    for key, value in pairs:
        if key in data:
            raise SpecError(f"JSON spec: key {_short_repr(key)} appears twice in one object; "
                            "give each parameter once")
        data[key] = value
    return data


def from_json(text):
    """The spec of a JSON text (see :func:`to_json`)."""
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise SpecError(f"bad JSON spec at character {err.pos + 1}: {err.msg}") from None
    except RecursionError:
        raise SpecError(f"JSON spec nests too deeply (blocks may nest at most {MAX_NESTING} "
                        "deep)") from None
    return _not_empty(from_dict(data))
