"""The one loader for YAML a user hands us (``pipelines.yaml``, model cards, bundle configs).

``yaml.safe_load`` builds no objects, but a few hundred bytes can still hang or exhaust
memory: an alias bomb (``&a [*b, *b, ...]`` nested nine deep expands to ~10^9 nodes) or a
huge file. :func:`load_yaml` refuses, each with one :class:`ConfigError` line:

- files over :data:`MAX_YAML_BYTES` (checked with ``stat`` before a byte is read);
- documents whose aliases expand to more than :data:`MAX_YAML_NODES` nodes, counted on the
  composed node graph before anything is constructed (linear in the file size), and
  recursive aliases (``&a [*a]``);
- a key given twice in one mapping (YAML would silently keep the last one);
- nesting deeper than Python's recursion limit, non-UTF-8 bytes, and YAML syntax errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from generators.errors import ConfigError

MAX_YAML_BYTES = 1 << 20  # 1 MiB: pipelines files and cards are a few KB
MAX_YAML_NODES = 100_000  # scalars + sequences + mappings after alias expansion


def _short_key(value: Any, limit: int = 40) -> str:
    text = repr(value) if isinstance(value, (str, int, float, bool)) or value is None else type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: the base constructor reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_short_key(key)}; give each key once", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


class AliasBombError(Exception):
    """Internal: the node graph expands past the limit, or refers to itself."""


def expanded_size(root: yaml.Node, limit: int = MAX_YAML_NODES) -> int:
    """Nodes in the document once every alias is expanded (a shared node counts once per
    use), computed with one visit per distinct node. Raises AliasBombError past ``limit``
    or on a node that contains itself."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise AliasBombError("an alias refers to a node that contains it (recursive YAML)")
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                total += size(child)
                if total > limit:
                    break
        elif isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                total += size(key_node) + size(value_node)
                if total > limit:
                    break
        open_nodes.discard(key)
        if total > limit:
            raise AliasBombError(f"YAML aliases expand to more than {limit:,} nodes (an alias bomb?)")
        sizes[key] = total
        return total

    return size(root)


def parse_yaml(text: str, origin: str, *, max_nodes: int = MAX_YAML_NODES, invalid: str = "not valid YAML") -> Any:
    """Parse YAML text with :class:`UniqueKeyLoader`, refusing alias bombs; errors are one
    ConfigError line starting with ``origin``."""
    loader = None
    try:
        loader = UniqueKeyLoader(text)  # the reader already refuses non-printable characters
        node = loader.get_single_node()
        if node is None:
            return None
        expanded_size(node, max_nodes)
        return loader.construct_document(node)
    except AliasBombError as exc:
        raise ConfigError(f"{origin}: {exc}; write the values out instead of nesting aliases") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"{origin}: {invalid}{where}: {problem}; fix the syntax") from None
    except RecursionError:
        raise ConfigError(f"{origin}: YAML nested too deeply; expected a few levels of keys") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_text_bounded(path: Path | str, *, max_bytes: int = MAX_YAML_BYTES, what: str = "YAML file") -> str:
    """UTF-8 text of ``path``; refuses files over ``max_bytes`` before reading them."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} ({exc.strerror}); check the path") from None
    if size > max_bytes:
        raise ConfigError(
            f"{path}: {size:,} bytes, more than the {max_bytes:,} allowed for a {what}; "
            "expected a small text file (did you pass the wrong file?)"
        )
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)  # the file may have grown since stat
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} ({exc.strerror}); check the path") from None
    if len(data) > max_bytes:
        raise ConfigError(f"{path}: more than the {max_bytes:,} bytes allowed for a {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start}); expected a UTF-8 {what}; re-save it as UTF-8"
        ) from None


def load_yaml(
    path: Path | str,
    *,
    origin: str | None = None,
    what: str = "YAML file",
    max_bytes: int = MAX_YAML_BYTES,
    max_nodes: int = MAX_YAML_NODES,
    invalid: str = "not valid YAML",
) -> Any:
    """Read and parse a user YAML file within the size and alias bounds (module doc)."""
    text = read_text_bounded(path, max_bytes=max_bytes, what=what)
    return parse_yaml(text, origin or str(path), max_nodes=max_nodes, invalid=invalid)
