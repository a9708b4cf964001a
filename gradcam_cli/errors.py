"""The one error type users can cause.

Everything a user can get wrong (a flag, a config key, a model name, a layer path, a weights file) raises
`GradcamError` with a message that names the culprit and what was expected. The CLI turns it into one line
on stderr and exit code 2, so scripts can tell "you called it wrong" from "some images failed" (exit 1).
"""

from __future__ import annotations


class GradcamError(Exception):
    """A problem the caller can fix; its message is a complete one-line explanation.

    Messages often quote other libraries' exceptions (torch's span several lines), so line breaks become
    spaces here, once: whatever the source, the CLI prints exactly one line.
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(" ".join(part.strip() for part in str(message).splitlines()))


class RunStopped(Exception):
    """A run that could not finish for a reason outside the caller's inputs: a rank of a distributed run died,
    was stopped, or lost contact. What was written is kept (and `--resume` finishes it).

    `exit_code` is what the CLI returns (4 unless it says otherwise); `quiet` means another process (rank 0)
    already reported it, so this one exits without printing the same line again.
    """

    def __init__(self, message: str, exit_code: int = 4, quiet: bool = False) -> None:
        super().__init__(" ".join(str(message).split()))
        self.exit_code = exit_code
        self.quiet = quiet
