"""Helpers shared by the benchmarks: text sources, result files, tables."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import torch


def eval_data_dir() -> Path:
    from memllm.settings import get_settings

    return Path(os.environ.get("MEMLLM_EVAL_DATA") or get_settings().eval_data)


def parse_sizes(spec: str) -> list[int]:
    """ "8k,16k,512" -> [8192, 16384, 512]."""
    out = []
    for part in spec.split(","):
        part = part.strip().lower()
        if part:
            out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
    return out


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg file, between its *** START / *** END markers."""
    start = text.find("*** START")
    if start != -1:
        start = text.find("\n", start) + 1
    end = text.find("*** END")
    return text[max(start, 0) : end if end != -1 else len(text)].strip()


def book_text(path: Path) -> str:
    return strip_gutenberg(path.read_text(encoding="utf-8", errors="replace"))


def essays_text() -> str:
    folder = eval_data_dir() / "paul-graham-essays" / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no essays under {folder} (set MEMLLM_EVAL_DATA)")
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace").strip() for f in files)


def machine_info() -> dict:
    """What a result depends on beyond its own options: torch, threads, the CPU and its matrix
    extensions (bfloat16 results differ between AVX512-BF16 and AMX), the dtype settings resolve to."""
    from memllm.loading import parse_dtype
    from memllm.settings import get_settings

    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        **_cpu_model_and_extensions(),
        "dtype": str(parse_dtype(get_settings().dtype)).removeprefix("torch."),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def machine_label(info: dict) -> str:
    """The part of ``machine_info`` that changes a bench's answers, in a few words: the CPU model
    and the dtype (e.g. "AMD EPYC, float32")."""
    return f"{info['cpu_model']}, {info['dtype']}"


def _cpu_model_and_extensions() -> dict:
    from memllm.loading import cpu_model_and_flags

    model, flags = cpu_model_and_flags()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return {"cpu_model": model, "cpu_extensions": [f for f in wanted if f in flags]}


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None, digits: int | None = None) -> str:
    """A plain-text table. Floats: 3 significant digits, or ``digits`` decimals (metrics) when given."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def cell(v: object) -> str:
        if isinstance(v, float):
            if digits is not None:
                return f"{v:.{digits}f}" if abs(v) < 10 else f"{v:.1f}"
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
