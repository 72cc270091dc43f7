"""Tests for control files: stanza syntax, the application fields, versions and
dependency relations."""

from __future__ import annotations

import pytest

from updater.control import (
    Relation,
    compare_versions,
    format_relations,
    format_stanza,
    parse_provides,
    parse_relations,
    parse_stanzas,
    parse_version,
)
from updater.errors import PackageError
from updater.ipk import DEFAULT_HEALTH_WINDOW, DEFAULT_STOP_TIMEOUT, parse_control

CONTROL = """\
Package: hello
Version: 1:2.0-r1
Architecture: arm64
Maintainer: Someone <someone@example.com>
Depends: libfoo (>= 1.2), bar | baz
Provides: greeter (= 2.0), salutation
Description: says hello
 at length.
 .
 More text.
App-Exec: bin/hello --name "big world"
App-Stop-Timeout: 7.5
App-Health-Window: 0
"""


def test_control_fields_parsed() -> None:
    control = parse_control(CONTROL, "hello.ipk")
    assert control.name == "hello"
    assert control.version.epoch == 1
    assert control.version.upstream == "2.0"
    assert control.version.revision == "r1"
    assert control.architecture == "arm64"
    assert control.command == ("bin/hello", "--name", "big world")
    assert control.stop_timeout == 7.5
    assert control.health_window == 0
    assert format_relations(control.depends) == "libfoo (>= 1.2), bar | baz"
    assert [str(p) for p in control.provides] == ["greeter (= 2.0)", "salutation"]
    assert control.label == "hello 1:2.0-r1"


def test_control_defaults() -> None:
    text = "Package: hi\nVersion: 1\nArchitecture: all\nApp-Exec: /bin/true\n"
    control = parse_control(text, "hi.ipk")
    assert control.stop_timeout == DEFAULT_STOP_TIMEOUT
    assert control.health_window == DEFAULT_HEALTH_WINDOW
    assert control.depends == ()
    assert control.provides == ()


def test_field_names_ignore_case() -> None:
    text = "package: hi\nVERSION: 1\narchitecture: all\napp-exec: /bin/true\n"
    assert parse_control(text, "hi.ipk").name == "hi"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("Package: hello\n", ""), "Package is missing"),
        (("Package: hello", "Package:"), "Package is empty"),
        (("Version: 1:2.0-r1\n", ""), "Version is missing"),
        (("Architecture: arm64\n", ""), "Architecture is missing"),
        (('App-Exec: bin/hello --name "big world"\n', ""), "App-Exec is missing"),
        (("Package: hello", "Package: Hello_World"), "invalid Package 'Hello_World'"),
        (("Package: hello", "Package: h"), "invalid Package 'h'"),
        (("1:2.0-r1", "2.0/evil"), "invalid version '2.0/evil'"),
        (("1:2.0-r1", ".hidden"), "invalid version '.hidden'"),
        (("libfoo (>= 1.2)", "libfoo (~> 1.2)"), "invalid relation"),
        (("greeter (= 2.0)", "greeter (>= 2.0)"), "invalid Provides entry"),
        (('"big world"', '"big world'), "cannot split App-Exec"),
        (('bin/hello --name "big world"', "../../bin/sh"), "leaves the package"),
        (("App-Stop-Timeout: 7.5", "App-Stop-Timeout: soon"), "App-Stop-Timeout"),
        (("App-Stop-Timeout: 7.5", "App-Stop-Timeout: -1"), "from 0 to 600"),
        (("App-Health-Window: 0", "App-Health-Window: 601"), "from 0 to 600"),
        (("App-Health-Window: 0", "App-Health-Window: nan"), "App-Health-Window"),
        (("Maintainer:", "Maintainer"), "expected 'Name: value'"),
        (("Package: hello\n", "Package: hello\nPackage: again\n"), "given again"),
        (
            ("Description: says hello\n", "Description: x\n\nPackage: two\n"),
            "exactly one",
        ),
    ],
)
def test_invalid_control_rejected(change: tuple[str, str], expected: str) -> None:
    text = CONTROL.replace(*change)
    with pytest.raises(PackageError, match=expected) as caught:
        parse_control(text, "hello.ipk")
    assert str(caught.value).startswith("hello.ipk: ")


