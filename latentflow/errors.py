"""One error type for problems a user can fix (bad input, bad config, bad files).

The CLI prints these as a single line and exits with status 2; anything else is a
bug and keeps its traceback.
"""


class LatentflowError(ValueError):
    """A user-facing error whose message names the thing at fault and the fix."""


def require_count(name: str, value: object, least: int, note: str = "") -> None:
    """Raise unless `value` is an int (not a bool) >= `least`: "NAME must be an integer >= LEAST NOTE, got VALUE"."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise LatentflowError(f"{name} must be an integer >= {least}{note}, got {value!r}")


def first_line(error: BaseException) -> str:
    """The first non-blank line of another library's error message (its class name when it has none): what a
    one-line error quotes of it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


class DiskFullError(LatentflowError):
    """A write failed because its disk (or quota) was full; the message names the folder and the size."""
