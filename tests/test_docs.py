"""The docs against the code: the generated reference pages are fresh, every `finetune ...`
command shown in README.md and docs/ parses with today's CLI and names real config keys, and
the README's links resolve. No command runs and nothing trains (the site itself is built by
`mkdocs build --strict` in scripts/test.sh)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

from finetune.config.load import load_config
from finetune.errors import FinetuneError
from finetune.parser import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}  # fences whose lines are commands (console: after "$ ")
OPERATORS = {"&&", "||", ";", "|", "&"}
LAUNCHERS = ("torchrun", "python", "python3")  # `torchrun ... -m finetune ...`
README_MAX_LINES = 250


def generator():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "scripts" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = generator()
CONFIG_KEYS = set(GEN.config_keys())


def test_the_reference_pages_are_generated_from_todays_code():
    for path, text in GEN.pages().items():
        name = path.relative_to(ROOT)
        assert path.is_file(), f"{name} is missing: run `{GEN.COMMAND}` and commit it"
        fresh = path.read_text() == text  # not compared in the assert: pytest would print both pages
        assert fresh, f"{name} is stale (the CLI or the config schema changed): run `{GEN.COMMAND}` and commit it"


def test_the_reference_covers_every_command_and_key():
    cli, config = GEN.cli_markdown(), GEN.config_markdown()
    for name, _, _ in GEN.subcommands(build_parser()):
        assert f"## finetune {name}\n" in cli
    for key in CONFIG_KEYS:
        assert f"`{key}`" in config, key


def code_blocks(path: Path):
    """(first line number, info string, lines) of every fenced code block in a markdown file."""
    fence, info, start, lines = None, "", 0, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            fence, info, start, lines = (
                stripped[: len(stripped) - len(stripped.lstrip("`"))],
                stripped[3:].strip(),
                number,
                [],
            )
        elif fence is not None and stripped.startswith(fence) and not stripped.strip("`"):
            yield start, info.lower(), lines
            fence = None
        elif fence is not None:
            lines.append(line)


def shown_commands(path: Path):
    """(line number, shell text) of every command line in a page's shell code blocks, continuations joined."""
    for start, info, lines in code_blocks(path):
        if info not in SHELL_BLOCKS:
            continue
        i = 0
        while i < len(lines):
            line, number = lines[i].strip(), start + 1 + i
            i += 1
            if info == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            while line.endswith("\\") and i < len(lines):
                line = line[:-1] + " " + lines[i].strip()
                i += 1
            yield number, line


def finetune_args(text: str) -> list[list[str]]:
    """The argument lists of every `finetune` invocation in one shell line."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    segments, current = [], []
    for token in lexer:
        if token in OPERATORS:
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    found = []
    for tokens in segments:
        tokens = [t for i, t in enumerate(tokens) if ">" not in t and (i == 0 or ">" not in tokens[i - 1])]
        module = tokens.index("-m") + 1 if "-m" in tokens else 0
        if tokens and Path(tokens[0]).name == "finetune":
            found.append(tokens[1:])
        elif module and tokens[module : module + 1] == ["finetune"] and Path(tokens[0]).name in LAUNCHERS:
            found.append(tokens[module + 1 :])
    return found


SHOWN = [
    pytest.param(args, id=f"{page.relative_to(ROOT)}:{number}")
    for page in PAGES
    for number, text in shown_commands(page)
    for args in finetune_args(text)
]


def test_the_pages_show_commands():
    """The extraction itself works: the README and the tutorial show runnable commands."""
    pages = {p.id.split(":")[0] for p in SHOWN}
    assert {"README.md", "docs/tutorial/seed-workflow.md", "docs/how-to/sweep-and-tune.md"} <= pages
    assert len(SHOWN) >= 30


def parse(args: list[str]) -> argparse.Namespace:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return build_parser().parse_args(args)
    except SystemExit as exc:
        if exc.code == 0:  # --version, --help
            return argparse.Namespace()
        last = err.getvalue().strip().splitlines()[-1:] or ["?"]
        raise AssertionError(f"`finetune {shlex.join(args)}` does not parse: {last[0]}") from None


@pytest.mark.parametrize("args", SHOWN)
def test_a_shown_command_parses_and_names_real_config_keys(args):
    ns = parse(args)
    overrides = getattr(ns, "overrides", [])
    for item in overrides + getattr(ns, "grid", []):
        key = item.partition("=")[0]
        assert key in CONFIG_KEYS, f"`finetune {shlex.join(args)}`: {key} is not a config key"
    configs = [getattr(ns, "config", None), *getattr(ns, "configs", [])]
    for config in configs:
        if config and (ROOT / config).is_file() and (ROOT / config).parent.name == "configs":
            try:  # a shipped config with the shown --set: the values pass the config check too
                load_config(ROOT / config, overrides)
            except FinetuneError as exc:
                raise AssertionError(f"`finetune {shlex.join(args)}`: {exc}") from None


def test_the_readme_starts_a_user_in_few_lines():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines, over {README_MAX_LINES}: move detail into docs/ (the site) and link it"
    )


@pytest.mark.parametrize("page", [ROOT / "README.md"], ids=["README.md"])
def test_the_readme_links_resolve(page):
    """The docs site is checked by `mkdocs build --strict`; the README is not part of it."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.name} links to {target}, which does not exist"
