"""The one exception type for user mistakes: the CLI prints it as one line and exits 2."""


class UserError(ValueError):
    """Bad input, options or files. The message is a single line (embedded newlines, e.g. from
    a library's error text, are folded into spaces)."""

    def __init__(self, message: object) -> None:
        super().__init__(" ".join(str(message).split()))
