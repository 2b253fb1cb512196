"""Muster's workflow templates: the subset of Go text/template + Sprig that Workflow manifests may use.

Pure. `parse` refuses anything outside the subset (naming it) so a manifest is refused at admission, not at
run time. Rendering follows Go: option missingkey=error, values printed the way fmt.Print prints JSON-decoded
Go values (every number is a float64), `<no value>` for nil; and Muster's rules on top (§5.4): a string is a
template only if it holds both `{{` and `}}`, a single reference keeps the value's type.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

FUNCTIONS = (
    "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "len", "index", "printf",
    "default", "toJson", "fromJson", "upper", "lower", "trim", "join", "split", "contains", "hasPrefix",
    "hasSuffix", "list", "dict", "quote",
)
_KEYWORDS = ("if", "else", "end", "range", "with")


class TemplateError(Exception):
    """A template that cannot be parsed, uses something outside the subset, or fails while executing."""


# ---- lexing ---------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\\n]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<char>'(?:[^'\\\n]|\\.)+')
  | (?P<decl>:=)
  | (?P<assign>=)
  | (?P<var>\$[A-Za-z0-9_]*)
  | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+)
  | (?P<dot>\.)
  | (?P<num>[-+]?(?:0[xX][0-9a-fA-F_]+|(?:\d[\d_]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<pipe>\|)
  | (?P<lparen>\()
  | (?P<rparen>\))
  | (?P<comma>,)
""", re.VERBOSE)


@dataclass
class _Tok:
    kind: str
    text: str


