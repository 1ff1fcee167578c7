"""One error hierarchy: the library raises these, the CLI turns them into one line and an exit code."""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "ConfigError",
    "CryoDeployError",
    "InputError",
    "ModelError",
    "OutputError",
    "StoreError",
    "first_line",
    "one_line",
]

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def first_line(err: BaseException, default: str = "") -> str:
    """The first line of an exception's message (``default`` if it is empty), for one-line errors."""
    return (str(err).strip().splitlines() or [default])[0]


def one_line(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b``), so a file name holding a
    newline cannot split a one-line message."""
    return "".join(
        _ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c) for c in text
    )


class CryoDeployError(Exception):
    """Base of every error cryodeploy raises on purpose; its message is one line for the user."""

    exit_code = 1


class InputError(CryoDeployError):
    """A micrograph or other input file is unreadable or unusable ("<file>: found X, expected Y")."""


class OutputError(CryoDeployError):
    """An output cannot be written (read-only folder, disk full, would overwrite an input)."""


class ModelError(CryoDeployError):
    """A checkpoint, raw weight folder, ONNX file or engine cannot be loaded or does not match."""


class StoreError(CryoDeployError):
    """A patch store is missing files, has wrong sizes, or disagrees with its manifest."""


class ConfigError(CryoDeployError):
    """A configuration value is invalid or two values contradict each other."""

    exit_code = 2


class BackendUnavailable(CryoDeployError):
    """A backend cannot run here; the message says why (e.g. "tensorrt: not installed")."""
