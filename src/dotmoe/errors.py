"""User-facing errors: the CLI prints these as one line and exits non-zero."""

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
