"""The one exception type the CLI turns into a short message instead of a traceback."""


class UserError(Exception):
    """Something the user can fix: bad config, missing data, unreachable cluster.

    The message must say what is wrong, the value seen, and what to do instead.
    """


class MissingPackage(UserError):
    """An optional package that a command or setting needs is not installed.

    The message gives the exact `pip install 'ray-app[extra]'` line (see ray_app.extras)."""

    def __init__(self, message: str, module: str, extra: str):
        super().__init__(message)
        self.module = module
        self.extra = extra
