"""The `memaudit` command: registers the subcommands and turns bad input into one-line errors (exit 2)."""

from __future__ import annotations

import atexit
import errno
import functools
import os
import sys

import typer

from memaudit import __version__, distributed
from memaudit.cli.options import FLAGS
from memaudit.errors import SettingError, UserError, first_lines, printable
from memaudit.resources import map_large_blocks

INTERNAL_ERROR = 3  # exit code of a bug in memaudit (never 1, which means "a gate failed")

app = typer.Typer(
    name="memaudit",
    help="Audit diffusion models for training-data memorization.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},  # help uses wide terminals (click's default caps it at 80)
)


def _version(value: bool) -> None:
    if value:
        print(f"memaudit {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Audit diffusion models for training-data memorization."""


class Interrupted(Exception):
    """Ctrl-C in a command, carried past typer (which turns a KeyboardInterrupt into a silent exit 130)."""


def _interruptible(func):
    """Wrap a command so that a KeyboardInterrupt leaves it as Interrupted(its message or "interrupted")."""
    @functools.wraps(func)
    def command(*args, **kwargs):
        if func.__name__ != "scan" and distributed.world_size() > 1:
            raise UserError(f"only `memaudit scan` runs under torchrun (WORLD_SIZE={distributed.world_size()}); "
                            f"run `memaudit {func.__name__}` as one process")
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt as exc:
            raise Interrupted(str(exc) or "interrupted") from None

    command.interruptible = True
    return command


def _register() -> None:
    """Add the commands (each module defines its command function; the dependency runs app -> commands)."""
    if app.registered_commands:
        return
    from memaudit.cli import inspect, scan, smooth, train

    for name, func in (("scan", scan.scan), ("inspect", inspect.inspect), ("train", train.train),
                       ("smooth", smooth.smooth)):
        app.command(name)(_interruptible(func))


def fail(message: str, code: int = 2) -> None:
    """Print `error: message` on one line to stderr (control characters escaped) and exit with `code`."""
    print(f"error: {printable(message)}", file=sys.stderr)
    raise SystemExit(code)


def _class_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app. Exit codes (docs/reliability.md): 0 gates passed, 1 a gate failed, 2 bad input
    (UserError, usage and I/O errors: one line), 3 internal error (one line), 130 interrupted. Under torchrun
    every rank exits with rank 0's code (memaudit.distributed)."""
    try:
        _run(argv)
    except distributed.Stopped as exc:  # rank 0 stopped the job: its code, and its error line, are the job's
        distributed.leave()
        raise SystemExit(exc.code) from None
    except SystemExit as exc:
        raise SystemExit(distributed.finish(_exit_code(exc))) from None


def _exit_code(exc: SystemExit) -> int:
    """The process exit code a SystemExit stands for: its int, 0 for None, 2 for anything else."""
    return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)


def console_main() -> None:
    """`memaudit` and `python -m memaudit`: main(), then the exit handlers, the streams flushed, and an exit
    with the command's code that skips the interpreter's teardown. Native threads alive at the teardown
    (gloo's under torchrun; any daemon thread) can abort it with SIGABRT ("terminate called without an active
    exception"; 1 run in 10 with a thread polling the stack), which made a failed gate's exit 1 a -6 after its
    reports were written."""
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(code)


def _run(argv: list[str] | None) -> None:
    """The command, its errors turned into one-line messages and exit codes (SystemExit)."""
    _register()
    map_large_blocks()  # before the data and the model are loaded (memaudit.resources)
    if argv is not None and any("\x00" in str(a) for a in argv):
        fail("an argument contains a NUL byte; no file name can")  # a shell cannot pass one; an API caller can
    try:
        result = app(args=argv, prog_name="memaudit", standalone_mode=False)
    except distributed.Stopped:
        raise
    except SettingError as exc:
        fail(exc.worded(FLAGS.get(exc.setting, exc.setting)))
    except UserError as exc:
        fail(str(exc) or type(exc).__name__)  # ours: one sentence (any newline in a file name is escaped)
    except Interrupted as exc:
        fail(first_lines(exc), 130)
    except (KeyboardInterrupt, typer.Abort):
        fail("interrupted", 130)
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except MemoryError:
        fail("out of memory: lower --batch-size or --samples, or audit a subset with --limit")
    except OSError as exc:
        reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        fail(f"{str(exc.filename) + ': ' if exc.filename else ''}{reason}")
    except Exception as exc:  # click's exceptions (typer may vendor its own copy of click)
        names = _class_names(exc)
        if "NoArgsIsHelpError" in names:
            print(exc.format_message(), file=sys.stderr)
            raise SystemExit(2) from None
        if "ClickException" in names:
            fail(" ".join(exc.format_message().split()), getattr(exc, "exit_code", 2))
        if "OutOfMemoryError" in names:  # torch.cuda.OutOfMemoryError
            fail("out of GPU memory: lower --batch-size, or run on --device cpu")
        fail(f"internal error: {first_lines(exc, with_type=True)} (a bug in memaudit {__version__}; please report "
             "it with the command you ran)", INTERNAL_ERROR)
    raise SystemExit(result if isinstance(result, int) else 0)
