"""Read a YAML or JSON document and remember the line of every key and list item.

Errors anywhere later (pydantic, cross-field checks, the planner) are reported as
``file:line path: message`` by looking a field path up in the line map built here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from reelfarm.errors import Issue, SpecError
from reelfarm.schemas.film import MAX_SPEC_NODES

__all__ = ["Source", "format_path", "parse_document"]

Path = tuple[str | int, ...]


def format_path(path: Path) -> str:
    """``("scenes", 0, "shots", 2, "id")`` -> ``scenes[0].shots[2].id``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


@dataclass
class Source:
    """A parsed document: its data, its file name and the line of each path."""

    file: str
    data: Any
    lines: dict[Path, int] = field(default_factory=dict)
    # Paths written in another file (a campaign's `film:` overrides): path -> that file.
    files: dict[Path, str] = field(default_factory=dict)

    def _nearest(self, path: Path) -> Path | None:
        for n in range(len(path), -1, -1):
            if path[:n] in self.lines:
                return path[:n]
        return None

    def line(self, path: Path) -> int | None:
        """The line of ``path``, or of its nearest ancestor that has one."""
        near = self._nearest(path)
        return None if near is None else self.lines[near]

    def issue(self, path: Path, message: str) -> Issue:
        near = self._nearest(path)
        file = self.files.get(near, self.file) if near is not None else self.file
        return Issue(file, None if near is None else self.lines[near], format_path(path), message)

    def overlay(self, other: Source, prefix: Path) -> Source:
        """A copy whose paths under ``other``'s ``prefix`` point at ``other``'s lines.

        Used for campaign cells: a value a cell's ``film:`` override set is reported at
        the campaign's line, everything else at the base film's.
        """
        out = Source(self.file, self.data, dict(self.lines), dict(self.files))
        for path, line in other.lines.items():
            if len(path) > len(prefix) and path[: len(prefix)] == prefix:
                out.lines[path[len(prefix):]] = line
                out.files[path[len(prefix):]] = other.file
        return out

    def resolve(self, path: Path) -> Path:
        """Walk ``path`` through the data, dropping parts that are not in it.

        Pydantic locations carry union tags (``model.diffusers.steps``); the data does
        not. A last part that is missing is kept: it names a missing field.
        """
        node, out = self.data, []
        for i, part in enumerate(path):
            if isinstance(node, dict) and part in node:
                node = node[part]
                out.append(part)
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                node = node[part]
                out.append(part)
            elif i == len(path) - 1:
                out.append(part)
        return tuple(out)


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last)."""


class _TooLarge(Exception):
    pass


def _walk(node: yaml.Node, path: Path, src: Source, issues: list[Issue], budget: list[int],
          open_nodes: set[int]) -> None:
    """Record the line of every path. Aliases are walked each time they are used, so the
    walk counts values as the validator will see them: ``budget`` bounds that count (an
    alias "billion laughs" stops here), and an alias inside its own anchor is refused."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooLarge
    if id(node) in open_nodes:
        issues.append(Issue(src.file, node.start_mark.line + 1, format_path(path),
                            "a YAML alias refers to a value that contains it"))
        return
    src.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        open_nodes.add(id(node))
        try:
            _walk_children(node, path, src, issues, budget, open_nodes)
        finally:
            open_nodes.discard(id(node))


def _walk_children(node: yaml.Node, path: Path, src: Source, issues: list[Issue], budget: list[int],
                   open_nodes: set[int]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            # YAML 1.1 reads `1`, `on` as int/bool; we key on the text, as users wrote it.
            sub = (*path, key)
            if key in seen:
                issues.append(Issue(src.file, key_node.start_mark.line + 1, format_path(sub),
                                    f"duplicate key {key!r}"))
            seen.add(key)
            src.lines[sub] = key_node.start_mark.line + 1
            _walk(value_node, sub, src, issues, budget, open_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*path, i), src, issues, budget, open_nodes)


def parse_document(text: str, file: str) -> Source:
    """Parse YAML or JSON text. Raises SpecError with the line of a syntax error."""
    is_json = file.lower().endswith(".json")
    try:
        data = json.loads(text) if is_json else yaml.load(text, Loader=_LineLoader)  # noqa: S506
    except json.JSONDecodeError as e:
        raise SpecError([Issue(file, e.lineno, "", f"malformed JSON: {e.msg}")]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError([Issue(file, line, "", f"malformed YAML: {problem}")]) from None
    except RecursionError:
        raise SpecError([Issue(file, None, "", "spec is nested too deeply")]) from None
    except (ValueError, TypeError, OverflowError) as e:
        # A value the parser recognised but could not build: `2001-13-45` as a date, an
        # integer of more than 4300 digits...
        kind = "JSON" if is_json else "YAML"
        raise SpecError([Issue(file, None, "", f"malformed {kind}: {e}")]) from None
    src = Source(file=file, data=data)
    issues: list[Issue] = []
    # JSON that parsed has tabs only as whitespace between tokens, which YAML refuses as
    # indentation: make them spaces so the line map still works (lines are unchanged).
    compose_text = text.replace("\t", " ") if is_json else text
    try:
        node = yaml.compose(compose_text, Loader=_LineLoader)
    except (yaml.YAMLError, RecursionError):  # valid JSON that YAML cannot compose: no line numbers
        node = None
    if node is not None:
        try:
            _walk(node, (), src, issues, [MAX_SPEC_NODES], set())
        except _TooLarge:
            raise SpecError([Issue(file, None, "", f"spec has more than {MAX_SPEC_NODES} values "
                                                   "(MAX_SPEC_NODES), aliases counted")]) from None
        except RecursionError:
            raise SpecError([Issue(file, None, "", "spec is nested too deeply")]) from None
    if issues:
        raise SpecError(issues)
    if not isinstance(data, dict):
        raise SpecError([Issue(file, 1, "", f"expected a mapping at the top, got {type(data).__name__}")])
    return src
