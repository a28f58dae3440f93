"""Shared command-line helpers."""

from __future__ import annotations

import argparse

from etl.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose usage errors are one-line ``UserError``s (exit code 2)."""

    def error(self, message: str):
        """Raise instead of printing the usage block and exiting."""
        raise UserError(f"{message} (see {self.prog} --help)")
