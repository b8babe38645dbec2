"""Arguments checked before any work starts, against the limits that really hold.

Shared by the CLI and the Python API: each check names the option (CLI spelling) and the limit.
"""

from __future__ import annotations

import argparse
import numbers

from .errors import ConfigError

DEFAULT_MAX_CONTEXT = 4096
# The shortest context a build can compile and check: the graph passes are verified on 3- and
# 7-token prompts run through the exported program (graphs/pipeline.py), whose sequence length is
# bounded by the context; parity then needs a prompt of at least 2 tokens plus its decode steps.
MIN_CONTEXT = 8
MIN_PARITY_PROMPT = 2


def count(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``; refuses bools, floats (even 2.0) and strings."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer, got {value!r}.")
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}.")
    return int(value)


def max_context(value, model_limit: int) -> int:
    """The context to build for: ``value`` (None: the default, capped by the model) checked against
    the smallest the build supports and the model's max_position_embeddings."""
    if value is None:
        return max(min(DEFAULT_MAX_CONTEXT, model_limit), min(MIN_CONTEXT, model_limit))
    value = count("--max-context", value, 1)
    if model_limit < MIN_CONTEXT:
        raise ConfigError(f"the model's context is {model_limit} tokens; qwen2c builds engines with a "
                          f"context of at least {MIN_CONTEXT} tokens.")
    if not MIN_CONTEXT <= value <= model_limit:
        raise ConfigError(
            f"--max-context {value} must be between {MIN_CONTEXT} (the shortest context a build can compile and check) "
            f"and the model's context ({model_limit}: max_position_embeddings, or as far as its rope_scaling extends it)."
        )
    return value


KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16")


def kv_cache_dtype(value, dtype: str, quantized: bool, backend: str) -> str:
    """The KV cache's element type. ``auto`` (None): float16 for a quantized float32 TVM engine, as
    llama.cpp keeps its cache whatever its weights (it halves what a long context's decode step
    reads; the check of a quantized engine measures what it costs), else the engine's dtype. The
    cache's dtype bounds the engine's precision, so parity is then held to the looser tolerance of
    the two (``tolerances.tolerance_for_engine``)."""
    if value is None or value == "auto":
        return "float16" if quantized and dtype == "float32" and backend == "tvm" else dtype
    if value not in KV_CACHE_DTYPES:
        raise ConfigError(f"--kv-cache-dtype {value!r}: choose one of {', '.join(KV_CACHE_DTYPES)}.")
    if value != dtype and backend != "tvm":
        raise ConfigError(f"--kv-cache-dtype {value} with --backend {backend}: that backend keeps its cache in the "
                          f"engine's dtype ({dtype}); a separate cache dtype is a TVM-engine option.")
    return value


def parity_steps(value, context: int, default: int) -> int:
    """Decode steps of the parity check: they and a prompt of at least 2 tokens fit the context."""
    most = context - MIN_PARITY_PROMPT
    if value is None:
        return min(default, most)
    value = count("--parity-steps", value, 1)
    if value > most:
        raise ConfigError(f"--parity-steps {value} does not fit a context of {context} tokens: the check needs a "
                          f"prompt of at least {MIN_PARITY_PROMPT} tokens plus one position per step (at most {most}).")
    return value


def decode_steps(value, context: int, option: str = "--decode-steps") -> int:
    """Decode steps of a check on a built engine (``qwen2c verify``), against its context."""
    value = count(option, value, 1)
    most = context - MIN_PARITY_PROMPT
    if value > most:
        raise ConfigError(f"{option} {value} does not fit this engine's context of {context} tokens "
                          f"(at most {most}: the prompt needs {MIN_PARITY_PROMPT}).")
    return value


def cli_count(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
