"""The wings of the package and the rules between them (ARCHITECTURE.md), checked on every
import of every module: module level and inside functions, relative and absolute."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "amdim"
# the wings in the order the data flows through them: a wing imports lower wings only
WINGS = ("data", "views", "model", "training", "evaluation")
# what every wing may read: the configuration and where a run computes
GROUND = {"amdim.config", "amdim.runtime"}
# the package's face: it hands names on and may import any wing
FACE = {"amdim", "amdim.__main__", "amdim.cli"}
NEVER = {  # (importer, imported): the rules the issue asked to make visible
    ("model", "data"), ("model", "views"), ("views", "model"),
    ("data", "training"), ("data", "evaluation"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every amdim import in the file, wherever it stands. For
    `from X import name`, the module X.name when that is a module of the package, else X."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*submodule.split("."))).with_suffix(".py").exists() \
                    or (PACKAGE.parent / Path(*submodule.split("."))).is_dir()
                found.append((node.lineno, submodule if is_module else source))
    return [(line, module) for line, module in found if module.split(".")[0] == "amdim"]


def wing(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in WINGS else None


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_wing_or_on_the_ground():
    loose = [module_name(p) for p in MODULES
             if wing(module_name(p)) is None and module_name(p) not in GROUND | FACE]
    assert not loose, f"modules outside the wings: {loose}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_follow_the_wings(path):
    importer = module_name(path)
    if importer in FACE:
        return
    here = wing(importer)
    wrong = []
    for line, module in imported(path):
        there = wing(module)
        if module in FACE:
            wrong.append((line, module, "the package's face is imported by no module"))
        elif importer in GROUND:
            if module not in GROUND:
                wrong.append((line, module, "the ground imports no wing"))
        elif there is None or there == here:
            continue
        elif (here, there) in NEVER:
            wrong.append((line, module, f"{here} never imports {there}"))
        elif WINGS.index(there) > WINGS.index(here):
            wrong.append((line, module, f"{here} is below {there}"))
    assert not wrong, f"{importer}: " + "; ".join(f"line {n} imports {m} ({why})"
                                               for n, m, why in wrong)


def test_no_import_cycle():
    graph = {module_name(p): {m for _, m in imported(p)} for p in MODULES}
    graph = {name: {m for m in targets if m in graph and m != name}
             for name, targets in graph.items()}
    # a wing's __init__ only documents it: an import of amdim.X.Y also names amdim.X
    done, stack = set(), []

    def visit(node):
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(node):] + [node]))
        if node in done:
            return
        stack.append(node)
        for target in sorted(graph[node]):
            visit(target)
        stack.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)


def test_the_rules_are_checked():
    # the checker sees relative imports inside functions (a lazy import is still an import)
    source = PACKAGE / "model" / "amdim.py"
    assert (source.stat().st_size and any(m == "amdim.model.mixture" for _, m in imported(source)))
