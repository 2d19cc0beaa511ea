"""The import layers: each package imports only the ones below it, read from the source (imports
inside functions included, `if TYPE_CHECKING:` blocks left out), so no cycle hides in a function.

    entry scripts (main.py, main_deploy.py, run_with_submitit.py, hubconf.py): imported by nothing
    benchmarks/, scripts/      may import the library and args.py, not an entry script
    args.py                    flags; the library below never sees it
    pruning/, losses.py, engine/, datasets.py, models/, utils/   (the library)
"""
import ast
import os

from conftest import REPO

ENTRY_SCRIPTS = {"main", "main_deploy", "run_with_submitit", "hubconf"}
ABOVE_THE_LIBRARY = ENTRY_SCRIPTS | {"args", "benchmarks", "scripts"}
# package or module -> the top-level names it must not import
FORBIDDEN = {
    "utils": ABOVE_THE_LIBRARY | {"models", "datasets", "engine", "losses", "pruning"},
    "models": ABOVE_THE_LIBRARY | {"pruning", "datasets", "engine", "losses"},
    "datasets": ABOVE_THE_LIBRARY,
    "losses": ABOVE_THE_LIBRARY | {"pruning"},
    "engine": ABOVE_THE_LIBRARY | {"datasets"},
    "pruning": ABOVE_THE_LIBRARY,
    "args": ENTRY_SCRIPTS,
    "benchmarks": ENTRY_SCRIPTS,
    "scripts": ENTRY_SCRIPTS,
}


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(path: str) -> set:
    """Top-level names of every absolute import in the file at `path`, at any depth, but not under
    `if TYPE_CHECKING:`; `importlib.import_module("x.y")` with a literal name counts too."""
    names = set()

    def visit(node):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == \
                "import_module" and node.args and isinstance(node.args[0], ast.Constant):
            names.add(str(node.args[0].value).split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    with open(path) as f:
        visit(ast.parse(f.read(), path))
    return names


def source_files(unit: str) -> list:
    """The .py files of package (folder) `unit`, or module `unit`.py."""
    folder = os.path.join(REPO, unit)
    if not os.path.isdir(folder):
        return [folder + ".py"]
    return [os.path.join(root, f) for root, _, files in os.walk(folder) for f in sorted(files) if f.endswith(".py")]


def test_each_layer_imports_only_the_layers_below_it():
    # the reader sees imports at the top, in functions, and skips type-only ones
    assert {"torch", "timm", "utils"} <= set().union(*map(imported_names, source_files("models")))
    assert {"args", "models", "pruning"} <= imported_names(os.path.join(REPO, "main.py"))
    broken = [f"{os.path.relpath(path, REPO)} imports {name}"
              for unit, forbidden in FORBIDDEN.items() for path in source_files(unit)
              for name in sorted(imported_names(path) & forbidden)]
    assert not broken, "\n".join(broken)
