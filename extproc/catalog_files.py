"""Reading the catalog folder, and noticing when it changes (polling: no extra dependency, any filesystem)."""

from __future__ import annotations

import asyncio
import logging
import os
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


async def watch(folder: str, on_change: Callable[[LoadResult], None], interval: float = 0.5) -> None:
    """Call `on_change` with the admitted catalog after every change to the folder."""
    last: tuple[tuple[str, int, int], ...] | None = signature(folder)
    while True:
        sig = signature(folder)
        if sig != last:
            last = sig
            try:
                on_change(read_catalog(folder))
            except Exception:
                log.exception("catalog: applying a change failed")
        await asyncio.sleep(interval)
