"""Error types the CLI turns into exit codes (no torch import here)."""


class LayerctlError(Exception):
    """Bad input or usage: one line on stderr, exit code 2."""

    exit_code = 2


class JobFailed(LayerctlError):
    """A job that was valid but failed while running: exit code 1."""

    exit_code = 1
