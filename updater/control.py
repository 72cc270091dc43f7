"""Debian control syntax, as used by .ipk control files and opkg's status file.

A control file is a list of stanzas (Debian policy calls them paragraphs) separated by
blank lines. Each stanza is a list of ``Name: value`` fields. A line that starts with
a space or a tab continues the previous field's value. Field names are compared
without regard to case. This module parses that syntax with line numbers, writes it
back, and implements the two pieces of dpkg semantics that opkg shares: version
comparison and the ``Depends`` relation syntax.

`parse_stanzas` never raises on malformed input. It returns the stanzas it could read
and one `SyntaxIssue` per stanza it had to drop, so a caller that must keep working
(the installed-package database) loses only the damaged stanza.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

# Debian policy 5.1: a field name is printable US-ASCII except space and colon, and
# does not start with '#' or '-'.
_FIELD_NAME = re.compile(r"[!-9;-~]+")
# Debian policy 5.6.1: lower case letters, digits, '+', '-', '.'; at least two
# characters; starting with a letter or digit.
PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+")
# Debian policy 5.6.12: [epoch:]upstream_version[-debian_revision]. The characters
# allowed here exclude '/' and '_', so a version can name a directory on the device
# and '_' can separate it from a suffix.
_VERSION = re.compile(
    r"(?:(?P<epoch>[0-9]+):)?(?P<upstream>[A-Za-z0-9][A-Za-z0-9.+~-]*?)"
    r"(?:-(?P<revision>[A-Za-z0-9.+~]+))?"
)
# One alternative of a relation field: "name", "name (>= 1.0)", "name:any (<< 2)".
# '<' and '>' are the obsolete spellings of '<=' and '>=' that dpkg and opkg still
# accept.
_RELATION = re.compile(
    r"(?P<name>[a-z0-9][a-z0-9+.-]+)(?::[a-z0-9-]+)?"
    r"(?:\s*\(\s*(?P<operator><<|<=|>=|>>|=|<|>)\s*(?P<version>[^()\s]+)\s*\))?"
)
_OBSOLETE_OPERATORS = {"<": "<=", ">": ">="}


@dataclass(frozen=True)
class Field:
    """One field of a stanza.

    Attributes:
        name: the field name as written, for example ``Package``.
        value: the value after the colon without surrounding whitespace. The lines of
            a multi-line value are joined with ``\\n`` and keep their leading space.
        line: the 1-based line number of the field's first line.
    """

    name: str
    value: str
    line: int

    @property
    def folded(self) -> str:
        """The value with its lines joined by single spaces, as for ``Depends``."""
        return " ".join(part.strip() for part in self.value.split("\n")).strip()


@dataclass(frozen=True)
class Stanza:
    """One stanza: its fields in file order and the line it starts on."""

    fields: tuple[Field, ...]
    line: int

    def field(self, name: str) -> Field | None:
        """Return the field called ``name`` (any case), or None."""
        wanted = name.lower()
        for field in self.fields:
            if field.name.lower() == wanted:
                return field
        return None

    def get(self, name: str, default: str | None = None) -> str | None:
        """Return the folded value of field ``name``, or ``default`` if it is absent."""
        field = self.field(name)
        return default if field is None else field.folded


@dataclass(frozen=True)
class SyntaxIssue:
    """A stanza that `parse_stanzas` dropped: where it starts and what is wrong."""

    line: int
    message: str


def parse_stanzas(text: str) -> tuple[list[Stanza], list[SyntaxIssue]]:
    """Split ``text`` into stanzas and parse their fields.

    A stanza with a syntax error (a line without a colon, an invalid field name, a
    continuation line before the first field, or a field given twice) is dropped and
    reported with the number of the offending line.
    """
    stanzas: list[Stanza] = []
    issues: list[SyntaxIssue] = []
    for first_line, lines in _split_blocks(text):
        try:
            stanzas.append(Stanza(tuple(_parse_fields(first_line, lines)), first_line))
        except _StanzaSyntaxError as error:
            issues.append(SyntaxIssue(error.line, str(error)))
    return stanzas, issues


def format_stanza(fields: Iterable[tuple[str, str]]) -> str:
    """Return one stanza as text: ``Name: value`` lines and a final newline.

    Raises:
        ValueError: a field name is invalid, or a value has an empty line or a line
            that does not start with a space or tab after its first line.
    """
    lines = []
    for name, value in fields:
        if not _FIELD_NAME.fullmatch(name) or name[0] in "#-":
            raise ValueError(f"invalid control field name {name!r}")
        first, *rest = value.split("\n")
        for line in rest:
            if not line.strip() or line[0] not in " \t":
                raise ValueError(
                    f"field {name}: continuation line {line!r} must start with a space"
                    " and must not be empty (write ' .' for an empty line)"
                )
        lines.append(f"{name}: {first}" if first else f"{name}:")
        lines.extend(rest)
    return "".join(line + "\n" for line in lines)


class _StanzaSyntaxError(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


def _split_blocks(text: str) -> Iterator[tuple[int, list[tuple[int, str]]]]:
    block: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            block.append((number, line))
        elif block:
            yield block[0][0], block
            block = []
    if block:
        yield block[0][0], block


def _parse_fields(first_line: int, lines: list[tuple[int, str]]) -> Iterator[Field]:
    seen: dict[str, int] = {}
    name = ""
    value: list[str] = []
    start = first_line
    for number, line in lines:
        if line[0] in " \t":
            if not name:
                raise _StanzaSyntaxError(
                    number, f"line {number}: continuation line before the first field"
                )
            value.append(line.rstrip())
            continue
        if name:
            yield Field(name, "\n".join(value), start)
        name, value, start = _field_start(number, line, seen)
    if name:
        yield Field(name, "\n".join(value), start)


def _field_start(
    number: int, line: str, seen: dict[str, int]
) -> tuple[str, list[str], int]:
    name, colon, rest = line.partition(":")
    if not colon:
        raise _StanzaSyntaxError(
            number, f"line {number}: expected 'Name: value', got {line[:60]!r}"
        )
    if not _FIELD_NAME.fullmatch(name) or name[0] in "#-":
        raise _StanzaSyntaxError(
            number, f"line {number}: invalid field name {name[:40]!r}"
        )
    key = name.lower()
    if key in seen:
        raise _StanzaSyntaxError(
            number,
            f"line {number}: field {name} given again (first on line {seen[key]})",
        )
    seen[key] = number
    return name, [rest.strip()], number


# -- versions ---------------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    """A parsed package version: ``[epoch:]upstream[-revision]``."""

    epoch: int
    upstream: str
    revision: str
    text: str

    def __str__(self) -> str:
        return self.text


def parse_version(text: str) -> Version:
    """Parse a Debian/opkg version string.

    Raises:
        ValueError: ``text`` is empty or has characters outside ``A-Za-z0-9.+~-``
            (and ``:`` after a numeric epoch). The message shows the value.
    """
    match = _VERSION.fullmatch(text)
    if match is None:
        raise ValueError(
            f"invalid version {text!r}: expected [epoch:]upstream[-revision] made of"
            " letters, digits and '.+~-', starting with a letter or digit"
        )
    return Version(
        epoch=int(match["epoch"] or 0),
        upstream=match["upstream"],
        revision=match["revision"] or "",
        text=text,
    )


def compare_versions(left: Version, right: Version) -> int:
    """Compare two versions as dpkg and opkg do; return <0, 0 or >0.

    Epochs compare as numbers. Upstream versions and revisions compare with dpkg's
    algorithm: alternating runs of non-digits (compared character by character, with
    '~' before everything, even the end of the string, and letters before other
    characters) and runs of digits (compared as numbers).
    """
    if left.epoch != right.epoch:
        return left.epoch - right.epoch
    result = _compare_fragment(left.upstream, right.upstream)
    if result:
        return result
    return _compare_fragment(left.revision, right.revision)


def _character_order(character: str) -> int:
    if not character or character.isdigit():
        return 0
    if character.isascii() and character.isalpha():
        return ord(character)
    if character == "~":
        return -1
    return ord(character) + 256


def _compare_fragment(left: str, right: str) -> int:
    i = j = 0
    while i < len(left) or j < len(right):
        while (i < len(left) and not left[i].isdigit()) or (
            j < len(right) and not right[j].isdigit()
        ):
            left_order = _character_order(left[i] if i < len(left) else "")
            right_order = _character_order(right[j] if j < len(right) else "")
            if left_order != right_order:
                return left_order - right_order
            i += 1
            j += 1
        while i < len(left) and left[i] == "0":
            i += 1
        while j < len(right) and right[j] == "0":
            j += 1
        first_difference = 0
        while i < len(left) and left[i].isdigit() and j < len(right):
            if not right[j].isdigit():
                break
            if not first_difference:
                first_difference = ord(left[i]) - ord(right[j])
            i += 1
            j += 1
        if i < len(left) and left[i].isdigit():
            return 1
        if j < len(right) and right[j].isdigit():
            return -1
        if first_difference:
            return first_difference
    return 0


# -- relations ----------------------------------------------------------------------


@dataclass(frozen=True)
class Relation:
    """One alternative of a ``Depends`` entry: a package name and an optional
    version constraint such as ``>= 1.0``."""

    name: str
    operator: str | None = None
    version: Version | None = None

    def __str__(self) -> str:
        if self.operator is None or self.version is None:
            return self.name
        return f"{self.name} ({self.operator} {self.version})"

    def satisfied_by(self, version: Version | None) -> bool:
        """Return whether a package of this name at ``version`` meets the constraint.

        ``version`` is None for a versionless ``Provides`` entry, which only meets a
        relation without a constraint, as in dpkg.
        """
        if self.operator is None or self.version is None:
            return True
        if version is None:
            return False
        order = compare_versions(version, self.version)
        return {
            "<<": order < 0,
            "<=": order <= 0,
            "=": order == 0,
            ">=": order >= 0,
            ">>": order > 0,
        }[self.operator]


Dependency = tuple[Relation, ...]
"""One comma-separated entry of ``Depends``: alternatives joined by ``|``."""


def parse_relations(text: str) -> tuple[Dependency, ...]:
    """Parse a ``Depends``-style field into entries of alternatives.

    Raises:
        ValueError: an entry is empty or not ``name [(op version)]``.
    """
    if not text.strip():
        return ()
    entries = []
    for entry in text.split(","):
        alternatives = []
        for alternative in entry.split("|"):
            alternatives.append(_parse_relation(alternative.strip(), text))
        entries.append(tuple(alternatives))
    return tuple(entries)


def parse_provides(text: str) -> tuple[Relation, ...]:
    """Parse a ``Provides`` field: names, each with an optional ``(= version)``.

    Raises:
        ValueError: an entry has alternatives, another operator, or is invalid.
    """
    provides = []
    for entry in parse_relations(text):
        relation = entry[0]
        if len(entry) > 1 or relation.operator not in (None, "="):
            raise ValueError(
                f"invalid Provides entry {format_relations([entry])!r}: expected"
                " 'name' or 'name (= version)'"
            )
        provides.append(relation)
    return tuple(provides)


def _parse_relation(text: str, field: str) -> Relation:
    match = _RELATION.fullmatch(text)
    if match is None:
        raise ValueError(
            f"invalid relation {text!r} in {field!r}: expected 'name' or"
            " 'name (op version)' with op one of << <= = >= >>"
        )
    operator = match["operator"]
    if operator is None:
        return Relation(match["name"])
    return Relation(
        match["name"],
        _OBSOLETE_OPERATORS.get(operator, operator),
        parse_version(match["version"]),
    )


def format_relations(entries: Sequence[Dependency]) -> str:
    """Return ``entries`` in ``Depends`` syntax."""
    return ", ".join(" | ".join(str(r) for r in entry) for entry in entries)
