"""memllm.bench.patterns on a tiny random model: the attention state is exact, the bench runs end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from memllm.bench.patterns import (
    MemorySpec,
    PatternAttention,
    PatternSpec,
    default_specs,
    forward_nll,
    run_patterns,
    select_memory_blocks,
)
from memllm.model import ModelConfig, Transformer
from memllm.rope import Rope
from memllm_kernels import patterns as P
from memllm_kernels.reference import expand_kv

CFG = ModelConfig(
    vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=48,
    norm_eps=1e-5, max_positions=256, tie_embeddings=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add synchronisation on a shared machine
    torch.manual_seed(0)
    model = Transformer(CFG).eval().requires_grad_(False)
    torch.nn.init.normal_(model.embed.weight, std=0.05)
    rope = Rope(1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)))
    yield model, rope
    torch.set_num_threads(threads)


class DenseCausal:
    """Independent baseline: torch SDPA causal over rotated q, k."""

    def __init__(self, rope: Rope) -> None:
        self.rope = rope

    def attend(self, layer, q, k, v):
        cos, sin = self.rope.cos_sin(torch.arange(q.shape[2]), q.dtype)
        q, k = Rope.rotate(q, cos, sin), Rope.rotate(k, cos, sin)
        return F.scaled_dot_product_attention(q, expand_kv(k, 4), expand_kv(v, 4), is_causal=True)


def _tokens(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


def test_full_pattern_matches_dense_model(tiny) -> None:
    model, rope = tiny
    ids = _tokens(150)
    want = model(ids, DenseCausal(rope))
    got = model(ids, PatternAttention(rope, PatternSpec("full", P.full())))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    nll, n = forward_nll(model, ids, PatternAttention(rope, PatternSpec("full", P.full())), logits_chunk=40)
    want_nll = F.cross_entropy(want[0, :-1], ids[0, 1:], reduction="sum").item()
    assert n == 149 and math.isclose(nll, want_nll, rel_tol=1e-4)


def test_window_changes_logits_only_past_the_window(tiny) -> None:
    model, rope = tiny
    ids = _tokens(120)
    full = model(ids, PatternAttention(rope, PatternSpec("full", P.full())))
    win = model(ids, PatternAttention(rope, PatternSpec("w", P.sliding_window(40))))
    torch.testing.assert_close(win[:, :40], full[:, :40], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(win[:, 60:], full[:, 60:], atol=1e-3)


def test_memory_without_far_past_is_the_window(tiny) -> None:
    model, rope = tiny
    ids = _tokens(100)
    mem = MemorySpec(n_sinks=4, window=64, block=16, top_k=2, chunk=32, memory_distance=64)
    got = model(ids, PatternAttention(rope, PatternSpec("memory", memory=mem)))
    # chunk starts 0, 32, 64, 96 - window 64: only chunk 3 may use blocks ending <= 32: memory changes it
    want = model(ids, PatternAttention(rope, PatternSpec("w", P.sliding_window(64))))
    torch.testing.assert_close(got[:, :96], want[:, :96], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got[:, 96:], want[:, 96:], atol=1e-4)


def test_select_memory_blocks_respects_the_window() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 300, 8, generator=g), torch.randn(1, 2, 300, 8, generator=g)
    mem = MemorySpec(n_sinks=5, window=64, block=16, top_k=3, chunk=32)
    ids = select_memory_blocks(q, k, mem)
    assert ids.shape == (1, 10, 4)
    for c in range(10):
        start = c * 32
        assert ids[0, c, 0] == (0 if start - 64 >= 4 else -1), "sink slot once the sinks left the window"
        chosen = [i for i in ids[0, c, 1:].tolist() if i >= 0]
        assert len(chosen) == len(set(chosen)) and 0 not in chosen
        assert all((i + 1) * 16 - 1 <= start - 64 for i in chosen), (c, chosen)
        n_eligible = max(0, (start - 64 + 1) // 16 - 1)
        assert len(chosen) == min(3, n_eligible)


def _book_and_model(tiny, tmp_path: Path, n_words: int) -> tuple[Path, SimpleNamespace]:
    """A book of ``n_words`` words ``w0..w49`` (word wN is token N) and the tiny model as a loaded model."""
    model, rope = tiny
    text = tmp_path / "book.txt"
    text.write_text(" ".join(f"w{i % 50}" for i in range(n_words)))

    def tokenizer(s, add_special_tokens=False):
        return {"input_ids": [int(w[1:]) for w in s.split()]}

    loaded = SimpleNamespace(model=model, rope=rope, tokenizer=tokenizer, config=CFG, name="tiny", dtype=torch.float32)
    return text, loaded


def test_run_patterns_end_to_end(tiny, tmp_path: Path) -> None:
    text, loaded = _book_and_model(tiny, tmp_path, 3000)
    specs = default_specs(window=128, n_global=4, stride=32, summary=8)
    specs["bigbird"] = PatternSpec("bigbird", P.bigbird(128, 4, 2, random_block=16))
    specs["memory"] = PatternSpec(
        "memory", memory=MemorySpec(n_sinks=4, window=128, block=16, top_k=2, chunk=32, memory_distance=128)
    )
    rows = run_patterns(text, 384, lengths=[128, 384], out_dir=tmp_path / "out", specs=specs, loaded=loaded)
    by = {(r["pattern"], r["tokens"]): r for r in rows}
    assert by[("full", 384)]["ppl"] is None, "full attention is skipped past the trained range"
    assert by[("full", 128)]["ppl"] is not None
    for name in ("window", "longformer", "bigbird", "strided", "fixed", "memory"):
        for n in (128, 384):
            r = by[(name, n)]
            assert math.isfinite(r["ppl"]) and r["ppl"] > 1 and 0 < r["attention_s"] < r["seconds"]
    # at 128 tokens every window-based pattern (window 128) sees everything: same perplexity as full
    for name in ("window", "longformer", "bigbird", "memory"):
        assert math.isclose(by[(name, 128)]["ppl"], by[("full", 128)]["ppl"], rel_tol=1e-4), name
    saved = json.loads((tmp_path / "out" / "patterns.json").read_text())
    assert len(saved["rows"]) == len(rows)
    assert (tmp_path / "out" / "patterns.png").stat().st_size > 1000


def test_run_patterns_resumes_and_reruns_changed_specs(tiny, tmp_path: Path, monkeypatch) -> None:
    text, loaded = _book_and_model(tiny, tmp_path, 1000)
    specs = default_specs(window=64, n_global=4, stride=16, summary=4)
    out = tmp_path / "out"
    first = run_patterns(
        text, 256, patterns=["window", "strided"], lengths=[256], out_dir=out, specs=specs, loaded=loaded
    )

    import memllm.bench.patterns as bench

    ran: list[str] = []
    real = bench.run_pattern
    monkeypatch.setattr(
        bench,
        "run_pattern",
        lambda loaded, spec, ids, backend=None: ran.append(spec.name) or real(loaded, spec, ids, backend),
    )
    specs["strided"] = PatternSpec("strided", P.strided(32))  # a changed spec is rerun
    again = run_patterns(
        text, 256, patterns=["window", "strided"], lengths=[256], out_dir=out, specs=specs, loaded=loaded
    )
    assert ran == ["strided"], "the unchanged window row is kept from the first run"
    assert again[0] == first[0]
    saved = json.loads((out / "patterns.json").read_text())
    assert [r["pattern"] for r in saved["rows"]] == ["window", "strided"]
