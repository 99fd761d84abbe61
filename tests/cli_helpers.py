"""Run the memaudit CLI in-process and capture its exit code and output."""

import pytest

from memaudit.cli.app import main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `memaudit ARGS`."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err
