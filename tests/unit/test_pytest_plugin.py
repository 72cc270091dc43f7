"""The pytest plugin, run in inner pytest sessions with ``pytester``: --board
parametrisation and validation, the ``needs`` capability marker and --keep-devices.

The inner sessions boot no QEMU: their tests use only the ``board`` fixture, which
needs no images. They load the plugin by its ``pytest11`` entry point name with
``-p mbl_sim`` and no other installed plugin, because pytester drops the modules an
inner session imports and other plugins (hypothesis) cost a second per reimport.
One test checks that a plain run loads the plugin by itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mbl_sim.board import load_board
from mbl_sim.pytest_plugin import BOARD_CAPABILITIES, board_lacks

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def _no_plugin_autoload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """Run an inner pytest session in this process with the plugin loaded."""
    return pytester.runpytest("-p", "mbl_sim", *args)


BOARD_TEST = """
def test_board_name(board):
    assert board.name

def test_without_board():
    pass
"""

NEEDS_TESTS = """
import pytest

@pytest.mark.needs("u-boot-env")
def test_needs_env(board):
    assert board.storage.env is not None

@pytest.mark.needs("flag-files")
def test_needs_flag_files(board):
    assert board.storage.env is None

@pytest.mark.needs("u-boot", "u-boot-env")
def test_needs_both(board):
    assert board.firmware.is_u_boot
"""

# The fixture fails if set up: a skipped test must not set up its fixtures, which
# on real tests build images and boot a device.
NEEDS_BEFORE_FIXTURES = """
import pytest

@pytest.fixture
def expensive():
    raise RuntimeError("fixture set up for a skipped test")

@pytest.mark.needs("flag-files")
def test_flag_files(board, expensive):
    pass
"""


def test_default_board_id(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(BOARD_TEST)

    result = run(pytester, "--collect-only", "-q")

    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        [
            "test_default_board_id.py::test_board_name[[]qemu-virt-a53[]]",
            "test_default_board_id.py::test_without_board",
        ]
    )


def test_one_board_id(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(BOARD_TEST)

    result = run(pytester, "--collect-only", "-q", "--board", "imx6ul-evk")

    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*::test_board_name[[]imx6ul-evk[]]"])
    result.stdout.no_fnmatch_line("*qemu-virt-a53*")


def test_two_boards_ids(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(BOARD_TEST)

    result = run(
        pytester,
        "--collect-only",
        "-q",
        "--board",
        "qemu-virt-a53",
        "--board",
        "imx6ul-evk",
    )

    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        [
            "*::test_board_name[[]qemu-virt-a53[]]",
            "*::test_board_name[[]imx6ul-evk[]]",
            "*::test_without_board",
            "3 tests collected*",
        ]
    )


def test_two_boards_run_each(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_board_name(board, request):
            assert request.node.callspec.id == board.name
        """
    )

    result = run(pytester, "--board", "rpi3", "--board", "imx7-warp")

    result.assert_outcomes(passed=2)


def copy_board_file(pytester: pytest.Pytester, name: str) -> str:
    """Copy the shipped board file ``name`` into the inner session's directory and
    return its relative path.

    A path outside that directory would make pytest take its rootdir, and the
    configuration there, from the path's ancestors.
    """
    source = Path(load_board(name).source)
    target = pytester.path / "boards" / source.name
    target.parent.mkdir()
    shutil.copyfile(source, target)
    return str(target.relative_to(pytester.path))


def test_board_file_path(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(BOARD_TEST)
    path = copy_board_file(pytester, "rpi3")

    result = run(pytester, "--collect-only", "-q", "--board", path)

    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*::test_board_name[[]rpi3[]]"])


def test_unknown_board_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(BOARD_TEST)

    result = run(pytester, "--board", "no-such-board")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: --board no-such-board: unknown board 'no-such-board'; available*"]
    )
    result.stderr.fnmatch_lines(["*qemu-virt-a53*"])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_missing_board_file_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(BOARD_TEST)

    result = run(pytester, "--board", "boards/missing.yaml")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --board boards/missing.yaml: *missing.yaml*"])


