"""The error type for a user's mistake: a bad config value, path, file or argument.

``UserError`` is a ``ValueError`` (code that catches ``ValueError`` keeps working). Its message names the
problem and the fix in one line; the ``latentsd`` command prints it as ``latentsd CMD: error: MESSAGE``
and exits with status 2 (``--debug`` shows the traceback instead). Subclass it for new kinds of bad input.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """Bad input from the user; the message says what is wrong and how to fix it."""
