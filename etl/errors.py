"""Errors that the command-line tools report as one line and exit code 2."""


class UserError(Exception):
    """A problem with what the user asked for (bad input, missing model or data).

    The message is a single line that says what is wrong and how to fix it.
    """

    exit_code = 2
