"""The one exception type for mistakes a user can fix (bad file, bad option)."""

__all__ = ["UserError", "missing_extra", "reason"]


class UserError(ValueError):
    """A problem with the user's input; the CLI prints its one-line message and exits 2.

    It subclasses ValueError so that library callers can catch it the usual way.
    """


def reason(error: BaseException) -> str:
    """Why something failed, in one line: a UserError's own message, anything else with
    its type (an unexpected error must not pass for the user's mistake)."""
    return str(error) if isinstance(error, UserError) else repr(error)


def missing_extra(purpose: str, package: str, extra: str) -> UserError:
    """The one-line error for an optional package that is not installed: what needs it,
    what is missing, and the extra that brings it (raise it ``from None``).

    Example:
        >>> print(missing_extra("cflowad watch", "watchdog", "stream"))
        cflowad watch needs watchdog: pip install 'cflowad[stream]'
    """
    return UserError(f"{purpose} needs {package}: pip install 'cflowad[{extra}]'")
