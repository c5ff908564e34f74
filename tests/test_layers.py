"""The package's folders are floors: a module imports only from its own floor or below, so
data flows one way (config -> data + model -> runtime -> runs -> training -> search and
inference -> the commands) and a reader finds a job by its path."""

from __future__ import annotations

import ast
from pathlib import Path

import finetune

PACKAGE = Path(finetune.__file__).parent
FLOORS = [  # bottom first; a name is a top-level module or folder of finetune
    {"errors", "files", "__init__"},
    {"config"},
    {"data", "model"},
    {"runtime"},
    {"runs"},
    {"training"},
    {"inference", "search"},
    {"cli", "parser", "plan", "lr_find", "modules", "__main__"},
]


def floor(part: str) -> int:
    return next(i for i, names in enumerate(FLOORS) if part.removesuffix(".py") in names)


def imported(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "finetune":
            parts = node.module.split(".")
            found.add(parts[1] if len(parts) > 1 else node.names[0].name)
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("finetune.")}
    return found


def test_every_import_goes_down_the_floors():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = path.relative_to(PACKAGE).parts[0]
        for target in imported(ast.parse(path.read_text())):
            if target != "__version__" and floor(target) > floor(own):
                upward.append(f"{path.relative_to(PACKAGE)} imports finetune.{target}")
    assert not upward, "\n".join(upward)


def test_every_module_sits_on_a_floor_and_tests_mirror_the_folders():
    for path in PACKAGE.rglob("*.py"):
        floor(path.relative_to(PACKAGE).parts[0])
    tests = Path(__file__).parent
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert folders <= {p.name for p in tests.iterdir() if p.is_dir()}
