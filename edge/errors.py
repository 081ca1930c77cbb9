"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class EdgeError(Exception):
    """A user-facing error: bad input, missing files, an impossible configuration.

    The message is one line and says what would work instead.
    """


class Interrupted(EdgeError):
    """Ctrl-C during a long command; the message says what was saved and how to resume."""
