"""`logFormat: json`: what Python itself would write to stderr (warnings, uncaught exceptions, in any thread)
comes out as one JSON object per line too."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.procs import ROOT

SCRIPT = """
import threading, warnings
from extproc import logs
logs.configure("json")
warnings.warn("a library's warning")
thread = threading.Thread(target=lambda: 1 / 0)
thread.start(); thread.join()
raise ValueError("boom")
"""


def test_warnings_and_uncaught_exceptions_are_json_lines() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    lines = [json.loads(line) for line in out.stderr.splitlines()]  # every line parses
    assert [(line["level"], line["logger"]) for line in lines] == [
        ("warning", "py.warnings"), ("critical", "muster_edge"), ("critical", "muster_edge")]
    assert "ZeroDivisionError" in lines[1]["exception"] and "ValueError: boom" in lines[2]["exception"]
