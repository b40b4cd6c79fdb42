"""``memllm bench patterns``: perplexity and time of each attention pattern on the real model.

Every pattern runs the same model over the same tokens in one forward pass per length (no cache):
each layer hands its pre-RoPE q, k, v to a :class:`PatternAttention`, which rotates them at their
true positions and calls ``memllm_kernels.attention`` with the pattern (or ``memllm_kernels.memory_attention``).

Patterns (sizes relative to SmolLM2's 8192 trained positions; see :func:`default_specs`):

    full        causal full attention; only at lengths within the trained range
    window      sliding window
    longformer  window + global first tokens
    bigbird     window + global + 3 random earlier 128-token blocks per query block (seeded)
    strided     Sparse Transformer strided (last ``stride`` keys + every stride-th key)
    fixed       Sparse Transformer fixed (own stride segment + last ``summary`` keys of each)
    memory      InfLLM-style: sliding window at true positions, plus per 512-query chunk the sink
                block and the top-k 128-token blocks of the far past, read in place from the
                sequence's own pre-RoPE keys (memllm_kernels.memory_attention) and scored by the chunk's
                mean pre-RoPE query against each block's best-matching key; queries meet every
                memory key at one fixed RoPE distance (``memory_distance``), as in memllm.attention.

Positions: all but ``memory`` use true positions, so any key farther than the trained range (the
global/random/strided/fixed keys of long inputs) is seen at a distance the model never trained on;
that is part of what the comparison measures. Perplexity is over every predicted token.

Time: seconds of the whole forward, and seconds spent inside attention (the rest, projections and
MLP, is the same for every pattern). Results: a table on stdout, JSON and a PNG plot of attention
time against length.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import memllm_kernels
from memllm.model import Transformer
from memllm.rope import Rope
from memllm_kernels import patterns as P

PATTERN_NAMES = ("full", "window", "longformer", "bigbird", "strided", "fixed", "memory")


@dataclass(frozen=True)
class MemorySpec:
    """Memory pattern geometry (defaults follow memllm.settings.MemorySettings' prototype values)."""

    n_sinks: int = 64
    window: int = 2048
    block: int = 128
    top_k: int = 16
    chunk: int = 512
    memory_distance: int = 2048


@dataclass(frozen=True)
class PatternSpec:
    """One compared pattern: a memllm_kernels.patterns.Pattern, or the memory geometry."""

    name: str
    pattern: P.Pattern | None = None
    memory: MemorySpec | None = None
    trained_range_only: bool = False  # full attention: skipped past the model's trained positions


def default_specs(
    window: int = 2048, n_global: int = 64, stride: int = 1024, summary: int = 128
) -> dict[str, PatternSpec]:
    """The compared patterns by name (see the module docstring)."""
    return {
        "full": PatternSpec("full", P.full(), trained_range_only=True),
        "window": PatternSpec("window", P.sliding_window(window)),
        "longformer": PatternSpec("longformer", P.longformer(window, n_global)),
        "bigbird": PatternSpec("bigbird", P.bigbird(window, n_global, 3, random_block=128)),
        "strided": PatternSpec("strided", P.strided(stride)),
        "fixed": PatternSpec("fixed", P.fixed(stride, summary)),
        "memory": PatternSpec("memory", memory=MemorySpec(window=window, memory_distance=window)),
    }


def select_memory_blocks(q: torch.Tensor, k: torch.Tensor, mem: MemorySpec) -> torch.Tensor:
    """Block ids (1, n_chunks, 1 + top_k) int64 for one sequence, -1 = none.

    q (1, Hq, T, D), k (1, Hkv, T, D) pre-RoPE. Block j holds tokens [j*block, (j+1)*block). Chunk c
    (queries [c*chunk, (c+1)*chunk)) may use blocks wholly out of its local window (last token <=
    c*chunk - window). Slot 0 is the sink block (block 0, valid tokens < n_sinks) once eligible; the
    other slots are the top_k eligible blocks by sum over kv heads of max over the block's keys of
    (chunk mean query, summed over the group's heads) . key.
    """
    _, hq, t, d = q.shape
    hkv = k.shape[1]
    n_blocks, n_chunks = t // mem.block, -(-t // mem.chunk)
    ids = torch.full((1, n_chunks, 1 + mem.top_k), -1, dtype=torch.int64)
    if n_blocks < 2:
        return ids
    qg = q[0].float().reshape(hkv, hq // hkv, t, d).sum(1)  # (Hkv, T, D): group sums
    pad = n_chunks * mem.chunk - t
    qg = F.pad(qg, (0, 0, 0, pad)).view(hkv, n_chunks, mem.chunk, d)
    counts = torch.full((n_chunks,), float(mem.chunk))
    counts[-1] = mem.chunk - pad
    q_mean = qg.sum(2) / counts[None, :, None]  # (Hkv, C, D)
    kb = k[0, :, : n_blocks * mem.block].float().reshape(hkv, n_blocks, mem.block, d)
    scores = torch.einsum("hcd,hnbd->hcnb", q_mean, kb).amax(-1).sum(0)  # (C, n_blocks)
    chunk_start = torch.arange(n_chunks) * mem.chunk
    block_last = (torch.arange(n_blocks) + 1) * mem.block - 1
    eligible = block_last[None, :] <= (chunk_start - mem.window)[:, None]  # (C, n_blocks)
    sink_ok = mem.n_sinks - 1 <= chunk_start - mem.window  # the sink tokens are out of the window
    ids[0, :, 0] = torch.where(sink_ok, 0, -1)
    eligible[:, 0] = False  # block 0 serves only as the sink block
    scores = scores.masked_fill(~eligible, float("-inf"))
    top = scores.topk(min(mem.top_k, n_blocks), dim=1)
    chosen = torch.where(torch.isfinite(top.values), top.indices, -1)
    ids[0, :, 1 : 1 + chosen.shape[1]] = chosen
    return ids


@dataclass
class PatternAttention:
    """Attention state for one forward over a whole sequence (batch 1 for memory): no cache.

    ``attend`` receives pre-RoPE q (B, Hq, T, D), k/v (B, Hkv, T, D), rotates q and k at positions
    0..T-1 and returns (B, Hq, T, D). ``attention_seconds`` accumulates time spent in attention.
    """

    rope: Rope
    spec: PatternSpec
    backend: str | None = None
    attention_seconds: float = 0.0
    _cos_sin: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _mem_cos_sin: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        t = q.shape[2]
        if self._cos_sin is None or self._cos_sin[0].shape[0] != t or self._cos_sin[0].dtype != q.dtype:
            self._cos_sin = self.rope.cos_sin(torch.arange(t, device=q.device), q.dtype)
        cos, sin = self._cos_sin
        q_rot, k_rot = Rope.rotate(q, cos, sin), Rope.rotate(k, cos, sin)
        if self.spec.memory is None:
            out = memllm_kernels.attention(q_rot, k_rot, v, self.spec.pattern, backend=self.backend).out
        else:
            out = self._memory(q, k, v, q_rot, k_rot, self.spec.memory)
        self.attention_seconds += time.perf_counter() - t0
        return out

    def _memory(self, q, k, v, q_rot, k_rot, mem: MemorySpec) -> torch.Tensor:
        if q.shape[0] != 1:
            raise ValueError("the memory pattern benchmark runs one sequence at a time")
        t, hkv = q.shape[2], k.shape[1]
        n_blocks = max(1, t // mem.block)
        if self._mem_cos_sin is None or self._mem_cos_sin[0].dtype != q.dtype:
            self._mem_cos_sin = self.rope.cos_sin(torch.tensor([mem.memory_distance], device=q.device), q.dtype)
        q_mem = Rope.rotate(q, *self._mem_cos_sin)  # every memory key (unrotated) at one distance
        used = min(t, n_blocks * mem.block)
        pool_k = k[0, :, :used].unflatten(1, (n_blocks, used // n_blocks)).transpose(0, 1)  # view, pre-RoPE
        pool_v = v[0, :, :used].unflatten(1, (n_blocks, used // n_blocks)).transpose(0, 1)
        lens = torch.full((n_blocks,), pool_k.shape[2], dtype=torch.int32)
        lens[0] = min(mem.n_sinks, pool_k.shape[2])  # block 0 stands for the sinks only
        ids = select_memory_blocks(q, k, mem)
        res = memllm_kernels.memory_attention(
            q_rot, k_rot, v, pool_k, pool_v, ids.to(q.device),
            local=P.sliding_window(mem.window), q_mem=q_mem, pool_lens=lens.to(q.device),
            chunk_size=mem.chunk, backend=self.backend,
        )  # fmt: skip
        assert res.out.shape[1] == q.shape[1] and hkv == pool_k.shape[1]
        return res.out


@torch.inference_mode()
def forward_nll(model: Transformer, tokens: torch.Tensor, attn, logits_chunk: int = 2048) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods over tokens (1, T) and their count, without ever
    holding (T, vocab) logits (the head runs in chunks). Same computation as Transformer.forward."""
    x = model.embed(tokens)  # (1, T, C)
    for i, layer in enumerate(model.layers):
        x = layer(x, i, attn)
    h = model.norm(x)
    total, t = 0.0, tokens.shape[1]
    for s in range(0, t - 1, logits_chunk):
        e = min(s + logits_chunk, t - 1)
        logits = model.output(h[:, s:e]).float()  # (1, n, V)
        total += float(F.cross_entropy(logits[0], tokens[0, s + 1 : e + 1], reduction="sum"))
    return total, t - 1


def run_pattern(loaded, spec: PatternSpec, ids: torch.Tensor, backend: str | None = None) -> dict:
    """One forward of ``spec`` over ids (1, T): perplexity and seconds (total and attention)."""
    attn = PatternAttention(loaded.rope, spec, backend)
    t0 = time.perf_counter()
    nll, n = forward_nll(loaded.model, ids, attn)
    seconds = time.perf_counter() - t0
    return {
        "pattern": spec.name,
        "kernel_pattern": spec.pattern.name if spec.pattern is not None else "memory",
        "tokens": ids.shape[1],
        "ppl": math.exp(nll / n),
        "seconds": seconds,
        "attention_s": attn.attention_seconds,
        "tok_per_s": ids.shape[1] / seconds,
    }


def plot_times(rows: list[dict], path: Path) -> None:
    """PNG: attention seconds against length per pattern, log-log, with slope-1 and slope-2 guides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["pattern"] for r in rows):
        pts = sorted((r["tokens"], r["attention_s"]) for r in rows if r["pattern"] == name and r.get("ppl"))
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    lengths = sorted({r["tokens"] for r in rows})
    if len(lengths) > 1:
        base = min(r["attention_s"] for r in rows if r["tokens"] == lengths[0] and r.get("ppl"))
        ax.plot(lengths, [base * x / lengths[0] for x in lengths], "k--", lw=0.8, label="linear")
        ax.plot(lengths, [base * (x / lengths[0]) ** 2 for x in lengths], "k:", lw=0.8, label="quadratic")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("attention seconds per forward (all layers)")
    ax.set_title("attention patterns on the same model and text")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _resumable_rows(path: Path, header: dict, spec_reprs: dict[str, str]) -> dict[tuple[str, int], dict]:
    """Rows of an earlier run at ``path`` that this run can keep: same model, dtype and text, and the
    same spec for the row's pattern. Keyed by (pattern, tokens)."""
    import json

    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if any(old.get(k) != v for k, v in header.items()):
        return {}
    old_specs = old.get("specs", {})
    return {
        (r["pattern"], r["tokens"]): r
        for r in old.get("rows", [])
        if r.get("ppl") and old_specs.get(r["pattern"]) == spec_reprs.get(r["pattern"])
    }


def run_patterns(
    text_path: Path | str,
    tokens: int,
    patterns: list[str] | None = None,
    lengths: list[int] | None = None,
    out_dir: Path | str = Path("bench-results"),
    settings=None,
    backend: str | None = None,
    specs: dict[str, PatternSpec] | None = None,
    loaded=None,
) -> list[dict]:
    """Perplexity and time of each pattern on the first ``tokens`` tokens of ``text_path``.

    lengths: the lengths to run (default: tokens/8, tokens/4, tokens/2, tokens, those >= 512).
    Prints a table; writes ``patterns.json`` (after every row) and ``patterns.png`` (attention time
    vs length) under ``out_dir``; returns the rows. Rows already in ``patterns.json`` from an
    earlier run of the same model, dtype, text and pattern spec are kept, not rerun (resume).
    ``loaded`` (a memllm.loading.LoadedModel) skips loading.
    """
    from memllm.bench.common import book_text, format_table, machine_info, write_json

    if loaded is None:
        from memllm.loading import load_model
        from memllm.settings import get_settings

        loaded = load_model(settings or get_settings())
    specs = specs or default_specs()
    names = list(patterns or PATTERN_NAMES)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise ValueError(f"unknown patterns {unknown}; choose from {sorted(specs)}")
    lengths = sorted(lengths or [n for n in (tokens // 8, tokens // 4, tokens // 2, tokens) if n >= 512] or [tokens])
    text = book_text(Path(text_path))
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < max(lengths):
        raise ValueError(f"{text_path} has {len(ids)} tokens, fewer than the {max(lengths)} asked")
    ids_t = torch.tensor([ids[: max(lengths)]], dtype=torch.long)
    max_pos = loaded.config.max_positions
    out_dir = Path(out_dir)
    header = {"bench": "patterns", "model": loaded.name, "dtype": str(loaded.dtype), "text": str(text_path)}
    spec_reprs = {n: repr(specs[n]) for n in names}
    done_before = _resumable_rows(out_dir / "patterns.json", header, spec_reprs)
    rows: list[dict] = []

    def save() -> None:
        write_json(out_dir / "patterns.json", {**header, "machine": machine_info(), "specs": spec_reprs, "rows": rows})

    for name in names:
        spec = specs[name]
        for n in lengths:
            if (name, n) in done_before:
                rows.append(done_before[(name, n)])
                print(f"{name} @ {n}: kept from an earlier run of {out_dir / 'patterns.json'}", flush=True)
                continue
            if spec.trained_range_only and n > max_pos:
                rows.append({"pattern": name, "tokens": n, "ppl": None, "note": f"> {max_pos} trained positions"})
                continue
            rows.append(run_pattern(loaded, spec, ids_t[:, :n], backend))
            save()  # after every row: an interrupted run resumes from here
            print(format_table([rows[-1]]), flush=True)
    save()
    plot_times(rows, out_dir / "patterns.png")
    done = [r for r in rows if r.get("ppl")]
    print()
    print(format_table(done, ["pattern", "tokens", "ppl", "seconds", "attention_s", "tok_per_s"]))
    return rows
