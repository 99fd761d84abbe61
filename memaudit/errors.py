"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (path, option, checkpoint, data). Exit code 2, no traceback."""

    exit_code = 2


class SettingError(UserError):
    """A setting outside its range, worded by the setting's own name ("steps must be >= 1, not 0"); the CLI
    words it once more with the flag that sets it ("--steps must be >= 1, not 0")."""

    def __init__(self, setting: str, value: object, rule: str):
        self.setting, self.value, self.rule = setting, value, rule
        super().__init__(self.worded(setting))

    def worded(self, name: str) -> str:
        return f"{name} must be {self.rule}, not {self.value}"


def first_lines(exc: BaseException, n: int = 1, with_type: bool = False) -> str:
    """The first n non-blank lines of str(exc) joined by spaces; the exception's type name when there are none."""
    text = " ".join([line.strip() for line in str(exc).splitlines() if line.strip()][:n])
    if with_type:
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text or type(exc).__name__


# C0 and C1 controls (U+0085 is a line break to str.splitlines and to terminals) and the Unicode line and
# paragraph separators
_CONTROL = {i: f"\\x{i:02x}" for i in [*range(32), *range(127, 160)]} | {i: f"\\u{i:04x}" for i in (0x2028, 0x2029)}


def printable(text: object) -> str:
    """str(text) with control characters (newlines, escapes, ...) written as \\xNN, so a file name cannot break
    a one-line message or drive the terminal."""
    return str(text).translate(_CONTROL)
