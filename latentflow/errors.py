"""One error type for problems a user can fix (bad input, bad config, bad files).

The CLI prints these as a single line and exits with status 2; anything else is a
bug and keeps its traceback.
"""

import re


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


def user_message(error: BaseException) -> str:
    """What the CLI prints of a user error: its message, or for one that torch re-raised from a DataLoader worker
    ("Caught LatentflowError in DataLoader worker process 0. Original Traceback ...: the message") the message the
    worker raised, without the worker's traceback."""
    text = str(error)
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return re.sub(r"^[\w.]+: ", "", last.strip(), count=1)


class DiskFullError(LatentflowError):
    """A write failed because its disk (or quota) was full; the message names the folder and the size."""
