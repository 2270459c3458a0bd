"""The CLI's one exception: printed without a traceback, with its exit status."""


class CliError(Exception):
    """An error to print without a traceback; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code
