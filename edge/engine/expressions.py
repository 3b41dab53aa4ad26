"""Safe expressions for workflow ``when:``, ``while:`` and ``over:`` fields.

Source is parsed with :func:`ast.parse` and checked against a whitelist before it can be
evaluated; evaluation is a walk of that checked tree. Nothing is compiled to code and
nothing is ever called, so an expression can read the run's ``state`` and ``input`` and
compute with them, and do nothing else.

The subset:

* literals: int, float, str, ``True``/``False``/``None``; list, tuple, dict and set displays
* the names ``state`` and ``input`` (no other name)
* ``x.name`` and ``x[key]`` (``key`` is any allowed expression; no slices), read by
  :func:`lookup`; attribute names starting with ``_`` are rejected
* comparisons ``== != < <= > >= in not in is is not``, chained as in Python
* ``and``, ``or``, ``not`` (short-circuit, returning operands as Python does)
* ``+ - * / // %`` and unary ``-``/``+``; ``%`` never formats strings
* ``a if cond else b``: allowed, since it only chooses between two allowed expressions

**Missing is None**: a key, attribute or index that is not there reads as ``None``, and
so does anything read from ``None``; ``state.card.last4 == None`` is true when there is
no card. Any error while evaluating (``None < 5``, division by zero, a result over the
size limits) is raised as :class:`ExpressionError` naming the expression.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from edge.errors import ExpressionError

__all__ = ["Expression", "check_expression", "compile_expression", "lookup"]

MAX_SOURCE_CHARS: Final = 2_000  # a condition is one line; bounds parse time and memory
MAX_DEPTH: Final = 64  # nesting; keeps both tree walks far below the recursion limit
MAX_SEQUENCE_LEN: Final = 10_000  # longest str/list/tuple that `+` or `*` may build
MAX_INT_DIGITS: Final = 100  # largest integer a literal or arithmetic may produce
_INT_LIMIT: Final = 10**MAX_INT_DIGITS
_SEQUENCES: Final = (str, bytes, bytearray, list, tuple)

NAMES: Final = frozenset({"state", "input"})

_ARITHMETIC: Final[dict[type[ast.operator], Callable[[Any, Any], Any]]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_COMPARISONS: Final[dict[type[ast.cmpop], Callable[[Any, Any], Any]]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}
_OPERATOR_SYMBOLS: Final[dict[type[ast.AST], str]] = {
    ast.Pow: "**", ast.MatMult: "@", ast.LShift: "<<", ast.RShift: ">>",
    ast.BitOr: "|", ast.BitXor: "^", ast.BitAnd: "&", ast.Invert: "~",
}  # fmt: skip
_CONSTRUCTS: Final[dict[type[ast.AST], str]] = {
    ast.Call: "function calls are",
    ast.Lambda: "lambda expressions are",
    ast.ListComp: "comprehensions are",
    ast.SetComp: "comprehensions are",
    ast.DictComp: "comprehensions are",
    ast.GeneratorExp: "generator expressions are",
    ast.JoinedStr: "f-strings are",
    ast.FormattedValue: "f-strings are",
    ast.NamedExpr: "assignment expressions (:=) are",
    ast.Starred: "starred expressions (*) are",
    ast.Slice: "slices are",
    ast.Await: "await is",
    ast.Yield: "yield is",
    ast.YieldFrom: "yield is",
}


@dataclass(frozen=True, slots=True)
class Expression:
    """A checked expression; build one with :func:`compile_expression`."""

    source: str
    tree: ast.expr = field(repr=False, compare=False)

    def evaluate(self, state: object, input: object = None) -> object:
        """The expression's value for this ``state`` and ``input``."""
        try:
            return _eval(self.tree, {"state": state, "input": input})
        except Exception as exc:  # whatever the data did, the caller sees one error type
            detail = str(exc) or type(exc).__name__
            raise ExpressionError(f"cannot evaluate {self.source!r}: {detail}") from exc


