"""The one exception type for user mistakes.

Library code raises `UserError` for anything the user can fix (bad path, bad
data line, bad option); the CLI turns it into a one-line message and exit 2.
Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; str(err) is the whole message, one line."""


class Interrupted(Exception):
    """The user stopped a run (Ctrl-C) and its state was saved; str(err) says how to resume."""
