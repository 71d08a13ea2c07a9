"""Imports between the compiler's stages run one way: core < profile < fit < build < eval < gate.

Every module of the package is parsed (``ast``; imports inside functions and under
``TYPE_CHECKING`` count too) and each ``kvcompile`` import is checked against its layer:

- a stage imports only from earlier stages, the core (``kvcompile/*.py``), and the libraries
  ``kvcompile.runtime`` and ``kvcompile.passes``, which count as core-level;
- the core, the runtime and the passes import no stage;
- the runtime stands alone (``tests/test_runtime_alone.py`` checks it at run time): it imports
  only itself and the core modules a built artifact needs, ``RUNTIME_CORE``;
- ``kvcompile.cli`` drives the stages and may import any of them.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# package -> folder, as pyproject.toml's package-dir maps them
FOLDERS = {"kvcompile": ROOT / "kvcompile", "kvcompile.runtime": ROOT / "runtime",
           "kvcompile.passes": ROOT / "passes"}
STAGES = ("profile", "fit", "build", "eval", "gate")
LIBRARIES = ("runtime", "passes")  # core-level libraries the stages use
# what the runtime may import besides itself: the package root (its version) and these
RUNTIME_CORE = ("errors", "arch", "plan", "plan_io", "memory", "yamlio")
RULE = ("a stage imports only from earlier stages (core < profile < fit < build < eval < gate), "
        "the core, kvcompile.runtime and kvcompile.passes")


def package_modules() -> dict[str, tuple[str, str]]:
    """Module name -> (path relative to the repository, source) for every module of the package."""
    modules = {}
    for package, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if package == "kvcompile" and parts[0] in LIBRARIES:
                continue  # not in the package: the libraries are their own folders
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            modules[name] = (str(path.relative_to(ROOT)), path.read_text(encoding="utf-8"))
    return modules


def layer(module: str) -> str:
    """``core``, a library, a stage, or ``cli``, of a ``kvcompile`` module name."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in (*STAGES, *LIBRARIES, "cli"):
        return parts[1]
    return "core"


def rank(name: str) -> int:
    """Core and libraries 0, the stages in pipeline order 1.., the CLI last."""
    if name in STAGES:
        return 1 + STAGES.index(name)
    return len(STAGES) + 1 if name == "cli" else 0


def imports(module: str, source: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, imported module) for every ``kvcompile`` import, relative ones resolved."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((node.lineno, target))
    return [(line, target) for line, target in found if target.split(".")[0] == "kvcompile"]


def violations(modules: dict[str, tuple[str, str]]) -> list[str]:
    """One line per import that breaks the layering, naming the file, line and both modules."""
    out = []
    for module, (path, source) in sorted(modules.items()):
        mine = layer(module)
        for line, target in imports(module, source, path.endswith("__init__.py")):
            theirs = layer(target)
            where = f"{path}:{line}: {module} ({mine}) imports {target} ({theirs})"
            if mine == "runtime":
                allowed = theirs == "runtime" or target == "kvcompile" or \
                    target.removeprefix("kvcompile.") in RUNTIME_CORE
                if not allowed:
                    out.append(f"{where}: the runtime imports only itself and kvcompile."
                               f"{{{', '.join(RUNTIME_CORE)}}}")
            elif rank(theirs) > rank(mine):
                out.append(f"{where}: {RULE}")
    return out


def test_no_module_imports_a_later_stage() -> None:
    found = violations(package_modules())
    assert not found, "imports against the stage order:\n" + "\n".join(found)


def test_every_layer_is_parsed() -> None:
    """Guard for the check above: it sees the core, each stage, both libraries and the CLI."""
    modules = package_modules()
    assert {layer(m) for m in modules} == {"core", *STAGES, *LIBRARIES, "cli"}
    assert {"kvcompile.plan", "kvcompile.settings", "kvcompile.runtime.cache", "kvcompile.passes.onnx.rewrite",
            "kvcompile.profile.record", "kvcompile.fit.greedy", "kvcompile.gate.rules"} <= set(modules)
    _, source = modules["kvcompile.runtime.cache"]
    assert ("kvcompile.runtime.ops" in [t for _, t in imports("kvcompile.runtime.cache", source, False)])


def test_violations_name_the_offending_import() -> None:
    """The checker itself, on made-up modules: each bad import is reported with its place."""
    made_up = {
        "kvcompile.profile.record": ("kvcompile/profile/record.py",
                                     "from kvcompile.fit.greedy import FitRequest\n"),
        "kvcompile.fit.pipeline": ("kvcompile/fit/pipeline.py",
                                   "def f():\n    from kvcompile.build.artifact import check\n"),
        "kvcompile.memory": ("kvcompile/memory.py", "import kvcompile.eval.report\n"),
        "kvcompile.runtime.cache": ("runtime/cache.py",
                                    "from ..settings import FitSettings\nfrom .ops import x\n"),
        "kvcompile.passes.base": ("passes/base.py", "from kvcompile.fit import greedy\n"),
        # allowed: earlier stages, the core, the libraries; the CLI; the runtime's own core
        "kvcompile.gate.rules": ("kvcompile/gate/rules.py",
                                 "from kvcompile.eval.report import x\nfrom kvcompile.profile import record\n"
                                 "from kvcompile.runtime.engine import Engine\nfrom kvcompile.passes import p\n"),
        "kvcompile.cli": ("cli.py", "from kvcompile.gate.rules import check\n"),
        "kvcompile.runtime.artifact": ("runtime/artifact.py",
                                       "from kvcompile import __version__\nfrom kvcompile.plan_io import Reader\n"
                                       "from . import engine\n"),
    }
    found = violations(made_up)
    assert [line.split(": ")[0] for line in found] == [
        "kvcompile/fit/pipeline.py:2", "kvcompile/memory.py:1", "passes/base.py:1",
        "kvcompile/profile/record.py:1", "runtime/cache.py:1"]
    assert "kvcompile.profile.record (profile) imports kvcompile.fit.greedy (fit)" in found[3]
    assert "kvcompile.runtime.cache (runtime) imports kvcompile.settings (core)" in found[4]
