"""The documentation's examples run: every ```sh command and ```python block of README.md and docs/*.md.

How each kind of command is handled (run in this process, only parsed, or only checked) and the rules the pages
are written to are in tests/docs_harness.py. Also here: docs/reference.md is what docs/make_reference.py
generates, relative links and anchors resolve, and README.md stays a front page.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import click
import pytest
from docs_harness import (
    CHECK,
    PARSE,
    REPO,
    RUN,
    Block,
    Command,
    blocks,
    broken_link,
    commands,
    doc_files,
    file_block_name,
    kind_of,
    offline_torch_hub,
    parse_gradcam,
    prepare_workspace,
    rel,
    relative_links,
    run_command,
    run_python,
)

from gradcam_cli.errors import GradcamError

README = REPO / "README.md"
README_LIMIT = 25_000  # bytes: the front page; the rest belongs in docs/


@dataclasses.dataclass(frozen=True)
class Step:
    """One thing to run, in page order: a sh command, a python block, or a yaml block written to its file."""

    kind: str
    path: Path
    line: int
    label: str
    command: Command | None = None
    block: Block | None = None
    filename: str | None = None


def collect() -> list[Step]:
    steps: list[Step] = []
    for path in doc_files():
        for block in blocks(path):
            where = rel(path)
            if block.lang in ("sh", "bash", "shell"):
                for cmd in commands(block):
                    steps.append(Step("sh", path, cmd.line, f"{where}:{cmd.line} {' '.join(cmd.argv)[:70]}", cmd))
            elif block.lang in ("python", "py"):
                steps.append(Step("python", path, block.line, f"{where}:{block.line} python", block=block))
            elif (name := file_block_name(block)) is not None:
                steps.append(Step("file", path, block.line, f"{where}:{block.line} {name}", block=block, filename=name))
    return steps


STEPS = collect()


@pytest.fixture(scope="module")
def doc_workspace(tmp_path_factory: pytest.TempPathFactory):
    """The working folder all examples share, and an offline torch hub cache (one thread, no GRADCAM_DEBUG).

    Module-scoped: made once for this file's tests, and TORCH_HOME, the offline download and the thread count
    are put back before the rest of the suite runs."""
    root = prepare_workspace(tmp_path_factory.mktemp("docs") / "work")
    hub_home = tmp_path_factory.mktemp("torch_home")
    with offline_torch_hub(hub_home):
        yield root, hub_home / "hub"


@pytest.mark.parametrize("step", STEPS, ids=[s.label for s in STEPS])
def test_doc_example(step: Step, doc_workspace: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    root, hub = doc_workspace
    monkeypatch.chdir(root)
    if step.kind == "file":
        assert step.block is not None and step.filename is not None
        target = root / step.filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(step.block.text + "\n", encoding="utf-8")
        return
    if step.kind == "python":
        assert step.block is not None
        run_python(step.block)
        return
    cmd = step.command
    assert cmd is not None
    where = f"{rel(cmd.path)}:{cmd.line}: {cmd.text}"
    try:
        outcome = run_command(cmd, hub)
    except (GradcamError, click.ClickException) as exc:
        # only a parsed command gets here (a run command reports its own errors as exit codes)
        message = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
        if cmd.expect == 2:
            return  # a usage error, as the page says
        raise AssertionError(f"{where}\nrejected when parsed: {message}") from None
    if outcome.action == RUN:
        assert outcome.exit_code == cmd.expect, (
            f"{where}\nexited {outcome.exit_code}, the page says {cmd.expect} (mark a command that is meant to fail "
            f"with a trailing `# exit N`)\n--- output ---\n{outcome.output[-3000:]}"
        )
    else:
        assert cmd.expect == 0, (
            f"{where}\nonly {outcome.action}d here ({outcome.why}), so `# exit {cmd.expect}` cannot be checked"
        )


def test_reference_is_current() -> None:
    spec = importlib.util.spec_from_file_location("make_reference", REPO / "docs" / "make_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    current = (REPO / "docs" / "reference.md").read_text(encoding="utf-8")
    assert current == module.generate(), (
        "docs/reference.md is not what docs/make_reference.py generates from the CLI: run "
        "`python docs/make_reference.py` from the repository root and commit the result"
    )


@pytest.mark.parametrize("path", doc_files(), ids=rel)
def test_relative_links_resolve(path: Path) -> None:
    broken = [
        f"{rel(path)}:{line}: {why}"
        for line, target in relative_links(path)
        if (why := broken_link(path, target)) is not None
    ]
    assert not broken, "\n".join(broken)


def test_readme_is_a_front_page() -> None:
    size = len(README.read_bytes())
    assert size < README_LIMIT, f"README.md is {size} bytes; keep it under {README_LIMIT} and move detail to docs/"


def test_readme_links_every_docs_page() -> None:
    text = README.read_text(encoding="utf-8")
    section = text.partition("\n## Documentation\n")[2].split("\n## ", 1)[0]
    assert section, "README.md has no '## Documentation' section"
    linked = {target.partition("#")[0] for target in re.findall(r"\]\(([^)\s]+)\)", section)}
    pages = {rel(p) for p in (REPO / "docs").glob("*.md")}
    missing = sorted(pages - linked)
    assert not missing, f"README.md's Documentation section does not link {', '.join(missing)}"


# --- the harness itself ---------------------------------------------------------------------------------------


def test_harness_reads_commands_as_documented() -> None:
    text = (
        "# a comment line\n"
        "gradcam explain a b \\\n"
        "    --model 'x y'   # trailing comment\n"
        "OMP_NUM_THREADS=1 gradcam audit out --fail-under energy=0.9   # exit 3: below the gate\n"
        "make a && make b   # exit 2\n"
    )
    found = commands(Block(README, "sh", 10, text))
    assert [(c.line, c.argv, c.expect) for c in found] == [
        (11, ("gradcam", "explain", "a", "b", "--model", "x y"), 0),
        (13, ("gradcam", "audit", "out", "--fail-under", "energy=0.9"), 3),
        (14, ("make", "a"), 0),
        (14, ("make", "b"), 2),
    ]
    assert found[1].env == (("OMP_NUM_THREADS", "1"),)
    assert [kind_of(c.argv)[0] for c in found] == [RUN, RUN, CHECK, CHECK]
    assert kind_of(("torchrun", "--standalone", "-m", "gradcam_cli"))[0] == PARSE
    assert kind_of((".venv/bin/python", "bench/bench.py"))[0] == CHECK
    with pytest.raises(ValueError, match="COMMAND_KINDS"):
        kind_of(("rm", "-rf", "out"))


@pytest.mark.parametrize(
    "args",
    [
        ["explain", "in", "-o", "out", "--model", "resnet18", "--no-such-option"],
        ["explain", "in", "-o", "out", "--model", "resnet18", "--method", "gradcam2"],
        ["explain", "in", "-o", "out", "--model", "resnet18", "--batch-size", "0"],
        ["explain", "in", "-o", "out", "--model", "resnet18", "--metrics", "pointing"],
        ["audit", "out", "--fail-under", "deletion=0.5"],
    ],
)
def test_parsing_rejects_what_the_cli_rejects(args: list[str]) -> None:
    with pytest.raises((GradcamError, click.ClickException)):
        parse_gradcam(args)
