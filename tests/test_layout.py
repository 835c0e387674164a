"""The package's shape, checked on its source (issue 23's acceptance): short argument lists on public entry points,
no module over ~1,000 lines, no function over ~120 lines but the documented exceptions, no private name imported
from another module (a subpackage's modules may share underscore names among themselves), and no import cycle
between modules at import time."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "flipfrag"
MAX_ARGS = 10  # besides self / cls, options and **overrides (keyword settings go in an options object)
MAX_MODULE_LINES = 1000
MAX_FUNCTION_LINES = 120
#: Functions allowed past MAX_FUNCTION_LINES ("module.py:qualname": the reason); none today — a new entry needs a
#: reason a reader accepts, e.g. one flat pass that reads better in one piece than split.
LONG_FUNCTIONS: dict[str, str] = {}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def _functions(tree: ast.AST, prefix: str = "", public: bool = True):
    """(qualified name, node, public) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.", public and not node.name.startswith("_"))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            is_public = public and (not node.name.startswith("_") or node.name == "__init__")
            yield f"{prefix}{node.name}", node, is_public
            yield from _functions(node, f"{prefix}{node.name}.<locals>.", False)


def _n_args(fn: ast.FunctionDef) -> int:
    a = fn.args
    names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    return len([n for n in names if n not in ("self", "cls", "options")]) + (a.vararg is not None)


def public_functions_with_many_args(limit: int = MAX_ARGS) -> list[str]:
    """``"module.py:qualname (n)"`` for every public function / method (no leading underscore, not nested) that takes
    more than ``limit`` arguments besides ``self`` / ``cls``, ``options`` and ``**kwargs``."""
    out = []
    for path in _modules():
        for name, fn, public in _functions(ast.parse(path.read_text())):
            if public and _n_args(fn) > limit:
                out.append(f"{_rel(path)}:{name} ({_n_args(fn)})")
    return out


def test_public_entry_points_take_at_most_ten_arguments():
    assert public_functions_with_many_args() == [], (
        f"public functions with more than {MAX_ARGS} arguments besides options/**overrides: group their settings in "
        "a frozen options dataclass (flipfrag._options.Options, as FlipOptions) taken as options=None, **overrides"
    )


def test_the_argument_check_sees_a_long_signature(tmp_path, monkeypatch):
    src = "def f(a, b, c, d, e, f, g, h, i, j, *, k=1, options=None, **kw): pass\ndef _g(" + ", ".join(
        f"a{i}" for i in range(20)) + "): pass\n"  # fmt: skip
    (tmp_path / "m.py").write_text(src)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    assert public_functions_with_many_args() == ["m.py:f (11)"]


def test_no_module_over_a_thousand_lines():
    long = {_rel(p): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_over_120_lines_but_the_documented_exceptions():
    long = {}
    for path in _modules():
        for name, fn, _ in _functions(ast.parse(path.read_text())):
            n = fn.end_lineno - fn.lineno + 1
            if n > MAX_FUNCTION_LINES:
                long[f"{_rel(path)}:{name}"] = n
    assert set(long) <= set(LONG_FUNCTIONS), f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def _module_name(path: Path) -> str:
    parts = ["flipfrag", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _owner(module: str) -> str:
    """The unit that owns a module's private names: its subpackage (``flipfrag.flip``), or the module itself for a
    top-level module (``flipfrag.attacks``). Underscore names shared inside a subpackage are package-private."""
    parts = module.split(".")
    if len(parts) > 2 or (PACKAGE / parts[-1]).is_dir():
        return ".".join(parts[:2])
    return module


def test_no_private_name_imported_across_modules():
    found = []
    for path in _modules():
        module = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                target = _resolve(module, node, path.name == "__init__.py")
                if not target.startswith("flipfrag") or _owner(target) == _owner(module):
                    continue
                found += [f"{_rel(path)}: {a.name} from {target}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]  # fmt: skip
    assert found == []


def test_no_import_cycles():
    """Every module imports when it is the first flipfrag module imported (an import-time cycle fails for some
    first module), then with all the others in a shuffled order: one interpreter, flipfrag's modules dropped from
    ``sys.modules`` before each first import (third-party modules stay loaded, which keeps this fast)."""
    modules = [_module_name(p) for p in _modules()]
    code = (
        "import importlib, random, sys\n"
        f"mods = {modules!r}\n"
        "def fresh():\n"
        "    for m in [k for k in sys.modules if k == 'flipfrag' or k.startswith('flipfrag.')]:\n"
        "        del sys.modules[m]\n"
        "for m in mods:\n"
        "    fresh()\n"
        "    importlib.import_module(m)\n"
        "fresh()\n"
        "random.Random(0).shuffle(mods)\n"
        "for m in mods:\n"
        "    importlib.import_module(m)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent,
                         timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize("module", ["flipfrag.saliency", "flipfrag.hessian", "flipfrag.fragility.geometry"])
def test_moved_modules_import_alone(module):
    run = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                         cwd=PACKAGE.parent, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