def compile_expression(source: str) -> Expression:
    """Parse and check ``source``; raise :class:`ExpressionError` naming what is not allowed."""
    if not isinstance(source, str):
        raise ExpressionError(f"an expression must be a string, not {type(source).__name__}")
    if len(source) > MAX_SOURCE_CHARS:
        raise ExpressionError(f"expression is longer than {MAX_SOURCE_CHARS} characters")
    source = source.strip()  # YAML block scalars bring newlines; a leading space is no indent
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
        reason = str(exc) or type(exc).__name__
        where = ""
        if isinstance(exc, SyntaxError):
            reason = exc.msg
            if exc.offset:
                line = f"line {exc.lineno}, " if exc.lineno and exc.lineno > 1 else ""
                where = f" ({line}column {exc.offset})"
        what = "invalid syntax" + ("" if reason == "invalid syntax" else f" ({reason})")
        raise ExpressionError(f"{what}{where}: {source!r}") from exc
    _check(tree.body, source, 0)
    return Expression(source, tree.body)


def check_expression(source: str) -> str | None:
    """``None`` when ``source`` is a valid expression, else what is wrong with it."""
    try:
        compile_expression(source)
    except ExpressionError as exc:
        return exc.message
    return None


def lookup(obj: object, key: object, default: object = None) -> object:
    """Read ``key`` from ``obj`` as an expression's ``obj.key`` and ``obj[key]`` both do.

    A Mapping is read by key; a sequence by int index (negative counts from the end);
    any other object by attribute, for names not starting with ``_`` and never on values
    of built-in types (so no str or list methods, no modules, classes or functions).
    ``default`` is returned when there is nothing to read.
    """
    if isinstance(obj, Mapping):
        return obj.get(key, default)  # not obj[key]: a defaultdict must not grow by a read
    if isinstance(key, int) and isinstance(obj, Sequence):
        try:
            return obj[key]
        except IndexError:
            return default
    if isinstance(key, str) and not key.startswith("_") and type(obj).__module__ != "builtins":
        return getattr(obj, key, default)
    return default


def _reject(source: str, node: ast.AST, what: str, hint: str = "") -> ExpressionError:
    line, offset = getattr(node, "lineno", 1), getattr(node, "col_offset", 0)
    lines = source.split("\n")
    text = lines[line - 1] if 0 < line <= len(lines) else ""
    # col_offset counts UTF-8 bytes; people count characters, from 1
    column = len(text.encode()[:offset].decode(errors="replace")) + 1
    where = f"line {line}, column {column}" if line > 1 else f"column {column}"
    return ExpressionError(f"{what} not allowed ({where}): {source!r}{hint}")


