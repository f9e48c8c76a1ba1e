"""What every command line of the package shares: a user error is one ``error: ...`` line and exit code 2,
known third-party noise is hidden unless ``--verbose``.

    quiet_third_party()                       # first thing in an entry script, before paddle is imported
    parser = CommandLineParser(description=...)
    ...
    run_command(main)                         # UsageError -> "error: ..." on stderr, exit 2

Internal errors (anything but :class:`UsageError` and argparse's own) keep their traceback.
"""
import argparse
import os
import re
import sys
import warnings
from typing import Callable, Optional, Sequence

__all__ = ["UsageError", "CommandLineParser", "quiet_third_party", "run_command", "fail", "check_output_dir"]

# warnings printed by Paddle, setuptools and paddlenlp on import that say nothing about the user's run
THIRD_PARTY_NOISE = ("No ccache found", "Setuptools is replacing distutils", "`pydantic.config.Extra` is deprecated",
                     "To copy construct from a tensor")


class UsageError(ValueError):
    """A problem with the command line or an input file, found before any model is loaded."""


def _one_line(message: str) -> str:
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def fail(message: str) -> None:
    """Print ``error: <message>`` (one line) on stderr and exit with code 2."""
    sys.stderr.write(f"error: {_one_line(message)}\n")
    sys.exit(2)


class CommandLineParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one ``error: ...`` line (exit 2) and which has ``--verbose``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--verbose", action="store_true", default=False,
                          help="show third-party warnings and Paddle's info log lines (hidden by default)")

    def error(self, message):
        fail(message)


def quiet_third_party(argv: Optional[Sequence[str]] = None) -> bool:
    """Unless ``--verbose`` is in ``argv`` (default ``sys.argv``): hide the known third-party warnings and Paddle's
    C++ info lines (``GLOG_minloglevel=2``, read when Paddle is first imported). Returns True when hidden."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--verbose" in argv:
        return False
    for text in THIRD_PARTY_NOISE:
        warnings.filterwarnings("ignore", message=f".*{re.escape(text)}")
    os.environ.setdefault("GLOG_minloglevel", "2")
    return True


def run_command(main: Callable, argv: Optional[Sequence[str]] = None):
    """``main(argv)``; a :class:`UsageError` becomes ``error: <message>`` and exit code 2."""
    try:
        return main(argv)
    except UsageError as error:
        fail(str(error))


def check_output_dir(path, flag: str = "--output_dir"):
    """Create ``path`` (and parents) and prove it is writable with a probe file; :class:`UsageError` otherwise."""
    from pathlib import Path

    folder = Path(path)
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"{flag} {folder} is not a writable folder ({error.strerror or error})") from None
    return folder
