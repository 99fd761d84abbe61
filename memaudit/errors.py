"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (path, option, checkpoint, data). Exit code 2, no traceback."""

    exit_code = 2
