"""The module map of docs/architecture.md, enforced: which sub-package may import which, what loads without
torch, and that only the CLI prints."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gradcam_cli"

# What each part may import from the package (besides itself). Arrows point down the data flow: config ->
# model -> data -> cam -> render -> out, with audit reading OUT afterwards and run putting it all together;
# api is what the CLI and notebooks call, cli only parses and prints.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "zoo": {"errors"},
    "out": {"errors", "version"},
    "config": {"errors", "audit.metrics", "cam.methods", "out.names", "render.colormaps", "audit.diff.gates"},
    "model": {"errors", "config"},
    "data": {"errors", "config", "model"},
    "cam": {"errors", "model"},
    "render": {"errors", "model", "data", "cam", "out"},
    "audit": {"errors", "version", "config", "model", "data", "cam", "render", "out"},
    "run": {"errors", "version", "config", "model", "data", "cam", "render", "out", "audit"},
    "api": {"errors", "config", "model", "audit", "run"},
    "cli": {"errors", "version", "config", "model", "audit", "render.colormaps", "api", "run.world"},
}
# importable without torch (so `--help`, usage errors, `gradcam models`, audit and report answer at once)
TORCH_FREE = [
    "gradcam_cli",
    "gradcam_cli.cli",
    "gradcam_cli.api",
    "gradcam_cli.config",
    "gradcam_cli.audit.diff.compare",
    "gradcam_cli.audit.diff.page",
    "gradcam_cli.errors",
    "gradcam_cli.cam.methods",
    "gradcam_cli.model.labels",
    "gradcam_cli.model.catalog",
    "gradcam_cli.data.discover",
    "gradcam_cli.render.colormaps",
    "gradcam_cli.run.world",
    *[f"gradcam_cli.out.{p.stem}" for p in sorted((PACKAGE / "out").glob("*.py")) if p.stem != "__init__"],
    *[
        f"gradcam_cli.audit.{m}"
        for m in ("metrics", "numbers", "truth", "gates", "groups", "summary", "report", "annotations")
    ],
]


def modules() -> list[tuple[str, Path]]:
    """(dotted name relative to the package, file) of every module."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found.append((".".join(p for p in parts if p != "__init__") or "__init__", path))
    return found


def part_of(name: str) -> str:
    """The part of the map a module belongs to: its sub-package, or the top-level module's own name."""
    return name.split(".")[0]


def imported(path: Path) -> set[str]:
    """Package modules `path` imports (at any depth of the file), relative to the package."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gradcam_cli"):
            base = node.module.removeprefix("gradcam_cli").lstrip(".")
            if not base:  # `from gradcam_cli import __version__` / a top-level name
                names |= {"version" if a.name == "__version__" else a.name for a in node.names}
            else:
                names.add(base)
        elif isinstance(node, ast.Import):
            names |= {a.name.removeprefix("gradcam_cli.") for a in node.names if a.name.startswith("gradcam_cli.")}
    return names


def allowed(importer: str, target: str) -> bool:
    own = part_of(importer)
    if part_of(target) == own:
        return True
    rules = ALLOWED[own]
    return any(target == rule or target.startswith(rule + ".") for rule in rules)


@pytest.mark.parametrize(("name", "path"), [m for m in modules() if part_of(m[0]) in ALLOWED])
def test_imports_follow_the_module_map(name: str, path: Path) -> None:
    wrong = sorted(t for t in imported(path) if not allowed(name, t))
    assert not wrong, f"gradcam_cli.{name} imports {wrong}, against docs/architecture.md"


def test_every_module_has_a_place_on_the_map() -> None:
    unplaced = [name for name, _ in modules() if part_of(name) not in ALLOWED and name not in ("__init__", "__main__")]
    assert not unplaced, unplaced


def test_modules_that_answer_at_once_import_no_torch() -> None:
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in TORCH_FREE)
    code += "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def _prints(tree: ast.AST) -> list[int]:
    """Lines that write to the terminal: print(), click.echo(), sys.stdout/stderr.write(); `__main__` blocks
    (a module run as a script) are not the package talking."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            skip |= {n.lineno for n in ast.walk(node) if hasattr(n, "lineno")}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.lineno not in skip:
            called = ast.unparse(node.func)
            if called in ("print", "click.echo", "click.secho", "sys.stdout.write", "sys.stderr.write"):
                lines.append(node.lineno)
    return lines


def test_only_the_cli_prints() -> None:
    found = {
        name: lines
        for name, path in modules()
        if name != "cli" and (lines := _prints(ast.parse(path.read_text(encoding="utf-8"))))
    }
    assert not found, f"only cli.py talks to the terminal (the rest reports through callbacks): {found}"


def test_the_batch_loop_fits_one_screen() -> None:
    tree = ast.parse((PACKAGE / "run" / "loop.py").read_text(encoding="utf-8"))
    run = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "run")
    assert run.end_lineno is not None and run.end_lineno - run.lineno + 1 <= 40
