"""Reading the catalog folder, and noticing when it changes (polling: no extra dependency, any filesystem)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

from catalog.manifests import AdmissionError, LoadResult, load_documents
from catalog.workflows import load_workflows

log = logging.getLogger(__name__)

_SUFFIXES = (".yaml", ".yml")


def _files(folder: str) -> list[str]:
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    return [os.path.join(folder, n) for n in names if n.endswith(_SUFFIXES) and not n.startswith(".")]


def signature(folder: str) -> tuple[tuple[str, int, int], ...]:
    out = []
    for path in _files(folder):
        try:
            st = os.stat(path)
        except OSError:
            continue
        out.append((path, st.st_mtime_ns, st.st_size))
    return tuple(out)


def read_catalog(folder: str) -> LoadResult:
    """Admit every manifest under `folder`; unreadable files are refused like bad documents."""
    texts: list[tuple[str, str]] = []
    unreadable: list[AdmissionError] = []
    if not os.path.isdir(folder):
        unreadable.append(AdmissionError(folder, "catalog", "catalog folder does not exist"))
    for path in _files(folder):
        try:
            with open(path, encoding="utf-8") as fh:
                texts.append((os.path.relpath(path), fh.read()))
        except (OSError, UnicodeDecodeError) as exc:
            unreadable.append(AdmissionError(os.path.relpath(path), "file", f"cannot read: {exc}"))
    result = load_documents(texts)
    flows = load_workflows(texts)
    return LoadResult(result.servers, (*unreadable, *result.errors, *flows.errors), flows.workflows)


class CatalogWatch:
    """Calls `on_change` with the admitted catalog after every change to the folder: polled every `interval`, and
    at once when asked (`check`), so a worker that is asked for a name it does not know reads an edit it has not
    polled yet instead of refusing what its sibling workers already list."""

    def __init__(self, folder: str, on_change: Callable[[LoadResult], None], interval: float = 0.5) -> None:
        self.folder = folder
        self.on_change = on_change
        self.interval = interval
        self._last = signature(folder)
        self._asked = -1e9  # when a check was last asked for (the polls do not count: they are not asked)

    def check(self, min_gap_s: float = 0.0) -> bool:
        """Apply the folder's change if there is one; whether there was. `min_gap_s`: an asked-for check, at most
        once per that long (a client repeating unknown names does not make us read the folder each time)."""
        if min_gap_s:
            now = time.monotonic()
            if now - self._asked < min_gap_s:
                return False
            self._asked = now
        sig = signature(self.folder)
        if sig == self._last:
            return False
        self._last = sig
        try:
            self.on_change(read_catalog(self.folder))
        except Exception:
            log.exception("catalog: applying a change failed")
        return True

    async def run(self) -> None:
        while True:
            self.check()
            await asyncio.sleep(self.interval)