def test_same_board_twice_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(BOARD_TEST)
    path = copy_board_file(pytester, "rpi3")

    result = run(pytester, "--board", "rpi3", "--board", path)

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: --board {path}: board 'rpi3' is already*"])


def test_needs_runs_and_skips(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(NEEDS_TESTS)

    result = run(pytester, "-rs", "--board", "qemu-virt-a53", "--board", "imx6ul-evk")

    result.assert_outcomes(passed=3, skipped=3)
    result.stdout.fnmatch_lines_random(
        [
            "SKIPPED [[]1[]] *: board imx6ul-evk lacks 'u-boot-env': its boot state"
            " is 'flag-files'",
            "SKIPPED [[]1[]] *: board qemu-virt-a53 lacks 'flag-files': its boot state"
            " is 'u-boot-env'",
            "SKIPPED [[]1[]] *: board imx6ul-evk lacks 'u-boot': its firmware kind"
            " is 'none'",
        ]
    )


def test_needs_skips_before_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(NEEDS_BEFORE_FIXTURES)

    skipped = run(pytester, "--board", "rpi3")
    set_up = run(pytester, "--board", "imx7-warp")

    skipped.assert_outcomes(skipped=1)
    set_up.assert_outcomes(errors=1)
    set_up.stdout.fnmatch_lines(["*RuntimeError: fixture set up for a skipped test"])


def test_needs_unknown_capability_fails(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.needs("uboot")
        def test_typo(board):
            pass
        """
    )

    result = run(pytester)

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*@pytest.mark.needs: unknown board capability 'uboot'; expected one of:"
            " u-boot, u-boot-env, flag-files"
        ]
    )


def test_needs_without_capability_fails(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.needs
        def test_bare(board):
            pass
        """
    )

    result = run(pytester)

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*takes one or more capability names*"])


def test_needs_without_board_fails(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.needs("u-boot")
        def test_no_board():
            pass
        """
    )

    result = run(pytester)

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*needs applies only to tests that use the board*"])


def test_needs_on_module(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        pytestmark = pytest.mark.needs("u-boot")

        def test_one(board):
            pass

        def test_two(board):
            pass
        """
    )

    result = run(pytester, "--board", "imx7-warp", "--board", "qemu-virt-a15")

    result.assert_outcomes(passed=2, skipped=2)


def test_needs_marker_registered(pytester: pytest.Pytester) -> None:
    result = run(pytester, "--markers")

    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        ["@pytest.mark.needs(*capabilities): *u-boot, u-boot-env, flag-files*"]
    )


def test_needs_strict_markers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(NEEDS_TESTS)

    result = run(pytester, "--strict-markers")

    result.assert_outcomes(passed=2, skipped=1)


def test_keep_devices_invalid_choice(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(BOARD_TEST)

    result = run(pytester, "--keep-devices", "sometimes")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--keep-devices: invalid choice: 'sometimes' (choose from *all*failed*none*"]
    )


@pytest.mark.parametrize(
    ("board_name", "capabilities"),
    [
        ("qemu-virt-a53", {"u-boot", "u-boot-env"}),
        ("qemu-virt-a15", {"u-boot", "u-boot-env"}),
        ("rpi3", {"u-boot", "u-boot-env"}),
        ("imx7-warp", {"flag-files"}),
        ("imx6ul-evk", {"flag-files"}),
    ],
)
def test_board_capabilities(board_name: str, capabilities: set[str]) -> None:
    board = load_board(board_name)

    present = {name for name in BOARD_CAPABILITIES if board_lacks(board, name) is None}

    assert present == capabilities


def test_board_lacks_unknown_capability() -> None:
    with pytest.raises(ValueError, match="unknown board capability 'uboot'"):
        board_lacks(load_board("qemu-virt-a53"), "uboot")


def test_plugin_loads_automatically(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD")
    pytester.makepyfile(BOARD_TEST)

    result = pytester.runpytest("--collect-only", "-q", "--board", "rpi3")

    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*::test_board_name[[]rpi3[]]"])
