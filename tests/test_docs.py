"""The documentation cannot rot: every ```python block of README.md and docs/api.md runs, every
```yaml block of docs/api.md is a valid run config, every `growmem` command line of their
```sh blocks names a real subcommand and real options, and every relative link of the docs
points at a file (and heading) that exists."""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

import pytest
import torch

from growmem import cli
from growmem.training.config import load_config

ROOT = Path(__file__).resolve().parent.parent
RUNNABLE = [ROOT / "README.md", ROOT / "docs" / "api.md"]
LINKED = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def fenced(path: Path, language: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```language block of ``path``."""
    text = path.read_text()
    return [
        (text.count("\n", 0, m.start()) + 2, m.group(1))
        for m in re.finditer(rf"^```{language}\n(.*?)^```", text, re.M | re.S)
    ]


def cases(language: str) -> list:
    return [
        pytest.param(path, code, id=f"{path.name}:{line}")
        for path in RUNNABLE
        for line, code in fenced(path, language)
    ]


def test_the_docs_have_blocks_to_check():
    # a renamed fence or file must not leave this file testing nothing
    assert len(fenced(ROOT / "README.md", "python")) >= 3
    assert len(fenced(ROOT / "docs" / "api.md", "python")) >= 10
    assert fenced(ROOT / "docs" / "api.md", "yaml") and fenced(ROOT / "README.md", "sh")


@pytest.mark.parametrize(("path", "code"), cases("python"))
def test_python_block_runs(path, code, tmp_path, monkeypatch):
    """Each block runs on its own, in a fresh namespace and an empty working folder (it may
    write files there); the global RNG and thread count are restored afterwards. The docs
    show the current API: a deprecated form (FutureWarning, DeprecationWarning) fails."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            exec(compile(code, str(path), "exec"), {"__name__": "__docs__"})
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(("path", "code"), cases("yaml"))
def test_yaml_block_is_a_valid_run_config(path, code, tmp_path):
    config_file = tmp_path / "config.yaml"
    config_file.write_text(code)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated (flat) keys
        load_config(config_file, presets=cli.CONFIGS)


def options_of(words: list[str], capsys) -> str:
    """The --help text of ``growmem WORDS`` (a command, its subcommand, positionals)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*words, "--help"])
    assert exit_info.value.code == 0, words
    return capsys.readouterr().out


@pytest.mark.parametrize(("path", "code"), cases("sh"))
def test_growmem_command_lines_name_real_options(path, code, capsys):
    for line in code.replace("\\\n", " ").splitlines():  # continued lines joined
        words = shlex.split(line.split("#")[0])
        if words[:1] != ["growmem"]:
            continue
        options = [i for i, word in enumerate(words) if word.startswith("-")]
        help_text = options_of(words[1 : options[0] if options else len(words)], capsys)
        for word in words[2:]:
            if word.startswith("--"):
                assert re.search(rf"{re.escape(word)}\b", help_text), f"{line}: {word}"


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("path", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        assert resolved.exists(), f"{path.name}: {target}"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{path.name}: {target}"
