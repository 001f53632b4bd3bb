"""The one exception type the CLI turns into a short message instead of a traceback."""


class UserError(Exception):
    """Something the user can fix: bad config, missing data, unreachable cluster.

    The message must say what is wrong, the value seen, and what to do instead.
    """
