"""The one exception type for mistakes a user can fix."""


class FinetuneError(Exception):
    """A user-fixable problem, carried as one line that names the culprit and the fix.

    The CLI prints it and exits with code 2; anything else is a bug and may trace back.
    """
