"""Config files: YAML text read safely with one-line errors, ``--set`` overrides, and configs
merged with their ``base:`` chain (growmem.training.config checks what they hold)."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """Safe YAML (plain values only) that reads ``3e-4`` (no dot; a string in YAML 1.1) as a
    float and refuses a key given twice in one mapping (the later value would silently win)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader refuses it below, with its own message
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(data: bytes | str, source: str) -> Any:
    """Parse YAML text of a config or run file, with errors on one line that name the source
    and the line (no multi-line excerpt with a ``^`` marker).

    Args:
        data: the text, or the bytes of a file (which must be UTF-8).
        source: what the text is, for messages: a path or ``--set key=value``.

    Raises:
        ValueError: bytes that are not UTF-8 text, malformed YAML, a key given twice, or a
            tag that is not a plain value (``!!python/...``: configs hold data, not objects).
    """
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as error:
            line = data[: error.start].count(b"\n") + 1
            raise ValueError(
                f"{source}, line {line}: not UTF-8 text (byte {data[error.start]:#04x}); "
                "expected a YAML file"
            ) from None
    try:
        return yaml.load(data, Loader=_Loader)
    except yaml.reader.ReaderError as error:  # a control character: no line mark of its own
        line = data[: error.position].count("\n") + 1
        raise ValueError(
            f"{source}, line {line}: character #x{error.character:04x} is not allowed in YAML"
        ) from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = error.problem or error.context
        if not isinstance(error, yaml.constructor.ConstructorError):
            problem = f"not valid YAML: {problem}"
        elif "tag" in problem:
            problem += " (a config holds plain values: no !!python/ or other object tags)"
        raise ValueError(f"{source}{where}: {problem}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{source}: {' '.join(str(error).split())}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` (value parsed as YAML) -> (["section", "key"], value)."""
    key, sep, value = text.partition("=")
    keys = key.split(".")
    if not sep or len(keys) < 2 or not all(keys):
        raise ValueError(f"--set expects section.key=value (e.g. train.lr=3e-4), got {text!r}")
    return keys, load_yaml(value, f"--set {text}")


def merge(base: dict, override: dict) -> dict:
    """``base`` with ``override``'s keys replacing its own, mapping by mapping (a section, the
    model's memory, its caching)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml_config(path: Path, presets: Path | None = None, _seen: tuple = ()) -> dict:
    """The raw sections of a YAML config, with its ``base:`` merged underneath, recursively.

    ``base`` names one config or a list of them (files next to this one, or preset names);
    later ones override earlier ones and this file overrides them all, key by key within a
    section.

    Raises:
        FileNotFoundError: the file or a base is missing.
        ValueError: malformed YAML, a non-mapping document, or a cycle of bases.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise ValueError(f"config {path}: its chain of base configs loops back to itself")
    raw = load_yaml(path.read_bytes(), f"config {path}") or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
    bases = raw.pop("base", None)
    if bases is None:
        return raw
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ValueError(f"config {path}: base must name a config or a list of them, got {bases!r}")
    merged: dict = {}
    for base in bases:
        candidates = [path.parent / base, path.parent / f"{base}.yaml"]
        if presets is not None:
            candidates += [presets / base, presets / f"{base}.yaml"]
        base_path = next((c for c in candidates if c.is_file()), None)
        if base_path is None:
            raise FileNotFoundError(
                f"config {path}: base {base!r} not found next to it or as a preset"
            )
        merged = merge(merged, read_yaml_config(base_path, presets, (*_seen, path.resolve())))
    return merge(merged, raw)
