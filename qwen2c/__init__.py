"""qwen2c: compile Qwen2 models into verified, deployable engines."""

__version__ = "0.1.0"

from .errors import Qwen2cError  # noqa: E402

# The runtime (and TVM with it) is imported on first use, so that `qwen2c --help`, argument errors
# and a Ctrl-C in the first second of a command need nothing heavy (PEP 562).
_RUNTIME_NAMES = ("Engine", "Generation", "Session", "load")


def __getattr__(name: str):
    if name in _RUNTIME_NAMES:
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'qwen2c' has no attribute {name!r}")


def build(*args, **kwargs):
    """Build an engine directory; see ``qwen2c.builder.build``."""
    from .builder import build as _build

    return _build(*args, **kwargs)


__all__ = ["Engine", "Generation", "Qwen2cError", "Session", "build", "load", "__version__"]
