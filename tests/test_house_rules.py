"""The house rules (CONTRIBUTING.md), so that the README's test command checks them: ruff's format and lint,
the import contracts (the runtime imports no build step; the build step is layered; no circles), and the
sizes of modules and functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("edge_asr", "edge_asr_build", "edge_asr_deploy")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
PARSERS = {"build_parser"}  # argument parsers (and what they nest) may be long: one line per flag


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("check", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff_is_clean(check):
    done = _run([sys.executable, "-m", "ruff", *check])
    assert done.returncode == 0, done.stdout + done.stderr


def test_import_contracts_hold():
    """import-linter's contracts in pyproject.toml (run as `lint-imports` would, in a process of its own)."""
    script = (
        "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    )
    done = _run([sys.executable, "-c", script])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout, done.stdout


def _sizes() -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    modules, functions = [], []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            name = str(path.relative_to(ROOT))
            modules.append((len(text.splitlines()), name))
            tree = ast.parse(text)
            exempt = {
                id(inner)
                for node in ast.walk(tree)
                if isinstance(node, ast.FunctionDef) and node.name in PARSERS
                for inner in ast.walk(node)
            }
            functions += [
                (node.end_lineno - node.lineno + 1, f"{name}:{node.lineno} {node.name}")
                for node in ast.walk(tree)
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and id(node) not in exempt
            ]
    return sorted(modules, reverse=True), sorted(functions, reverse=True)


def test_modules_and_functions_stay_small():
    modules, functions = _sizes()
    assert modules[0][0] <= MAX_MODULE_LINES, modules[:5]
    assert functions[0][0] <= MAX_FUNCTION_LINES, functions[:5]


if __name__ == "__main__":  # the largest five of each, for a closing note
    modules, functions = _sizes()
    print("\n".join(f"{n:5d}  {name}" for n, name in modules[:5]))
    print("\n".join(f"{n:5d}  {name}" for n, name in functions[:5]))
