"""Bounded, strict YAML parsing of config text.

Every input is bounded before it is built into Python values: the text's size, the nesting
depth, the length of one value, and the number of values after alias expansion (a few KB of
nested `&a`/`*a` aliases can stand for billions of values). A first pass over the parser's
events measures all of these without building anything; only a text within every limit is
composed. Duplicate keys in a mapping are errors naming both lines (YAML's own rule; PyYAML
keeps the last one silently).

libyaml's parser (`yaml.CSafeLoader`) is used when PyYAML was built with it (about 100 times
faster); the pure-Python parser otherwise, with tabs before comments and values accepted as
libyaml accepts them. Both give the same values and the same errors.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode

from sharing.text import SHORT_CHARS, short_repr, shorten

MAX_TEXT_BYTES = 256 * 1024  # config files are a few KB; a ConfigMap holds at most 1 MiB
MAX_DEPTH = 32  # the deepest config path is 7 levels
MAX_VALUES = 10_000  # scalars and collections, counting every alias expansion
MAX_SCALAR_CHARS = 4096  # the longest legitimate value is a path (PATH_MAX)



@dataclass(frozen=True)
class YamlLimits:
    """The bounds one kind of file is parsed within."""

    max_bytes: int = MAX_TEXT_BYTES
    max_depth: int = MAX_DEPTH
    max_values: int = MAX_VALUES
    max_scalar_chars: int = MAX_SCALAR_CHARS


CONFIG_LIMITS = YamlLimits()

_MERGE_TAG = "tag:yaml.org,2002:merge"
_COLLECTION_START = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
_COLLECTION_END = (yaml.SequenceEndEvent, yaml.MappingEndEvent)

class YamlLimitError(ValueError):
    """The text is not YAML within the limits; the message says which limit, and where."""


def _line(event: yaml.Event) -> int:
    mark = event.start_mark
    return mark.line + 1 if mark is not None else 0


def _events(loader: Any) -> Iterator[yaml.Event]:
    while loader.check_event():
        yield loader.get_event()


def _events_within_depth(loader: Any, max_depth: int) -> Iterator[yaml.Event]:
    """The parser's events; libyaml's own nesting limit reported as ours."""
    try:
        yield from _events(loader)
    except yaml.YAMLError as err:
        if "maximum nesting depth" not in str(getattr(err, "problem", "")):
            raise
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise YamlLimitError(f"{where}nested deeper than {max_depth} levels") from None


def check_limits(
    text: str, loader_class: type = yaml.SafeLoader, limits: YamlLimits = CONFIG_LIMITS
) -> None:
    """Walk the parser's events and refuse text past a limit, before any value is built.

    Raises:
        YamlLimitError: too large, too deep, a value too long, or too many values after
            expanding aliases; the message names the limit and the line.
        yaml.YAMLError: the text is not YAML (found while walking).
    """
    if len(text) > limits.max_bytes or len(text.encode("utf-8", "replace")) > limits.max_bytes:
        raise YamlLimitError(
            f"the text is {len(text.encode('utf-8', 'replace')):,} bytes; "
            f"at most {limits.max_bytes:,} are allowed"
        )
    sizes: list[int] = []  # values inside each open collection, itself included
    anchors: dict[str, int] = {}  # anchor -> values it stands for
    opened: list[str | None] = []  # anchor of each open collection
    total = 0
    loader = loader_class(text)
    try:
        for event in _events_within_depth(loader, limits.max_depth):
            if isinstance(event, _COLLECTION_START):
                if len(sizes) >= limits.max_depth:
                    raise YamlLimitError(
                        f"line {_line(event)}: nested deeper than {limits.max_depth} levels"
                    )
                sizes.append(1)
                opened.append(event.anchor)
                count = 1
            elif isinstance(event, _COLLECTION_END):
                size = sizes.pop()
                anchor = opened.pop()
                if anchor is not None:
                    anchors[anchor] = size
                if sizes:
                    sizes[-1] += size
                continue
            elif isinstance(event, yaml.ScalarEvent):
                if len(event.value) > limits.max_scalar_chars:
                    raise YamlLimitError(
                        f"line {_line(event)}: a value of {len(event.value):,} characters; "
                        f"at most {limits.max_scalar_chars:,} are allowed"
                    )
                count = 1
                if event.anchor is not None:
                    anchors[event.anchor] = 1
            elif isinstance(event, yaml.AliasEvent):
                if event.anchor in opened:
                    raise YamlLimitError(
                        f"line {_line(event)}: alias *{shorten(event.anchor)} refers to a "
                        "collection that contains it"
                    )
                count = anchors.get(event.anchor, 1)
            else:
                continue
            if sizes and not isinstance(event, _COLLECTION_START):
                sizes[-1] += count
            total += count
            if total > limits.max_values:
                raise YamlLimitError(
                    f"line {_line(event)}: more than {limits.max_values:,} values "
                    "(aliases counted as often as they are used)"
                )
    finally:
        loader.dispose()


class _StrictConstructor(SafeConstructor):
    """SafeConstructor that refuses a key given twice in one mapping (merge keys aside)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _value in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, Hashable):
                    continue  # SafeConstructor reports the unhashable key
                if key in first_line:
                    raise ConstructorError(
                        None, None,
                        f"duplicate key {short_repr(key)} (first given on line "
                        f"{first_line[key]})",
                        key_node.start_mark,
                    )
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class _TabTolerantScanner(yaml.scanner.Scanner):
    """The pure-Python scanner with libyaml's rule for tabs between tokens, and a flow depth
    limit.

    libyaml skips a tab where a simple key cannot start or inside flow collections, so
    `version: v1<TAB># comment` parses; PyYAML's scanner stops there.
    """

    def fetch_flow_collection_start(self, token_class: type) -> None:
        # The scanner looks ahead across every `[` before the parser sees the first one; stop
        # at libyaml's kind of limit instead of scanning thousands of levels.
        if self.flow_level >= MAX_DEPTH:
            raise yaml.scanner.ScannerError(
                None, None, "exceeded maximum nesting depth", self.get_mark()
            )
        super().fetch_flow_collection_start(token_class)

    def scan_to_next_token(self) -> None:
        if self.index == 0 and self.peek() == "\ufeff":
            self.forward()
        while True:
            while self.peek() == " " or (
                self.peek() == "\t" and (self.flow_level or not self.allow_simple_key)
            ):
                self.forward()
            if self.peek() == "#":
                while self.peek() not in "\0\r\n\x85\u2028\u2029":
                    self.forward()
            if not self.scan_line_break():
                return
            if not self.flow_level:
                self.allow_simple_key = True


