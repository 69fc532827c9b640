"""The one exception every module raises for a mistake the user can fix.

``cli.run`` prints it as one line on stderr and exits with status 2, without a traceback; any
other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, wrong run dir): one line, exit code 2."""


def describe(e: BaseException) -> str:
    """``"TypeName: first line of the message"``, for a one-line report of an exception."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:160]}"
