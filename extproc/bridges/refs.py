"""`${env:NAME}` and `${file:PATH}` in a stdio server's env values, as in headers (extproc/credentials.py).

Resolved once per process start, so no file cache; kept apart from credentials.py so the bridge process does not
load the credential broker's dependencies (its memory is what each stdio upstream costs).
"""

from __future__ import annotations

import os
import re

_REF = re.compile(r"\$\{(env|file):([^}]+)\}")


def resolve(value: str) -> str:
    """Raises KeyError or OSError naming the variable or file, never a value."""
    def one(match: re.Match[str]) -> str:
        kind, ref = match.group(1), match.group(2).strip()
        if kind == "env":
            if ref not in os.environ:
                raise KeyError(f"environment variable {ref} is not set")
            return os.environ[ref]
        try:
            with open(ref, encoding="utf-8") as fh:
                return fh.read().rstrip("\r\n")
        except OSError as exc:
            raise OSError(f"cannot read {ref}: {exc.strerror}") from None

    return _REF.sub(one, value)
