"""One error type for problems a user can fix (bad input, bad config, bad files).

The CLI prints these as a single line and exits with status 2; anything else is a
bug and keeps its traceback.
"""


class LatentflowError(ValueError):
    """A user-facing error whose message names the thing at fault and the fix."""


class DiskFullError(LatentflowError):
    """A write failed because its disk (or quota) was full; the message names the folder and the size."""