class PythonLoader(
    yaml.reader.Reader,
    _TabTolerantScanner,
    yaml.parser.Parser,
    yaml.composer.Composer,
    _StrictConstructor,
    yaml.resolver.Resolver,
):
    """Pure-Python strict safe loader."""

    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        _TabTolerantScanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        _StrictConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)


LOADERS: dict[str, type] = {"python": PythonLoader}
if getattr(yaml, "__with_libyaml__", False):

    from yaml.cyaml import CParser

    class LibyamlLoader(CParser, _StrictConstructor, yaml.resolver.Resolver):
        """libyaml's parser with the strict constructor."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            _StrictConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)

    LOADERS = {"libyaml": LibyamlLoader, **LOADERS}

DEFAULT_LOADER = next(iter(LOADERS))


def parse_yaml(
    text: str, *, loader: str = DEFAULT_LOADER, limits: YamlLimits = CONFIG_LIMITS
) -> object:
    """The value of one YAML document, within `limits` (a config file's by default).

    Raises:
        YamlLimitError: past a limit (size, depth, value length, values after aliases).
        yaml.YAMLError: not YAML, several documents, a duplicate key, an unknown tag.
        ValueError: a scalar that cannot be converted (e.g. an out-of-range date).
    """
    loader_class = LOADERS[loader]
    check_limits(text, loader_class, limits)
    instance = loader_class(text)
    try:
        return instance.get_single_data()
    finally:
        instance.dispose()


def yaml_problem(err: BaseException) -> str:
    """A short, one-line description of a parse error, with its line when known."""
    if isinstance(err, YamlLimitError):
        return str(err)
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    problem = shorten(" ".join(str(problem).split()), 2 * SHORT_CHARS)
    return f"line {mark.line + 1}: {problem}" if mark is not None else problem
