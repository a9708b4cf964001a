"""The error types users see, the exit codes, and the one-line form of any exception.

Everything a user can get wrong (a flag, a config key, a model name, a layer path, a weights file) raises
`GradcamError` with a message that names the culprit and what was expected. The CLI turns it into one line
on stderr and exit code 2, so scripts can tell "you called it wrong" from "some images failed" (exit 1).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What `gradcam` returns; scripts and CI jobs act on these numbers, so they never change meaning."""

    OK = 0  # every image explained (or skipped by --only-below)
    IMAGE_ERRORS = 1  # some images failed; their rows say why
    USAGE = 2  # usage, config, model, weights, layer or annotation error: nothing ran
    GATE_FAILED = 3  # a --fail-under/--fail-over gate failed (wins over IMAGE_ERRORS)
    STOPPED = 4  # an internal error, or a torchrun job that lost a rank (what was done is kept)
    MACHINE = 5  # the machine stopped the run: disk full, quota, read-only OUT, inputs gone (what was done is kept)
    HANGUP = 129  # SIGHUP (128 + 1): the terminal or session went away; everything written so far is kept
    INTERRUPTED = 130  # Ctrl-C (SIGINT, 128 + 2): everything written so far is kept
    TERMINATED = 143  # SIGTERM (128 + 15): CI cancellation, `timeout`, Kubernetes, Slurm; everything is kept


class Explained(Exception):
    """An exception whose message is already a complete one-line explanation for a user.

    Messages often quote other libraries' exceptions (torch's span several lines), so line breaks become
    spaces here, once: whatever the source, the CLI prints exactly one line.
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(" ".join(part.strip() for part in str(message).splitlines()))


class GradcamError(Explained):
    """A problem the caller can fix (exit code 2)."""


class RunStopped(Explained):
    """A run that could not finish for a reason outside the caller's inputs: a rank of a distributed run died,
    was stopped, or lost contact. What was written is kept (and `--resume` finishes it).

    `exit_code` is what the CLI returns; `quiet` means another process (rank 0) already reported it, so this
    one exits without printing the same line again.
    """

    def __init__(self, message: str, exit_code: int = ExitCode.STOPPED, quiet: bool = False) -> None:
        super().__init__(" ".join(str(message).split()))
        self.exit_code = int(exit_code)
        self.quiet = quiet


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled exactly as Ctrl-C: a KeyboardInterrupt subclass, so every place that keeps
    what was written on Ctrl-C (the writer, run.json `interrupted`, the torchrun ranks) does the same here."""

    def __init__(self, signum: int, name: str) -> None:
        super().__init__(name)
        self.signum = signum
        self.name = name


class MachineFault(RunStopped):
    """The machine, not the input, stopped the run: no space left, quota exceeded, OUT read-only, an input
    folder gone. Exit code 5; what was written is kept and `--resume` finishes the rest."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=ExitCode.MACHINE)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line: an `Explained` message as it is, anything else as `Type: message`."""
    text = " ".join(str(exc).split())
    if isinstance(exc, Explained):
        return text
    return f"{type(exc).__name__}: {text}"[:limit] if text else type(exc).__name__


def exit_code_of(exc: BaseException) -> int:
    """The CLI's exit code for an exception that ended a run."""
    if isinstance(exc, GradcamError):
        return ExitCode.USAGE
    if isinstance(exc, RunStopped):
        return exc.exit_code
    if isinstance(exc, Interrupted):
        return 128 + exc.signum
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    return ExitCode.STOPPED
