"""User-facing errors. Each carries a one-paragraph message naming what is at fault and what to do.

The CLI prints the message (no traceback) and exits non-zero; library users catch ``Qwen2cError``.
"""


class Qwen2cError(Exception):
    """Base of every error a user can meet."""

    exit_code = 2


class ConfigError(Qwen2cError, ValueError):
    """A model config or checkpoint that qwen2c cannot build: names the field or file at fault."""


class UnsupportedModelError(ConfigError):
    """A model whose graph contains a block qwen2c's passes do not recognise and cannot compile."""


class MemoryBudgetError(Qwen2cError):
    """The model would not fit in this machine's memory; raised before allocating."""


class PassCheckError(Qwen2cError):
    """A graph pass changed the model's numerics."""

    exit_code = 3


class ParityError(Qwen2cError):
    """An engine's logits disagree with the reference model beyond tolerance."""

    exit_code = 3


class EngineError(Qwen2cError):
    """An engine directory that is missing, corrupt, or built for something else."""


class OutputError(Qwen2cError):
    """An engine's destination that cannot be written (permissions, read-only, full disk)."""


class BackendUnavailableError(Qwen2cError):
    """A backend (TensorRT, a GPU runtime, ...) that is not installed or has no device here."""


def read_json_object(path, error: type[Qwen2cError]) -> dict:
    """A JSON object from ``path``, or ``error`` naming the file and what is wrong with it."""
    import json

    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # ValueError: JSONDecodeError, huge numbers
        raise error(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]}).") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, found {type(value).__name__}.")
    return value
