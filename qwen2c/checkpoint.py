"""Models in: a checkpoint directory (config.json + *.safetensors) or a preset name.

Everything about the input is checked before weights are allocated: the config's fields, the
weight format (safetensors only: pickle files can run code when loaded), and whether the model
fits in memory.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from . import presets
from .errors import ConfigError, read_json_object
from .memory import check_fits
from .model_config import MODEL_CLASSES, validate_config_dict

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "generation_config.json",
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class ModelSource:
    """Where a model comes from: ``name`` is the preset or the checkpoint path."""

    name: str
    config: dict[str, Any]
    checkpoint: Path | None  # None for presets
    tokenizer_files: list[Path]

    @property
    def is_preset(self) -> bool:
        return self.checkpoint is None

    def param_count(self) -> int:
        from .model_config import param_count

        return param_count(hf_config(self.config))


def resolve_model(model: str) -> ModelSource:
    path = Path(model)
    if path.is_dir():
        return _checkpoint_source(path)
    if path.exists():
        raise ConfigError(f"--model {model}: is a file; a checkpoint is a directory with config.json and *.safetensors.")
    if model in presets.PRESETS:
        cfg = presets.preset_config(model)
        validate_config_dict(cfg, f"preset {model}")
        return ModelSource(model, cfg, None, [])
    if "/" in model or model.startswith("."):
        raise ConfigError(f"--model {model}: no such directory.")
    presets.preset_config(model)  # raises, listing the presets
    raise AssertionError("unreachable")


def _checkpoint_source(path: Path) -> ModelSource:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{path}: no config.json; a checkpoint directory is what save_pretrained writes.")
    cfg = read_json_object(config_file, ConfigError)
    validate_config_dict(cfg, str(config_file))
    hf_config(cfg, str(config_file))
    if not list(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise ConfigError(
                f"{path}: weights are only in pickle files ({', '.join(pickles)}). qwen2c loads safetensors "
                "only, since unpickling can run arbitrary code. Convert once with "
                "model.save_pretrained(dir, safe_serialization=True)."
            )
        raise ConfigError(f"{path}: no *.safetensors weight files.")
    tokenizer = [path / f for f in TOKENIZER_FILES if (path / f).is_file()]
    return ModelSource(str(path), cfg, path, tokenizer)


def hf_config(cfg: dict[str, Any], source: str = "config"):
    config_class, _ = _classes(cfg)
    fields = {k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version")}
    try:
        return config_class(**fields)
    except Exception as e:  # transformers validates fields with several exception types
        raise ConfigError(f"{source}: transformers rejects this config: {e}") from None


def load_reference(source: ModelSource, dtype: str, copies: float = 2.2):
    """The transformers model (eval mode, ``dtype``): the reference every engine is checked against.

    ``copies``: how many copies of the weights the caller will hold at once (a build holds the
    reference and then a loaded engine); checked against free memory before allocating.
    """
    _, model_class = _classes(source.config)
    config = hf_config(source.config)
    check_reference_fits(source, dtype, copies)
    torch_dtype = TORCH_DTYPES[dtype]
    if source.is_preset:
        # Drawn directly in the dtype (no float32 copy); RoPE's inv_freq stays float32 as
        # from_pretrained leaves it, since transformers computes it in float32 explicitly.
        torch.manual_seed(presets.SEED)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch_dtype)
        try:
            model = model_class(config)
        finally:
            torch.set_default_dtype(default)
        return config, model.eval()
    try:
        model, info = model_class.from_pretrained(
            source.checkpoint, dtype=torch_dtype, local_files_only=True, output_loading_info=True
        )
    except Exception as e:  # transformers/safetensors raise many types for a bad file
        raise ConfigError(f"{source.checkpoint}: could not load the weights: {e}") from None
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        detail = "; ".join(f"{k}: {sorted(map(str, v))[:5]}" for k, v in problems.items())
        raise ConfigError(f"{source.checkpoint}: the weights do not match config.json ({detail}).")
    check_finite(model, str(source.checkpoint))
    return model.config, model.eval()


def check_finite(model, where: str) -> None:
    """Refuse weights holding NaN or Inf, naming the tensor: otherwise they surface much later as a
    graph pass or the engine "disagreeing" with transformers, when the checkpoint is at fault."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            finite = torch.isfinite(p)
            if not bool(finite.all()):
                nan, total = int(torch.isnan(p).sum()), p.numel()
                inf = total - int(finite.sum()) - nan
                raise ConfigError(
                    f"{where}: weight {name!r} holds {nan} NaN and {inf} infinite values (of {total}); the checkpoint "
                    "is damaged or was saved from a diverged model. Nothing was built."
                )


def check_reference_fits(source: ModelSource, dtype: str, copies: float) -> None:
    """MemoryBudgetError, before anything is allocated, if ``copies`` of the weights do not fit."""
    check_fits(f"model {source.name}", source.param_count(), dtype, copies,
               hint=f"`qwen2c inspect --model {source.name}` traces and rewrites it at full size without weights.")


def checkpoint_dtype(source: ModelSource) -> str:
    """The dtype the checkpoint's weights are stored in (config.json's ``dtype``/``torch_dtype``).

    Presets stand for the published checkpoints, which are bfloat16.
    """
    if source.is_preset:
        return "bfloat16"
    stored = source.config.get("dtype") or source.config.get("torch_dtype") or "float32"
    if stored not in TORCH_DTYPES:
        raise ConfigError(
            f"{source.checkpoint}/config.json: dtype {stored!r} is not one qwen2c builds "
            f"({', '.join(TORCH_DTYPES)}); pass --dtype explicitly."
        )
    return stored


def _classes(cfg: dict[str, Any]):
    """transformers' (config class, causal-LM class) for a validated config's model_type."""
    import transformers

    names = MODEL_CLASSES[cfg.get("model_type", "qwen2")]
    return tuple(getattr(transformers, n) for n in names)


def meta_model(source: ModelSource):
    """The transformers model with its weights on the meta device: real shapes, no memory.

    Lets a model too large for this machine be exported and rewritten at full size.
    """
    _, model_class = _classes(source.config)
    config = hf_config(source.config)
    with torch.device("meta"):
        model = model_class(config)
    return config, model.eval()
