"""The one exception type for mistakes a user can fix (bad file, bad option)."""

__all__ = ["UserError"]


class UserError(ValueError):
    """A problem with the user's input; the CLI prints its one-line message and exits 2.

    It subclasses ValueError so that library callers can catch it the usual way.
    """
