"""The `prefix-router` entry point: top-level and per-subcommand help, exit codes, broken pipes.

Help is checked in-process through `router.cli.main` (argparse exits with SystemExit(0)); the
console behaviour that only a real process shows (a reader that closes the pipe early) runs
`python -m router` in a subprocess.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from router.cli import build_parser, main

REPO_ROOT = Path(__file__).resolve().parent.parent

# The flags a user reaches for first; each must appear in that subcommand's --help.
KEY_FLAGS: dict[str, tuple[str, ...]] = {
    "analyze": ("--trace", "--json", "--cache-tokens"),
    "gen-trace": ("--kind", "--out", "--seed", "--groups", "--turns"),
    "profiles": ("--json", "--profile"),
    "serve": ("--host", "--port", "--backend", "--policy", "--embedded"),
    "sim": ("--host", "--port", "--count", "--profile", "--speedup"),
    "simulate": (
        "--trace",
        "--backends",
        "--profile",
        "--load",
        "--policies",
        "--json",
        "--plot",
        "--start",
        "--duration",
        "--find-capacity",
        "--slo-ttft-p90",
    ),
}


def _subcommands() -> list[str]:
    """Subcommand names as the parser discovered them (argparse keeps them on one action)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: prefix-router")
    return out


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "router", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=60,
    )


def test_top_level_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    out = _help(["--help"], capsys)
    for name in _subcommands():
        assert name in out
    for name in KEY_FLAGS:
        assert name in _subcommands(), f"subcommand {name} disappeared"


@pytest.mark.parametrize("name", sorted(KEY_FLAGS))
def test_subcommand_help_mentions_its_key_flags(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _help([name, "--help"], capsys)
    assert out.startswith(f"usage: prefix-router {name}")
    missing = [flag for flag in KEY_FLAGS[name] if flag not in out]
    assert not missing, f"{name} --help does not mention {missing}"


def test_every_discovered_subcommand_has_working_help(capsys: pytest.CaptureFixture[str]) -> None:
    """Subcommands added later (replay, compare, ...) get the same check for free."""
    for name in _subcommands():
        out = _help([name, "--help"], capsys)
        assert f"prefix-router {name}" in out


def test_no_subcommand_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_unknown_subcommand_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_console_help_and_version() -> None:
    done = _run("--help")
    assert done.returncode == 0, done.stderr
    assert "simulate" in done.stdout and "profiles" in done.stdout
    version = _run("--version")
    assert version.returncode == 0
    assert version.stdout.startswith("prefix-router ")


@pytest.mark.parametrize(
    ("args", "codes"),
    [
        (("profiles", "--json"), {1}),
        # argparse swallows OSError from its own help writes, so --help may still exit 0.
        (("simulate", "--help"), {0, 1}),
    ],
)
def test_reader_closing_the_pipe_early_exits_quietly(
    args: tuple[str, ...], codes: set[int]
) -> None:
    """`prefix-router ... | head` must not print a BrokenPipeError traceback.

    The read end is closed before the child has even finished starting Python, so its first
    write (or its final flush) is certain to meet EPIPE.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "router", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    code = proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert err == ""
    assert code in codes


def test_sim_priority_scheduling_needs_fcfs_as_sglang() -> None:
    with pytest.raises(SystemExit, match="needs --schedule-policy fcfs"):
        main(["sim", "--schedule-policy", "lpm", "--enable-priority-scheduling"])
