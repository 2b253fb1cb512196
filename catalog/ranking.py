"""Muster's filter_tools ranking: BM25F over a tool's name and the first line of its description.

A query term's frequency is normalised per field against that field's average length, the fields are combined
with weights (name 3.0, description 1.0) before BM25's saturation, IDF is Okapi's with +1 over the candidate
set, and the ubiquitous verbs `list` and `get` count a quarter. Only documents scoring above 0 are kept, best
first (stable); scores are rounded to 4 decimals, never to 0. Pure: no I/O.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

K1 = 1.5
B = 0.75
NAME_WEIGHT = 3.0
DESCRIPTION_WEIGHT = 1.0
STOP_VERBS = frozenset({"list", "get"})
STOP_VERB_WEIGHT = 0.25


@dataclass(frozen=True)
class Doc:
    name: str
    description: str


def tokenize(text: str) -> list[str]:
    """Lowercase runs of letters and digits; a lower-to-upper camelCase boundary starts a new token."""
    tokens: list[str] = []
    current: list[str] = []
    previous = ""
    for ch in text:
        if ch.isalpha():
            if current and ch.isupper() and previous.islower():
                tokens.append("".join(current))
                current = []
            current.append(ch.lower())
        elif ch.isdigit():
            current.append(ch)
        elif current:
            tokens.append("".join(current))
            current = []
        previous = ch
    if current:
        tokens.append("".join(current))
    return tokens


def first_line(text: str, max_runes: int = 0) -> str:
    """Muster's summary: the first line, trimmed; over `max_runes` (when > 0) cut and followed by `...`."""
    line = text.split("\n", 1)[0].strip()
    if max_runes > 0 and len(line) > max_runes:
        line = line[:max_runes].strip() + "..."
    return line


def round_score(score: float) -> float:
    rounded = round(score, 4)
    return 0.0001 if rounded == 0 and score > 0 else rounded


def _norm(tf: int, length: int, average: float) -> float:
    if tf == 0 or average == 0:
        return 0.0
    return tf / (1 - B + B * length / average)


def rank(query: str, docs: Sequence[Doc]) -> list[tuple[int, float]]:
    """(index into docs, unrounded score) of every document matching the query, best first."""
    terms = set(tokenize(query))
    if not terms or not docs:
        return []
    names = [tokenize(d.name) for d in docs]
    descriptions = [tokenize(d.description) for d in docs]
    df: Counter[str] = Counter()
    for n, d in zip(names, descriptions, strict=True):
        df.update(set(n) | set(d))
    count = len(docs)
    avg_name = sum(map(len, names)) / count
    avg_desc = sum(map(len, descriptions)) / count
    idf = {t: math.log(1 + (count - df[t] + 0.5) / (df[t] + 0.5)) for t in terms}
    ranked: list[tuple[int, float]] = []
    for i, (n, d) in enumerate(zip(names, descriptions, strict=True)):
        name_tf, desc_tf = Counter(n), Counter(d)
        score = 0.0
        for term in terms:
            weighted = (NAME_WEIGHT * _norm(name_tf[term], len(n), avg_name)
                        + DESCRIPTION_WEIGHT * _norm(desc_tf[term], len(d), avg_desc))
            if weighted == 0:
                continue
            contribution = idf[term] * weighted * (K1 + 1) / (weighted + K1)
            if term in STOP_VERBS:
                contribution *= STOP_VERB_WEIGHT
            score += contribution
        if score > 0:
            ranked.append((i, score))
    ranked.sort(key=lambda r: -r[1])
    return ranked


def glob_regex(pattern: str, case_sensitive: bool = False) -> re.Pattern[str]:
    """Go's filepath.Match syntax (`*`, `?`, `[...]` with `^` negation and ranges, `\\` escapes) as a regex;
    ValueError("syntax error in pattern") where Go reports ErrBadPattern."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "\\":
            i += 1
            if i >= len(pattern):
                raise ValueError("syntax error in pattern")
            out.append(re.escape(pattern[i]))
        elif ch == "[":
            end = i + 1
            negate = end < len(pattern) and pattern[end] == "^"
            if negate:
                end += 1
            parts: list[str] = []
            first = True
            while True:
                if end >= len(pattern):
                    raise ValueError("syntax error in pattern")
                c = pattern[end]
                if c == "]" and not first:
                    break
                if c in "-]" and first:
                    raise ValueError("syntax error in pattern")
                first = False
                lo, end = _class_char(pattern, end)
                if end < len(pattern) and pattern[end] == "-":
                    hi, end = _class_char(pattern, end + 1)
                    parts.append(f"{re.escape(lo)}-{re.escape(hi)}")
                else:
                    parts.append(re.escape(lo))
            out.append(f"[{'^' if negate else ''}{''.join(parts)}{'/' if negate else ''}]")
            i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out) + r"\Z", 0 if case_sensitive else re.IGNORECASE)


def _class_char(pattern: str, at: int) -> tuple[str, int]:
    if at >= len(pattern) or pattern[at] in "-]":
        raise ValueError("syntax error in pattern")
    if pattern[at] == "\\":
        at += 1
        if at >= len(pattern):
            raise ValueError("syntax error in pattern")
    return pattern[at], at + 1
