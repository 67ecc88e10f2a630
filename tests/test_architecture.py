"""The package's shape is a contract (docs/layout.md): imports flow down the layers that
pyproject.toml's [tool.importlinter] names, no import cycle exists anywhere (an import inside a
function counts: it hides a dependency, it does not remove it), and modules stay small."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lora_booth"
MAX_LINES = 500

LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """lint-imports with the contract of `root`/pyproject.toml on the lora_booth package under `root`."""
    return subprocess.run([sys.executable, "-c", LINT], cwd=root, capture_output=True, text=True, timeout=120)


def sources(package: Path) -> dict[str, Path]:
    """module name → file, for every .py file of the package."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph(package: Path) -> dict[str, set[str]]:
    """module → the package's modules it imports, reading every import statement in the file
    (module level, inside functions, under TYPE_CHECKING alike)."""
    modules = sources(package)
    graph: dict[str, set[str]] = {name: set() for name in modules}

    def known(name: str) -> str | None:  # the module a dotted name lives in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{alias.name}" for alias in node.names]
            for target in targets:
                found = known(target)
                if found and found != name:
                    graph[name].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_imports_follow_the_layers_contract():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_import_up_the_layers_breaks_the_contract_with_its_message(tmp_path):
    """A family reaching into the training layer, even from inside a function, fails the contract
    and the message names the import."""
    shutil.copytree(PACKAGE, tmp_path / "lora_booth", ignore=shutil.ignore_patterns("base", "samples", "configs",
                                                                                        "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    family = tmp_path / "lora_booth" / "families" / "sd.py"
    family.write_text(family.read_text() + "\n\ndef _steps():\n    from ..training import recipe\n\n"
                      "    return recipe\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Imports flow down the layers BROKEN" in result.stdout
    assert "lora_booth.families.sd -> lora_booth.training.recipe" in result.stdout


def test_no_import_cycles_counting_imports_inside_functions():
    found = cycles(import_graph(PACKAGE))
    assert found == [], "import cycles (a piece two layers need belongs in the lower one):\n" + \
        "\n".join(" ↔ ".join(component) for component in found)


def test_the_cycle_count_sees_an_import_inside_a_function(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from . import b\n")
    (package / "b.py").write_text("def late():\n    from .a import something\n    return something\n")
    (package / "c.py").write_text("from .b import late\n")
    assert cycles(import_graph(package)) == [["pkg.a", "pkg.b"]]


def test_no_module_is_past_the_size_limit():
    """A module past ~400 lines is probably two concerns (docs/layout.md)."""
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in sources(PACKAGE).items()}
    assert {name: lines for name, lines in sizes.items() if lines > MAX_LINES} == {}
