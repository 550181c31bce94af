"""User-facing errors: the CLI prints these as one line and exits non-zero."""

import errno
import os
import signal


class DotMoeError(Exception):
    """An error caused by bad input or environment, reported without a traceback."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: the CLI prints one line (with how to resume) and exits with 128 + the signal number."""

    def __init__(self, signum: int = signal.SIGINT, detail: str = ""):
        self.signum, self.detail = int(signum), detail
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}" + (f" {detail}" if detail else ""))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def require_extra(module: str, what: str, extra: str) -> None:
    """`what` needs the optional package `module`: a one-line error saying how to install it when it is missing."""
    if not has_extra(module):
        raise DotMoeError(f"{what} needs the optional package {module!r}: pip install 'dotmoe[{extra}]'")


def has_extra(module: str) -> bool:
    """Whether the optional package `module` is installed."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


# what libraries say when the environment refuses a write (they wrap the OSError in their own exception types)
_ENVIRONMENT = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.ELOOP:
                "too many levels of symbolic links"}


def write_failure(exc: BaseException) -> str | None:
    """Why a write failed, when the environment refused it (an OSError, or one a library wrapped): the reason to
    report as a one-line user error; None for anything else (a bug, an interrupt)."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return environment_error(exc) if isinstance(exc, Exception) else None


def environment_error(exc: BaseException) -> str | None:
    """The one-line reason when `exc` (or what caused it) is the environment refusing a read or write."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT:
            return _ENVIRONMENT[exc.errno] + (f": {exc.filename}" if exc.filename else "")
        text = str(exc)
        for code, why in _ENVIRONMENT.items():
            if os.strerror(code) in text or why in text.lower():
                return f"{why} ({type(exc).__name__}: {text.splitlines()[0][:200]})"
        if isinstance(exc, RuntimeError) and text.startswith("Symlink loop"):
            return f"too many levels of symbolic links ({text})"
        exc = exc.__cause__ or exc.__context__
    return None