def test_stanzas_keep_line_numbers_and_continuations() -> None:
    stanzas, issues = parse_stanzas("\n\nPackage: a1\nDescription: x\n y\n .\n")
    assert issues == []
    (stanza,) = stanzas
    assert stanza.line == 3
    field = stanza.field("description")
    assert field is not None
    assert field.line == 4
    assert field.value == "x\n y\n ."
    assert field.folded == "x y ."


def test_stanza_syntax_errors_drop_only_their_stanza() -> None:
    text = "Package: a1\n\n continuation\nPackage: b2\n\nbad line\n\nPackage: c3\n"
    stanzas, issues = parse_stanzas(text)
    assert [s.get("Package") for s in stanzas] == ["a1", "c3"]
    assert [(i.line, i.message) for i in issues] == [
        (3, "line 3: continuation line before the first field"),
        (6, "line 6: expected 'Name: value', got 'bad line'"),
    ]


def test_format_stanza_round_trip() -> None:
    stanzas, _ = parse_stanzas(CONTROL)
    fields = [(f.name, f.value) for f in stanzas[0].fields]
    assert format_stanza(fields) == CONTROL


@pytest.mark.parametrize(
    "fields",
    [[("Bad Name", "x")], [("Description", "x\nnot indented")], [("D", "x\n \n y")]],
)
def test_format_stanza_rejects_invalid(fields: list[tuple[str, str]]) -> None:
    with pytest.raises(ValueError):
        format_stanza(fields)


# dpkg --compare-versions agrees with each of these.
@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        ("1.0", "1.0.1"),
        ("1.0~rc1", "1.0"),
        ("1.0~~", "1.0~"),
        ("1.9", "1.10"),
        ("1.0", "1.0a"),
        ("1.0a", "1.0+"),
        ("1.0-r0", "1.0-r1"),
        ("1.0-9", "1.0-10"),
        ("2.0", "1:0.1"),
        ("0.9-r9", "1.0-r0"),
        ("1.0-1", "1.0.1-1"),
    ],
)
def test_version_order(lower: str, higher: str) -> None:
    assert compare_versions(parse_version(lower), parse_version(higher)) < 0
    assert compare_versions(parse_version(higher), parse_version(lower)) > 0


@pytest.mark.parametrize(("left", "right"), [("1.0", "1.00"), ("0:1.0", "1.0")])
def test_version_equal(left: str, right: str) -> None:
    assert compare_versions(parse_version(left), parse_version(right)) == 0


def test_relations_and_obsolete_operators() -> None:
    entries = parse_relations("aa (>= 1.0), bb | cc:any, dd (< 2), ee (> 3)")
    assert [[str(r) for r in entry] for entry in entries] == [
        ["aa (>= 1.0)"],
        ["bb", "cc"],
        ["dd (<= 2)"],
        ["ee (>= 3)"],
    ]


@pytest.mark.parametrize(
    ("operator", "version", "satisfied"),
    [
        ("<<", "1.0", False),
        ("<<", "1.1", True),
        ("<=", "1.0", True),
        ("=", "1.0", True),
        ("=", "1.0-r0", False),
        (">=", "1.0", True),
        (">>", "1.0", False),
        (">>", "0.9", True),
    ],
)
def test_relation_satisfied_by(operator: str, version: str, satisfied: bool) -> None:
    relation = Relation("aa", operator, parse_version(version))
    assert relation.satisfied_by(parse_version("1.0")) is satisfied


def test_versionless_provides_meets_only_unversioned_relations() -> None:
    assert Relation("aa").satisfied_by(None)
    assert not Relation("aa", ">=", parse_version("1")).satisfied_by(None)


def test_provides_parsed() -> None:
    assert [str(p) for p in parse_provides("aa, bb (= 2)")] == ["aa", "bb (= 2)"]
    assert parse_provides("") == ()
