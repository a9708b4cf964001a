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