def _check(node: ast.AST, source: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _reject(source, node, f"expressions nested more than {MAX_DEPTH} deep are")
    children: list[ast.expr | None] = []
    match node:
        case ast.Constant(value=value):
            if isinstance(value, bool | float | str) or value is None:
                pass
            elif isinstance(value, int):
                if abs(value) >= _INT_LIMIT:
                    raise _reject(source, node, f"integers over {MAX_INT_DIGITS} digits are")
            else:
                raise _reject(source, node, f"{type(value).__name__} literals are")
        case ast.Name(id=name):
            if name not in NAMES:
                hint = "; the only names are 'state' and 'input'"
                raise _reject(source, node, f"the name {name!r} is", hint)
        case ast.Attribute(value=value, attr=attr):
            if attr.startswith("_"):
                raise _reject(source, node, f"private attribute {attr!r} is")
            children = [value]
        case ast.Subscript(value=value, slice=index):
            children = [value, index]
        case ast.BinOp(left=left, op=op, right=right) if type(op) in _ARITHMETIC:
            children = [left, right]
        case ast.BinOp(op=op) | ast.UnaryOp(op=op) if type(op) in _OPERATOR_SYMBOLS:
            raise _reject(source, node, f"the {_OPERATOR_SYMBOLS[type(op)]} operator is")
        case ast.UnaryOp(operand=operand):
            children = [operand]
        case ast.BoolOp(values=values):
            children = list(values)
        case ast.Compare(left=left, comparators=comparators):
            children = [left, *comparators]
        case ast.IfExp(test=test, body=body, orelse=orelse):
            children = [test, body, orelse]
        case ast.List(elts=elts) | ast.Tuple(elts=elts) | ast.Set(elts=elts):
            children = list(elts)
        case ast.Dict(keys=keys, values=values):
            if None in keys:
                raise _reject(source, node, "dict unpacking (**) is")
            children = [*keys, *values]
        case _:
            what = _CONSTRUCTS.get(type(node), f"{type(node).__name__} expressions are")
            raise _reject(source, node, what)
    for child in children:
        if child is not None:
            _check(child, source, depth + 1)


def _eval(node: ast.expr, env: dict[str, object]) -> Any:
    match node:
        case ast.Constant(value=value):
            return value
        case ast.Name(id=name):
            return env[name]
        case ast.Attribute(value=value, attr=attr):
            return lookup(_eval(value, env), attr)
        case ast.Subscript(value=value, slice=index):
            return lookup(_eval(value, env), _eval(index, env))
        case ast.BoolOp(op=op, values=values):
            result = None
            for operand in values:
                result = _eval(operand, env)
                if bool(result) == isinstance(op, ast.Or):  # `or` stops at truthy, `and` at falsy
                    return result
            return result
        case ast.UnaryOp(op=ast.Not(), operand=operand):
            return not _eval(operand, env)
        case ast.UnaryOp(op=ast.USub(), operand=operand):
            return _bounded(-_eval(operand, env))
        case ast.UnaryOp(op=ast.UAdd(), operand=operand):
            return +_eval(operand, env)
        case ast.BinOp(left=left, op=op, right=right):
            return _arithmetic(op, _eval(left, env), _eval(right, env))
        case ast.Compare(left=left, ops=ops, comparators=comparators):
            lhs, result = _eval(left, env), True
            for cmp, comparator in zip(ops, comparators, strict=True):
                rhs = _eval(comparator, env)
                result = _COMPARISONS[type(cmp)](lhs, rhs)
                if not result:
                    return result
                lhs = rhs
            return result
        case ast.IfExp(test=test, body=body, orelse=orelse):
            return _eval(body if _eval(test, env) else orelse, env)
        case ast.List(elts=elts):
            return [_eval(e, env) for e in elts]
        case ast.Tuple(elts=elts):
            return tuple(_eval(e, env) for e in elts)
        case ast.Set(elts=elts):
            return {_eval(e, env) for e in elts}
        case ast.Dict(keys=keys, values=values):
            pairs = zip(keys, values, strict=True)
            return {_eval(k, env): _eval(v, env) for k, v in pairs if k is not None}
    raise TypeError(f"unsupported construct {type(node).__name__}")  # _check let it through


def _arithmetic(op: ast.operator, left: Any, right: Any) -> Any:
    # Check sizes before computing: `"x" * 10**99` must fail without allocating it.
    if isinstance(op, ast.Mod) and isinstance(left, str | bytes | bytearray):
        raise TypeError("'%' does not format strings in expressions")
    if isinstance(op, ast.Mult):
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, _SEQUENCES) and isinstance(times, int):
                _bounded_len(len(seq) * times)
    if isinstance(op, ast.Add) and isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
        _bounded_len(len(left) + len(right))
    return _bounded(_ARITHMETIC[type(op)](left, right))


def _bounded_len(length: int) -> None:
    if length > MAX_SEQUENCE_LEN:
        raise ValueError(f"result would be longer than {MAX_SEQUENCE_LEN} items")


def _bounded(value: Any) -> Any:
    if isinstance(value, int) and abs(value) >= _INT_LIMIT:
        raise ValueError(f"integer result has more than {MAX_INT_DIGITS} digits")
    if isinstance(value, _SEQUENCES):
        _bounded_len(len(value))
    return value