def _lex_action(src: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if not m or m.end() == pos:
            raise TemplateError(f"unexpected {src[pos]!r} in action {{{{{src}}}}}")
        kind = m.lastgroup or ""
        text = m.group()
        if kind != "ws":
            # A field directly after a variable or a closing paren is a chain, not a new operand.
            out.append(_Tok(kind, text))
        pos = m.end()
    return out


# ---- the tree -----------------------------------------------------------------------------------------

@dataclass
class _Field:
    chain: tuple[str, ...]  # () is dot itself


@dataclass
class _Var:
    name: str
    chain: tuple[str, ...] = ()


@dataclass
class _Lit:
    value: Any


@dataclass
class _Func:
    name: str


@dataclass
class _Sub:
    pipe: _Pipe
    chain: tuple[str, ...] = ()


_Operand = _Field | _Var | _Lit | _Func | _Sub


@dataclass
class _Pipe:
    decl: tuple[str, ...]
    cmds: list[list[_Operand]]
    text: str = ""


@dataclass
class _Text:
    text: str


@dataclass
class _Action:
    pipe: _Pipe


@dataclass
class _Block:
    kind: str  # if, range, with
    pipe: _Pipe
    body: list[Any] = field(default_factory=list)
    orelse: list[Any] = field(default_factory=list)


def _chain(text: str) -> tuple[str, ...]:
    return tuple(p for p in text.split(".") if p)


class _Parser:
    def __init__(self, toks: list[_Tok], text: str) -> None:
        self.toks = toks
        self.i = 0
        self.text = text

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def pipeline(self, stop: str = "") -> _Pipe:
        decl: list[str] = []
        # `$x :=` or `$i, $e :=`
        j = self.i
        names: list[str] = []
        while j < len(self.toks) and self.toks[j].kind == "var":
            names.append(self.toks[j].text)
            if j + 1 < len(self.toks) and self.toks[j + 1].kind == "comma":
                j += 2
                continue
            if j + 1 < len(self.toks) and self.toks[j + 1].kind in ("decl", "assign"):
                decl = names
                self.i = j + 2
            break
        cmds: list[list[_Operand]] = []
        cmd: list[_Operand] = []
        while True:
            tok = self.peek()
            if tok is None or (stop and tok.kind == stop):
                break
            self.take()
            if tok.kind == "pipe":
                if not cmd:
                    raise TemplateError(f"missing command before '|' in {{{{{self.text}}}}}")
                cmds.append(cmd)
                cmd = []
                continue
            cmd.append(self.operand(tok))
        if cmd:
            cmds.append(cmd)
        if not cmds:
            raise TemplateError(f"missing value in {{{{{self.text}}}}}")
        return _Pipe(tuple(decl), cmds, self.text)

    def operand(self, tok: _Tok) -> _Operand:
        nxt = self.peek()
        if tok.kind == "field":
            return _Field(_chain(tok.text))
        if tok.kind == "dot":
            return _Field(())
        if tok.kind == "var":
            chain: tuple[str, ...] = ()
            if nxt is not None and nxt.kind == "field":
                chain = _chain(self.take().text)
            return _Var(tok.text, chain)
        if tok.kind in ("str", "char"):
            try:
                value = ast.literal_eval(tok.text)
            except (ValueError, SyntaxError) as exc:
                raise TemplateError(f"bad string {tok.text}") from exc
            return _Lit(value if tok.kind == "str" else ord(value))
        if tok.kind == "raw":
            return _Lit(tok.text[1:-1])
        if tok.kind == "num":
            try:
                num: float = int(tok.text.replace("_", ""), 0)
            except ValueError:
                try:
                    num = float(tok.text.replace("_", ""))
                except ValueError as exc:
                    raise TemplateError(f"bad number syntax: {tok.text!r}") from exc
            return _Lit(num)
        if tok.kind == "ident":
            if tok.text in ("true", "false"):
                return _Lit(tok.text == "true")
            if tok.text == "nil":
                return _Lit(None)
            if tok.text in _KEYWORDS:
                raise TemplateError(f"unexpected {tok.text!r} in {{{{{self.text}}}}}")
            if tok.text not in FUNCTIONS:
                raise TemplateError(f'function "{tok.text}" not allowed (Muster templates may use: '
                                    f'{", ".join(FUNCTIONS)})')
            return _Func(tok.text)
        if tok.kind == "lparen":
            sub = self.pipeline(stop="rparen")
            if self.peek() is None:
                raise TemplateError(f"unclosed left paren in {{{{{self.text}}}}}")
            self.take()
            chain = ()
            nxt = self.peek()
            if nxt is not None and nxt.kind == "field":
                chain = _chain(self.take().text)
            return _Sub(sub, chain)
        raise TemplateError(f"unexpected {tok.text!r} in {{{{{self.text}}}}}")


@dataclass(frozen=True)
class Template:
    source: str
    nodes: tuple[Any, ...]

    @property
    def functions(self) -> frozenset[str]:
        found: set[str] = set()
        _walk_funcs(list(self.nodes), found)
        return frozenset(found)


def _walk_funcs(nodes: list[Any], found: set[str]) -> None:
    def pipe(p: _Pipe) -> None:
        for cmd in p.cmds:
            for op in cmd:
                if isinstance(op, _Func):
                    found.add(op.name)
                elif isinstance(op, _Sub):
                    pipe(op.pipe)
    for node in nodes:
        if isinstance(node, _Action):
            pipe(node.pipe)
        elif isinstance(node, _Block):
            pipe(node.pipe)
            _walk_funcs(node.body, found)
            _walk_funcs(node.orelse, found)


def _split_actions(src: str) -> list[tuple[str, str]]:
    """('text', s) and ('action', inner) pieces, with Go's `{{-`/`-}}` trim markers applied."""
    parts: list[tuple[str, str]] = []
    pos = 0
    while True:
        start = src.find("{{", pos)
        if start < 0:
            parts.append(("text", src[pos:]))
            return parts
        text = src[pos:start]
        inner_start = start + 2
        if src.startswith("- ", inner_start) or src.startswith("-\t", inner_start) \
                or src.startswith("-\n", inner_start):
            text = text.rstrip()
            inner_start += 1
        parts.append(("text", text))
        # find the closing braces outside string literals
        i = inner_start
        quote = ""
        while i < len(src):
            c = src[i]
            if quote:
                if c == "\\" and quote != "`":
                    i += 2
                    continue
                if c == quote:
                    quote = ""
            elif c in "\"`'":
                quote = c
            elif src.startswith("}}", i):
                break
            i += 1
        else:
            raise TemplateError(f"unclosed action in {src!r}")
        inner = src[inner_start:i]
        pos = i + 2
        if inner.endswith(" -") or inner.endswith("\t-") or inner.endswith("\n-"):
            inner = inner[:-1]
            rest = src[pos:]
            pos += len(rest) - len(rest.lstrip())
        parts.append(("action", inner))


def parse(src: str) -> Template:
    """Parse a template; raises TemplateError naming the first thing outside Muster's subset."""
    root: list[Any] = []
    stack: list[tuple[_Block, list[Any]]] = []
    cur = root
    for kind, piece in _split_actions(src):
        if kind == "text":
            if piece:
                cur.append(_Text(piece))
            continue
        inner = piece.strip()
        if inner.startswith("/*"):
            if not inner.endswith("*/"):
                raise TemplateError("unclosed comment")
            continue
        toks = _lex_action(inner)
        if not toks:
            raise TemplateError("missing value for command")
        head = toks[0]
        if head.kind == "ident" and head.text in ("if", "range", "with"):
            p = _Parser(toks[1:], inner)
            block = _Block(head.text, p.pipeline())
            cur.append(block)
            stack.append((block, cur))
            cur = block.body
        elif head.kind == "ident" and head.text == "else":
            if not stack:
                raise TemplateError("unexpected {{else}}")
            block, parent = stack[-1]
            if cur is block.orelse:
                raise TemplateError("expected end; found {{else}}")
            if len(toks) > 1 and toks[1].kind == "ident" and toks[1].text in ("if", "with"):
                # {{else if x}} is {{else}}{{if x}}...{{end}} sharing the outer end
                p = _Parser(toks[2:], inner)
                nested = _Block(toks[1].text, p.pipeline())
                block.orelse.append(nested)
                stack[-1] = (nested, parent)
                cur = nested.body
                # mark the chain so a single {{end}} closes it
                continue
            if len(toks) > 1:
                raise TemplateError(f"unexpected {toks[1].text!r} after else")
            cur = block.orelse
        elif head.kind == "ident" and head.text == "end":
            if len(toks) > 1:
                raise TemplateError("unexpected text after end")
            if not stack:
                raise TemplateError("unexpected {{end}}")
            _, parent = stack.pop()
            cur = parent
        elif head.kind == "ident" and head.text in ("define", "template", "block", "break", "continue"):
            raise TemplateError(f'action "{head.text}" not allowed (Muster templates may use if, else, '
                                "range, with)")
        else:
            cur.append(_Action(_Parser(toks, inner).pipeline()))
    if stack:
        raise TemplateError(f"unexpected EOF: {{{{{stack[-1][0].kind}}}}} without {{{{end}}}}")
    return Template(src, tuple(root))


# ---- values, the Go way -------------------------------------------------------------------------------

def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def go_float(v: float) -> str:
    """fmt's %v of a float64: strconv 'g' with the shortest digits (so 1000000 prints 1e+06, as in Helm)."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == 0:
        return "-0" if math.copysign(1, v) < 0 else "0"
    digits = repr(float(v))
    mant, _, exp_s = digits.partition("e")
    neg = mant.startswith("-")
    mant = mant.lstrip("-")
    ip, _, fp = mant.partition(".")
    if fp == "0":
        fp = ""
    exp = int(exp_s or 0)
    raw = (ip + fp).lstrip("0")
    dp = len(ip) + exp if ip != "0" else exp - (len(fp) - len(fp.lstrip("0")))
    raw = raw.rstrip("0") or "0"
    x = dp - 1
    if x < -4 or x >= 6:
        m = raw[0] + ("." + raw[1:] if len(raw) > 1 else "")
        out = f"{m}e{'-' if x < 0 else '+'}{abs(x):02d}"
    elif dp <= 0:
        out = "0." + "0" * (-dp) + raw
    elif dp >= len(raw):
        out = raw + "0" * (dp - len(raw))
    else:
        out = raw[:dp] + "." + raw[dp:]
    return ("-" if neg else "") + out


def go_string(v: Any) -> str:
    """fmt.Sprint of a JSON-decoded Go value."""
    if v is None:
        return "<nil>"
    if isinstance(v, bool):
        return "true" if v else "false"
    if _is_num(v):
        return go_float(float(v))  # JSON numbers are float64 in Go
    if isinstance(v, str):
        return v
    if isinstance(v, Mapping):
        return "map[" + " ".join(f"{k}:{go_string(v[k])}" for k in sorted(v)) + "]"
    if isinstance(v, list | tuple):
        return "[" + " ".join(go_string(x) for x in v) + "]"
    return str(v)


def truth(v: Any) -> bool:
    """Go template truth: false, 0, nil and empty strings, lists and maps are false."""
    if v is None or v is False:
        return False
    if _is_num(v):
        return v != 0
    if isinstance(v, str | list | tuple | Mapping):
        return len(v) > 0
    return True


def go_json(v: Any) -> str:
    """encoding/json.Marshal: compact, sorted map keys, HTML characters escaped, numbers as float64."""
    def norm(x: Any) -> Any:
        if isinstance(x, float) and x.is_integer() and abs(x) < 1e21:
            return int(x)
        if isinstance(x, Mapping):
            return {str(k): norm(x[k]) for k in x}
        if isinstance(x, list | tuple):
            return [norm(i) for i in x]
        return x
    text = json.dumps(norm(v), separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026") \
        .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _cmp_pair(a: Any, b: Any, name: str) -> int:
    if _is_num(a) and _is_num(b):
        return (a > b) - (a < b)
    if isinstance(a, str) and isinstance(b, str):
        return (a > b) - (a < b)
    if isinstance(a, bool) and isinstance(b, bool) and name in ("eq", "ne"):
        return 0 if a == b else 1
    if name in ("eq", "ne"):
        if a is None or b is None:
            return 0 if a is b else 1
        raise TemplateError(f"error calling {name}: incompatible types for comparison")
    raise TemplateError(f"error calling {name}: invalid type for comparison")


def _eq(a: Any, *others: Any) -> bool:
    if not others:
        raise TemplateError("error calling eq: missing argument for comparison")
    return any(_cmp_pair(a, b, "eq") == 0 for b in others)


def _printf(fmt: str, *args: Any) -> str:
    out: list[str] = []
    i = 0
    n = 0
    spec = re.compile(r"%([-+# 0]*)(\d+)?(?:\.(\d+))?([a-zA-Z%])")
    while i < len(fmt):
        m = spec.match(fmt, i) if fmt[i] == "%" else None
        if not m:
            out.append(fmt[i])
            i += 1
            continue
        i = m.end()
        flags, width, prec, verb = m.groups()
        if verb == "%":
            out.append("%")
            continue
        if n >= len(args):
            out.append(f"%!{verb}(MISSING)")
            continue
        a = args[n]
        n += 1
        if verb in ("v", "s"):
            s = go_string(a) if not (verb == "s" and prec) else go_string(a)[: int(prec)]
        elif verb == "q":
            s = json.dumps(go_string(a), ensure_ascii=False) if isinstance(a, str) else go_string(a)
        elif verb == "d" and _is_num(a) and float(a).is_integer():
            s = str(int(a))
        elif verb in ("f", "F", "e", "g") and _is_num(a):
            s = f"%{'.' + prec if prec is not None else ''}{verb}" % float(a) if verb != "g" else go_float(float(a))
        elif verb == "t" and isinstance(a, bool):
            s = "true" if a else "false"
        elif verb == "x" and isinstance(a, str):
            s = a.encode().hex()
        elif verb == "x" and _is_num(a) and float(a).is_integer():
            s = format(int(a), "x")
        else:
            s = f"%!{verb}({type(a).__name__}={go_string(a)})"
        if width:
            w = int(width)
            s = s.ljust(w) if "-" in flags else s.rjust(w, "0" if "0" in flags and _is_num(a) else " ")
        out.append(s)
    if n < len(args):
        out.append("%!(EXTRA " + ", ".join(go_string(a) for a in args[n:]) + ")")
    return "".join(out)


def _len(v: Any) -> int:
    if isinstance(v, str):
        return len(v.encode())
    if isinstance(v, list | tuple | Mapping):
        return len(v)
    raise TemplateError(f"error calling len: len of type {_type(v)}")


def _type(v: Any) -> str:
    if v is None:
        return "<nil>"
    if isinstance(v, bool):
        return "bool"
    if _is_num(v):
        return "float64"
    if isinstance(v, str):
        return "string"
    if isinstance(v, Mapping):
        return "map[string]interface {}"
    return "[]interface {}"


def _index(v: Any, *keys: Any) -> Any:
    for k in keys:
        if isinstance(v, Mapping):
            v = v.get(k) if isinstance(k, str) else None
        elif isinstance(v, list | tuple | str):
            if not _is_num(k) or not float(k).is_integer():
                raise TemplateError("error calling index: cannot index slice/array with non-integer")
            j = int(k)
            if not 0 <= j < len(v):
                raise TemplateError(f"error calling index: index out of range: {j}")
            v = v[j] if not isinstance(v, str) else v.encode()[j]
        elif v is None:
            raise TemplateError("error calling index: index of untyped nil")
        else:
            raise TemplateError(f"error calling index: can't index item of type {_type(v)}")
    return v


def _empty(v: Any) -> bool:
    return not truth(v)


def _default(d: Any, *given: Any) -> Any:
    if not given or _empty(given[0]):
        return d
    return given[0]


def _from_json(s: Any) -> Any:
    try:
        return json.loads(go_string(s))
    except (ValueError, TypeError):
        return None


def _strs(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, list | tuple):
        return [go_string(x) for x in v]
    return [go_string(v)]


def _split(sep: Any, s: Any) -> dict[str, str]:
    parts = go_string(s).split(go_string(sep)) if go_string(sep) else list(go_string(s))
    return {f"_{i}": p for i, p in enumerate(parts)}


def _dict(*kv: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i in range(0, len(kv), 2):
        out[go_string(kv[i])] = kv[i + 1] if i + 1 < len(kv) else ""
    return out


def _quote(*vals: Any) -> str:
    return " ".join(json.dumps(go_string(v), ensure_ascii=False) for v in vals if v is not None)


def _and(*args: Any) -> Any:
    for a in args:
        if not truth(a):
            return a
    return args[-1]


def _or(*args: Any) -> Any:
    for a in args:
        if truth(a):
            return a
    return args[-1]


_IMPL: dict[str, Callable[..., Any]] = {
    "eq": _eq,
    "ne": lambda a, b: _cmp_pair(a, b, "ne") != 0,
    "lt": lambda a, b: _cmp_pair(a, b, "lt") < 0,
    "le": lambda a, b: _cmp_pair(a, b, "le") <= 0,
    "gt": lambda a, b: _cmp_pair(a, b, "gt") > 0,
    "ge": lambda a, b: _cmp_pair(a, b, "ge") >= 0,
    "and": _and,
    "or": _or,
    "not": lambda a: not truth(a),
    "len": _len,
    "index": _index,
    "printf": lambda fmt, *a: _printf(go_string(fmt), *a),
    "default": _default,
    "toJson": go_json,
    "fromJson": _from_json,
    "upper": lambda s: go_string(s).upper(),
    "lower": lambda s: go_string(s).lower(),
    "trim": lambda s: go_string(s).strip(),
    "join": lambda sep, v: go_string(sep).join(_strs(v)),
    "split": _split,
    "contains": lambda sub, s: go_string(sub) in go_string(s),
    "hasPrefix": lambda p, s: go_string(s).startswith(go_string(p)),
    "hasSuffix": lambda p, s: go_string(s).endswith(go_string(p)),
    "list": lambda *a: list(a),
    "dict": _dict,
    "quote": _quote,
}
_ARITY = {"ne": 2, "lt": 2, "le": 2, "gt": 2, "ge": 2, "not": 1, "toJson": 1, "fromJson": 1, "upper": 1,
          "lower": 1, "trim": 1, "join": 2, "split": 2, "contains": 2, "hasPrefix": 2, "hasSuffix": 2}
_MIN_ARITY = {"and": 1, "or": 1, "len": 1, "index": 1, "printf": 1, "default": 1, "eq": 1}


# ---- execution ----------------------------------------------------------------------------------------

class _Exec:
    def __init__(self, data: Any, name: str) -> None:
        self.vars: list[tuple[str, Any]] = [("$", data)]
        self.name = name

    def fail(self, where: str, msg: str) -> TemplateError:
        return TemplateError(f'template: {self.name}: executing "{self.name}" at <{where}>: {msg}')

    def lookup(self, name: str) -> Any:
        for n, v in reversed(self.vars):
            if n == name:
                return v
        raise TemplateError(f"undefined variable: {name}")

    def walk(self, value: Any, chain: Sequence[str], label: str) -> Any:
        for i, key in enumerate(chain):
            where = label + "." + ".".join(chain[: i + 1]) if label != "." else "." + ".".join(chain[: i + 1])
            if isinstance(value, Mapping):
                if key not in value:
                    raise self.fail(where, f'map has no entry for key "{key}"')
                value = value[key]
            elif value is None:
                raise self.fail(where, f"nil pointer evaluating interface {{}}.{key}")
            else:
                raise self.fail(where, f"can't evaluate field {key} in type {_type(value)}")
        return value

    def operand(self, op: _Operand, dot: Any) -> Any:
        if isinstance(op, _Field):
            return self.walk(dot, op.chain, ".")
        if isinstance(op, _Var):
            return self.walk(self.lookup(op.name), op.chain, op.name)
        if isinstance(op, _Lit):
            return op.value
        if isinstance(op, _Sub):
            return self.walk(self.pipe(op.pipe, dot), op.chain, "(...)")
        if isinstance(op, _Func):
            return self.call(op.name, [], dot, None, False)
        raise TemplateError("unknown operand")

    def call(self, name: str, args: list[_Operand], dot: Any, piped: Any, has_piped: bool) -> Any:
        if name in ("and", "or"):
            # Go evaluates and/or lazily, left to right.
            vals: list[Any] = []
            ops: list[Any] = [*args, ("piped", piped)] if has_piped else list(args)
            if not ops:
                raise TemplateError(f"wrong number of args for {name}: want at least 1 got 0")
            v: Any = None
            for op in ops:
                v = op[1] if isinstance(op, tuple) else self.operand(op, dot)
                vals.append(v)
                if truth(v) != (name == "and"):
                    return v
            return v
        values = [self.operand(a, dot) for a in args]
        if has_piped:
            values.append(piped)
        want = _ARITY.get(name)
        if want is not None and len(values) != want:
            raise TemplateError(f"wrong number of args for {name}: want {want} got {len(values)}")
        if name in _MIN_ARITY and len(values) < _MIN_ARITY[name]:
            raise TemplateError(f"wrong number of args for {name}: want at least {_MIN_ARITY[name]} "
                                f"got {len(values)}")
        try:
            return _IMPL[name](*values)
        except TemplateError as exc:
            raise self.fail(name, str(exc)) from None
        except (TypeError, ValueError, KeyError) as exc:
            raise self.fail(name, f"error calling {name}: {exc}") from None

    def pipe(self, p: _Pipe, dot: Any) -> Any:
        value: Any = None
        for i, cmd in enumerate(p.cmds):
            head = cmd[0]
            piped = i > 0
            if isinstance(head, _Func):
                value = self.call(head.name, cmd[1:], dot, value, piped)
            else:
                if len(cmd) > 1 or piped:
                    raise TemplateError(f"can't give argument to non-function {p.text}")
                value = self.operand(head, dot)
        for name in p.decl:
            self.vars.append((name, value))
        return value

    def run(self, nodes: Sequence[Any], dot: Any, out: list[str]) -> None:
        for node in nodes:
            if isinstance(node, _Text):
                out.append(node.text)
            elif isinstance(node, _Action):
                value = self.pipe(node.pipe, dot)
                if not node.pipe.decl:
                    out.append("<no value>" if value is None else go_string(value))
            elif isinstance(node, _Block):
                mark = len(self.vars)
                if node.kind == "range":
                    self.range(node, dot, out)
                else:
                    value = self.pipe(node.pipe, dot)
                    if truth(value):
                        self.run(node.body, value if node.kind == "with" else dot, out)
                    else:
                        self.run(node.orelse, dot, out)
                del self.vars[mark:]

    def range(self, node: _Block, dot: Any, out: list[str]) -> None:
        decl = node.pipe.decl
        value = self.pipe(_Pipe((), node.pipe.cmds, node.pipe.text), dot)
        if isinstance(value, Mapping):
            items = [(k, value[k]) for k in sorted(value)]
        elif isinstance(value, list | tuple):
            items = list(enumerate(value))
        elif _is_num(value) and float(value).is_integer():
            items = [(i, i) for i in range(int(value))]
        elif value is None:
            items = []
        else:
            raise self.fail(node.pipe.text, f"range can't iterate over {go_string(value)}")
        if not items:
            self.run(node.orelse, dot, out)
            return
        for k, v in items:
            mark = len(self.vars)
            if len(decl) == 1:
                self.vars.append((decl[0], v))
            elif len(decl) == 2:
                self.vars.append((decl[0], k))
                self.vars.append((decl[1], v))
            self.run(node.body, v, out)
            del self.vars[mark:]


def execute(tpl: Template, data: Any, name: str = "tpl") -> str:
    out: list[str] = []
    _Exec(data, name).run(tpl.nodes, data, out)
    return "".join(out)


def evaluate_single(tpl: Template, data: Any, name: str = "tpl") -> tuple[bool, Any]:
    """(True, value) when the template is exactly one action with a value (Muster keeps its Go type)."""
    if len(tpl.nodes) != 1 or not isinstance(tpl.nodes[0], _Action) or tpl.nodes[0].pipe.decl:
        return False, None
    return True, _Exec(data, name).pipe(tpl.nodes[0].pipe, data)


# ---- Muster's rules on top ----------------------------------------------------------------------------

_SINGLE_REF = re.compile(r"^\{\{\s*\.(input|results|vars|context)\.([A-Za-z0-9_-]+)\s*\}\}$")
_PURE_PATH = re.compile(r"^\{\{-?\s*\.[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_-]*)*\s*-?\}\}$")


def is_template(s: str) -> bool:
    return "{{" in s and "}}" in s


def _bool_text(s: str) -> Any:
    return True if s == "true" else False if s == "false" else s


_CACHE: dict[str, Template] = {}


def compiled(src: str) -> Template:
    tpl = _CACHE.get(src)
    if tpl is None:
        tpl = parse(src)
        if len(_CACHE) > 4096:
            _CACHE.clear()
        _CACHE[src] = tpl
    return tpl


def render_arg(src: str, data: Mapping[str, Any]) -> Any:
    """Muster's argument templating: a single top-level reference keeps its type, else the rendered text
    (literal true/false become booleans)."""
    if not is_template(src):
        return src
    m = _SINGLE_REF.match(src.strip())
    if m:
        root = data.get(m.group(1))
        if isinstance(root, Mapping) and m.group(2) in root:
            return root[m.group(2)]
        raise TemplateError(f'template: {src}: map has no entry for key "{m.group(2)}"')
    return _bool_text(execute(compiled(src), data, "arg"))


def render_args(value: Any, data: Mapping[str, Any]) -> Any:
    """Template every string leaf of maps and lists."""
    if isinstance(value, str):
        return render_arg(value, data)
    if isinstance(value, Mapping):
        return {k: render_args(v, data) for k, v in value.items()}
    if isinstance(value, list):
        return [render_args(v, data) for v in value]
    return value


def render_output(value: Any, data: Mapping[str, Any]) -> Any:
    """Muster's output shaping: pure reference paths keep their JSON type at any depth, a single-action
    expression keeps its type (`len` is a number), mixed text is a string."""
    if isinstance(value, Mapping):
        return {k: render_output(v, data) for k, v in value.items()}
    if isinstance(value, list):
        return [render_output(v, data) for v in value]
    if not isinstance(value, str) or not is_template(value):
        return value
    tpl = compiled(value.strip())
    single, result = evaluate_single(tpl, data, "output")
    if single:
        return result
    return execute(compiled(value), data, "output")


def check(value: Any) -> list[str]:
    """Problems with every templated string leaf of a manifest value (empty: all parse within the subset)."""
    problems: list[str] = []
    if isinstance(value, str):
        if is_template(value):
            try:
                parse(value)
            except TemplateError as exc:
                problems.append(str(exc))
    elif isinstance(value, Mapping):
        for v in value.values():
            problems.extend(check(v))
    elif isinstance(value, list):
        for v in value:
            problems.extend(check(v))
    return problems
