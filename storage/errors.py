"""The one exception type that means "the user's input is wrong", shared by every stage.

The CLI prints its message as a single line and exits with status 2; library callers can catch it.
It lives in ``storage`` because every other package already depends on ``storage``.
"""


class ArcflowError(Exception):
    """Bad input (a path, a flag value, a dataset): the message is a complete one-line explanation."""
