"""The one exception type for user mistakes: the CLI prints it as one line and exits 2."""


class UserError(ValueError):
    """Bad input, options or files. The message is a single line (embedded newlines, e.g. from
    a library's error text, are folded into spaces)."""

    def __init__(self, message: object) -> None:
        super().__init__(" ".join(str(message).split()))


def check_device(device: str | None, *, asked: str = "--device cuda asked for",
                 advice: str = "") -> None:
    """A UserError when a CUDA device is asked for and this machine has none (torch is
    imported only then)."""
    if device is not None and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"{asked}, but no CUDA device is available{advice}")
