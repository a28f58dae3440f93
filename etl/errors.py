"""Errors that the command-line tools report as one line and exit code 2, and the helpers
that make them so (an argparse parser that raises them, SIGTERM as an interrupt, one-line
messages for write failures); also the ``--version`` every command shares."""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.metadata
import os
import signal
import threading


class UserError(Exception):
    """A problem with what the user asked for (bad input, missing model or data).

    The message is a single line that says what is wrong and how to fix it.
    """

    exit_code = 2


RESUMABLE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN,
                              errno.ETIMEDOUT, errno.ENOMEM})
"""Write errors that go away by themselves or once space is freed: the staged batches of
the run are kept, and the same command resumes it."""


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose usage errors are one-line ``UserError``s (exit code 2)."""

    def error(self, message: str):
        """Raise instead of printing the usage block and exiting."""
        raise UserError(f"{message} (see {self.prog} --help)")


def package_version() -> str:
    """The installed version of the ``entropy-warehouse`` package, or ``unknown`` when it
    is run from a checkout that was never installed."""
    try:
        return importlib.metadata.version("entropy-warehouse")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def add_version_flag(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` the ``--version`` of every command: it prints
    ``entropy-warehouse VERSION`` and exits 0."""
    parser.add_argument("--version", action="version",
                        version=f"entropy-warehouse {package_version()}",
                        help="print the version and exit")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that a run stops as it does on Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises_terminated():
    """Make SIGTERM raise ``Terminated`` inside the block; the previous handler comes back
    after it. Outside the main thread (where Python allows no handler) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def write_failure(exc: Exception, warehouse) -> str:
    """The one-line message for an ``OSError`` (or an object-storage client's error) that
    ended a run writing to ``warehouse``."""
    code = getattr(exc, "errno", None)
    if code:
        reason = os.strerror(code)
    else:
        reason = one_line(getattr(exc, "strerror", None) or str(exc)) or type(exc).__name__
    message = f"could not write the run to {warehouse}: {reason}; nothing was published"
    # an error without errno (an object-storage client's, a timeout: an endpoint that
    # stopped answering) passes like a full disk
    if code in RESUMABLE_ERRNOS or not code:
        message += "; run the same command again to resume"
    return message


def one_line(text: str) -> str:
    """``text`` with its lines joined by spaces (messages on stderr are one line)."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
