"""The one exception type for bad input that a user can fix.

Raised with a one-line message that names the bad value and the fix; the CLI prints it without a
traceback and exits with status 2.
"""


class UserError(ValueError):
    """Bad input (unknown dataset, missing files, bad argument, a part spec that matches nothing)."""
