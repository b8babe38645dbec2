"""qwen2c: compile Qwen2 models into verified, deployable engines."""

__version__ = "0.1.0"

from .errors import Qwen2cError  # noqa: E402
from .runtime import Engine, Session, load  # noqa: E402


def build(*args, **kwargs):
    """Build an engine directory; see ``qwen2c.builder.build``."""
    from .builder import build as _build

    return _build(*args, **kwargs)


__all__ = ["Engine", "Qwen2cError", "Session", "build", "load", "__version__"]
