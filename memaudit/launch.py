"""`python -m memaudit.launch [torchrun options] scan MODEL DATA ...`: torchrun with memaudit's exit codes.

torchrun (torch.distributed.run) exits 1 whenever a rank fails, so under plain `torchrun -m memaudit scan` a
failed gate, bad input (2) and an internal error (3) all read as 1 to a CI. This runs the same launcher
(`--nproc_per_node`, `--nnodes`, `--rdzv-*`, ... as torchrun takes them, before the memaudit command) and exits
with the ranks' own code: every rank exits with rank 0's (memaudit.distributed.finish), so rank 0's code is
the job's; 0 gates passed, 1 a gate failed, 2 bad input, 3 internal error, 130 interrupted.
"""

from __future__ import annotations

import sys
from typing import Optional

COMMANDS = ("scan", "inspect", "train", "smooth")
KNOWN_CODES = (1, 2, 3, 130)


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun's options, memaudit's arguments): memaudit's begin at the first command name."""
    for i, arg in enumerate(argv):
        if arg in COMMANDS:
            return argv[:i], argv[i:]
    return argv, []


def job_code(failures: dict) -> int:
    """The job's exit code from torchrun's failed ranks {rank: exit code}: rank 0's, else the lowest failed
    rank's; a signal or any other code is an internal error (3)."""
    code = failures[0] if 0 in failures else failures[min(failures)]
    return code if code in KNOWN_CODES else 3


def main(argv: Optional[list[str]] = None) -> int:
    launcher, command = split_argv(list(sys.argv[1:] if argv is None else argv))
    if not command:
        print(f"error: name a memaudit command after torchrun's options ({', '.join(COMMANDS)}), e.g. "
              "python -m memaudit.launch --nproc_per_node 2 scan MODEL DATA", file=sys.stderr)
        return 2
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    try:
        args = get_args_parser().parse_args([*launcher, "--module", "memaudit", *command])
    except SystemExit as exc:  # argparse has printed its usage error
        return 2 if exc.code else 0
    try:
        run(args)
    except ChildFailedError as exc:
        return job_code({rank: failure.exitcode for rank, failure in exc.failures.items()})
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
