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


def missing_extra(what: str, package: str, extra: str) -> UserError:
    """The one-line error for an optional dependency that is not installed."""
    return UserError(f"{what} needs {package}: pip install 'dpcert[{extra}]'")


class InputWarning(UserWarning):
    """Input that is valid but probably not what the user meant (e.g. transposed votes). The
    CLI prints it as one line ``dpcert: warning: ...``."""


def unknown_keys_error(unknown: set[str] | list[str], known, where: str) -> UserError:
    """A one-line error naming each unknown key and the closest valid one."""
    import difflib

    parts = []
    for key in sorted(map(str, unknown)):
        close = difflib.get_close_matches(key, list(known), n=1)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return UserError(f"unknown {where}: {', '.join(parts)}; valid keys: "
                     f"{', '.join(sorted(known))}")
