"""Memory attention on the tiny model: exactness inside the window, one-softmax equivalence,
eviction bookkeeping, and retrieval of a planted block."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from memllm.attention import (
    READ_AHEAD,
    READ_LAST,
    READ_QUESTION,
    KVBuffer,
    StreamingAttention,
    block_layout,
    parse_layer_top_k,
)
from memllm.memory.faiss_index import BlockIndex
from memllm.memory.retrieval import choose_representatives, distinct_tokens
from memllm.memory.source import PROVISIONAL_BASE, InMemorySource, MemoryView, split_view_id
from memllm.memory.types import MemoryBlock
from memllm.rope import Rope
from memllm.settings import MemorySettings, memory_overrides
from memllm_kernels.reference import attention_with_lse

SMALL = MemorySettings(
    mode="memory", sinks=4, window=32, chunk=16, block_size=8, representatives=2, top_k=3, memory_distance=40
)


def _state(tiny, mem: MemorySettings, trace: bool = False) -> StreamingAttention:
    source = InMemorySource(block_layout(tiny.config, mem)) if mem.mode == "memory" else None
    return StreamingAttention(tiny.config, tiny.rope, mem, memory=source, sink=source, trace=trace)


def _read(tiny, state: StreamingAttention, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([state.forward(tiny.model, ids[:, i : i + chunk]) for i in range(0, ids.shape[1], chunk)], 1)


def test_memory_mode_equals_full_attention_when_input_fits_the_window(tiny):
    ids = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(0))
    full = _read(tiny, _state(tiny, SMALL.__class__(mode="full")), ids, 16)
    mem_state = _state(tiny, SMALL)
    mem = _read(tiny, mem_state, ids, 16)
    assert mem_state.evicted_blocks == 0
    assert torch.allclose(mem, full, atol=1e-5), (mem - full).abs().max()


def test_window_mode_differs_from_full_once_tokens_are_evicted(tiny):
    ids = torch.randint(0, 512, (1, 120), generator=torch.Generator().manual_seed(1))
    full = _read(tiny, _state(tiny, MemorySettings(mode="full")), ids, 16)
    win = _read(tiny, _state(tiny, SMALL.__class__(**{**SMALL.__dict__, "mode": "window"})), ids, 16)
    assert torch.allclose(win[:, :32], full[:, :32], atol=1e-5)
    assert (win[:, -16:] - full[:, -16:]).abs().max() > 1e-3


def test_eviction_keeps_every_token_exactly_once(tiny):
    n = 203
    ids = torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(2))
    state = _state(tiny, SMALL)
    _read(tiny, state, ids, 16)
    source = state.sink
    spans = source.spans(np.arange(source.num_blocks()))
    covered = [t for s, e in spans for t in range(s, e)]
    sinks = list(range(state.n_sinks))
    local = list(range(state.local_start, state.local_start + state.buf.length - state.n_sinks))
    assert sorted(covered + sinks + local) == list(range(n))
    assert state.buf.length - state.n_sinks <= SMALL.window + SMALL.chunk
    # after a flush, everything (sinks included) is in memory exactly once
    state.flush_to_memory()
    spans = source.spans(np.arange(source.num_blocks()))
    assert sorted(t for s, e in spans for t in range(s, e)) == list(range(n))


@pytest.mark.parametrize("mode", ["memory", "window", "full"])
def test_evicting_early_changes_nothing_but_when(tiny, mode):
    """``evict_overflow`` between reads (a chat session after its reply) moves the blocks the next
    read would move, and nothing else: the same logits, buffer and memory as evicting at the read."""
    mem = dataclasses.replace(SMALL, mode=mode)
    ids = torch.randint(0, 512, (1, 90), generator=torch.Generator().manual_seed(4))
    late, early = _state(tiny, mem), _state(tiny, mem)
    want = _read(tiny, late, ids[:, :57], 19)
    got = _read(tiny, early, ids[:, :57], 19)
    before = early.evicted_blocks
    early.evict_overflow()
    if mode == "full":
        assert early.buf.length == 57 and early.evicted_blocks == 0
    else:
        assert early.buf.length - early.n_sinks <= mem.window and early.evicted_blocks > before
    want = torch.cat([want, _read(tiny, late, ids[:, 57:], 5)], 1)
    got = torch.cat([got, _read(tiny, early, ids[:, 57:], 5)], 1)
    assert torch.equal(got, want)
    assert (early.buf.length, early.local_start, early.evicted_blocks) == (
        late.buf.length,
        late.local_start,
        late.evicted_blocks,
    )
    n = late.buf.length
    assert torch.equal(early.buf.rot[:, :, :, :n], late.buf.rot[:, :, :, :n])
    if mode == "memory":
        blocks = np.arange(late.sink.num_blocks())
        assert early.sink.num_blocks() == len(blocks)
        assert np.array_equal(early.sink.spans(blocks), late.sink.spans(blocks))


def test_evicted_keys_are_stored_before_rope(tiny):
    """A memory block's keys equal the layer's pre-RoPE keys of those tokens."""
    ids = torch.randint(0, 512, (1, 80), generator=torch.Generator().manual_seed(3))
    captured = {}
    layer = tiny.model.layers[1].attention
    hook = layer.wqkv.register_forward_hook(lambda m, i, o: captured.setdefault("qkv", []).append(o.detach()))
    state = _state(tiny, SMALL)
    _read(tiny, state, ids, 16)
    hook.remove()
    qkv = torch.cat(captured["qkv"], 1)[0]  # (T, (Hq+2Hkv)*D)
    cfg = tiny.config
    k = qkv[:, cfg.n_heads * cfg.head_dim : (cfg.n_heads + cfg.n_kv_heads) * cfg.head_dim]
    k = k.view(-1, cfg.n_kv_heads, cfg.head_dim).transpose(0, 1)  # (Hkv, T, D)
    got = state.sink.fetch(1, np.array([0]))
    s, e = got.spans[0]
    assert np.allclose(got.keys[0][:, : e - s].astype(np.float32), k[:, s:e].numpy(), atol=2e-3)


@pytest.mark.parametrize(
    ("memory_bias", "positions"), [(0.0, "fixed"), (-1.5, "fixed"), (0.0, "ordered"), (-1.5, "ordered")]
)
@pytest.mark.parametrize(
    ("reading", "t", "answering"),
    [(READ_LAST, 5, False), (READ_AHEAD, 5, False), (READ_QUESTION, 5, True), (READ_LAST, 1, True)],
)
def test_memory_attention_equals_one_softmax_over_concatenated_keys(
    tiny, memory_bias, positions, reading, t, answering
):
    """attend() = softmax over [memory keys, their logits + the bias; local keys at slot positions].

    Memory keys are the blocks' stored pre-RoPE keys seen at memory_distance ("fixed"), or rotated at
    their offsets in the block with the queries at memory_distance + block_size - 1 ("ordered"). The
    bias is memory_bias while input is read, answer_memory_bias in the question's forward and in a
    one-token (decode) step."""
    torch.manual_seed(4)
    cfg = tiny.config
    answer_bias = memory_bias + 0.75
    mem = dataclasses.replace(
        SMALL, memory_bias=memory_bias, answer_memory_bias=answer_bias, memory_positions=positions
    )
    bias = answer_bias if answering else memory_bias
    state = _state(tiny, mem, trace=True)
    ids = torch.randint(0, 512, (1, 96), generator=torch.Generator().manual_seed(4))
    _read(tiny, state, ids, 16)
    assert state.sink.num_blocks() >= SMALL.top_k
    layer = 2
    q = torch.randn(1, cfg.n_heads, t, cfg.head_dim)
    k = torch.randn(1, cfg.n_kv_heads, t, cfg.head_dim)
    v = torch.randn(1, cfg.n_kv_heads, t, cfg.head_dim)
    with torch.inference_mode():
        state.reading = reading
        state.begin(t)
        out = state.attend(layer, q, k, v)
    retrieved = state._retrieved[layer]
    state.end()
    # reference: explicit concatenation of memory and local keys, explicit positions, one softmax
    n_local = state.buf.length
    pos_q = torch.arange(n_local - t, n_local)
    rope: Rope = tiny.rope
    q_local = rope.apply(q, pos_q)
    bs = SMALL.block_size
    ordered = positions == "ordered"
    q_mem = rope.apply(q, torch.full((t,), SMALL.memory_distance + (bs - 1 if ordered else 0)))
    stored = state.sink.fetch(layer, retrieved.ids)  # the blocks' pre-RoPE keys as stored (n, Hkv, bs, D)
    n_blocks = len(retrieved.ids)
    mem_keys = torch.from_numpy(stored.keys).float().permute(1, 0, 2, 3).reshape(1, cfg.n_kv_heads, n_blocks * bs, -1)
    if ordered:
        mem_keys = rope.apply(mem_keys, torch.arange(bs).repeat(n_blocks))
    k_local = state.buf.rot[layer, :, :, :n_local]
    v_local = state.buf.val[layer, :, :, :n_local]
    scale = 1 / math.sqrt(cfg.head_dim)
    from memllm_kernels.reference import expand_kv

    s_mem = q_mem @ expand_kv(mem_keys, cfg.n_heads).transpose(-1, -2) * scale + bias
    s_mem = s_mem.masked_fill(~retrieved.mask, -math.inf)
    s_loc = q_local @ expand_kv(k_local, cfg.n_heads).transpose(-1, -2) * scale
    causal = torch.arange(n_local).unsqueeze(0) <= pos_q.unsqueeze(1)
    s_loc = s_loc.masked_fill(~causal, -math.inf)
    probs = torch.softmax(torch.cat([s_mem, s_loc], -1), -1)
    values = torch.cat([expand_kv(retrieved.values.float(), cfg.n_heads), expand_kv(v_local, cfg.n_heads)], 2)
    ref = probs @ values
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    # the memory trace saw the retrieved blocks
    assert set(state.trace.mass) >= set(retrieved.ids.tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tracing_memory_does_not_change_the_output(tiny, dtype):
    """A memory trace only observes: logits with and without it are the same, bit for bit. (The
    trace once ran another kernel, whose bfloat16 rounding turned passkey answers.)"""
    model = copy.deepcopy(tiny.model).to(dtype)
    ids = torch.randint(0, 512, (1, 96), generator=torch.Generator().manual_seed(8))
    outs = []
    for trace in (False, True):
        source = InMemorySource(block_layout(tiny.config, SMALL))
        state = StreamingAttention(tiny.config, tiny.rope, SMALL, dtype, memory=source, sink=source, trace=trace)
        with torch.inference_mode():
            outs.append(torch.cat([state.forward(model, ids[:, i : i + 16]) for i in range(0, 96, 16)], 1))
    assert state.trace is not None and sum(state.trace.mass.values()) > 0
    assert torch.equal(outs[0], outs[1])


def test_unknown_memory_positions_are_refused(tiny):
    with pytest.raises(ValueError, match="memory_positions 'sorted'"):
        _state(tiny, dataclasses.replace(SMALL, memory_positions="sorted"))


def test_unknown_representative_choice_is_refused(tiny):
    with pytest.raises(ValueError, match="representative_choice 'max'"):
        _state(tiny, dataclasses.replace(SMALL, representative_choice="max"))


def test_representative_choices_pick_mass_and_distinct_tokens():
    """``mass`` takes the tokens that drew the most attention; ``distinct`` the planted outlier keys
    of a block of near-identical keys; ``mass+distinct`` both, without repeating a token."""
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 1, 16, generator=gen).expand(2, 12, 16).clone()  # (Hkv, n, D): all tokens alike
    keys += 0.01 * torch.randn(keys.shape, generator=gen)
    keys[:, 7] += 3 * torch.randn(2, 16, generator=gen)  # the outliers: tokens 7 and 2
    keys[:, 2] += 2 * torch.randn(2, 16, generator=gen)
    mass = torch.zeros(2, 12)
    mass[:, 4], mass[:, 9] = 5.0, 3.0  # the tokens that drew attention: 4, then 9

    def chosen(choice: str, count: int) -> list[int]:
        reps = choose_representatives(keys, mass, count, choice).view(-1, 2, 16)  # (R, Hkv, D)
        return [int(torch.nonzero((keys.permute(1, 0, 2) == r).all(-1).all(-1))[0]) for r in reps]

    assert chosen("mass", 2) == [4, 9]
    assert chosen("distinct", 2) == [7, 2]
    assert chosen("mass+distinct", 4) == [4, 9, 7, 2]
    assert chosen("mass+distinct", 3) == [4, 9, 7]
    mass[:, 7] = 9.0  # the most distinct token is also the heaviest: not chosen twice
    assert chosen("mass+distinct", 2) == [7, 2]
    assert distinct_tokens(keys, 20).tolist()[:2] == [7, 2] and len(distinct_tokens(keys, 20)) == 12
    with pytest.raises(ValueError, match="representative choice 'max'"):
        choose_representatives(keys, mass, 2, "max")


def test_layer_top_k_sets_blocks_retrieved_per_layer(tiny):
    """``layer_top_k`` overrides ``top_k`` on the layers it names; the others keep ``top_k``."""
    n_layers = tiny.config.n_layers
    assert parse_layer_top_k("", 32, 4) == (32, 32, 32, 32)
    assert parse_layer_top_k("1-2:8, 3:0", 32, 4) == (32, 8, 8, 0)
    for bad in ("1-2", "1:x", f"{n_layers}:4"):
        with pytest.raises(ValueError):
            parse_layer_top_k(bad, 32, n_layers)
    # a top_k given for a request or command applies to every layer and every chunk
    assert memory_overrides(top_k=16, window=None) == {"top_k": 16, "layer_top_k": "", "reading_top_k": 0}
    assert memory_overrides(top_k=64, reading_top_k=8)["reading_top_k"] == 8
    assert memory_overrides(window=512) == {"window": 512}
    mem = dataclasses.replace(SMALL, top_k=4, layer_top_k=f"1:1,{n_layers - 1}:0")
    state = _state(tiny, mem)
    ids = torch.randint(0, 512, (1, 128), generator=torch.Generator().manual_seed(6))
    _read(tiny, state, ids, 16)
    assert state.sink.num_blocks() >= 4
    got = {layer: len(r.ids) for layer, r in state._retrieved.items()}
    assert got[0] == 4 and got[1] == 1
    assert n_layers - 1 not in got  # top-k 0: the layer attends to its window only


def test_merge_equals_single_softmax():
    torch.manual_seed(5)
    q = torch.randn(1, 4, 3, 8)
    k = torch.randn(1, 2, 20, 8)
    v = torch.randn(1, 2, 20, 8)
    whole, _, _ = attention_with_lse(q, k, v)
    from memllm_kernels.reference import merge_attention

    a = attention_with_lse(q, k[:, :, :7], v[:, :, :7])
    b = attention_with_lse(q, k[:, :, 7:], v[:, :, 7:])
    assert torch.allclose(merge_attention([a[:2], b[:2]]), whole, atol=1e-6)


def _random_block(layout, rng, start: int, reps: np.ndarray | None = None) -> MemoryBlock:
    n = layout.block_size
    shape = (layout.n_layers, layout.n_kv_heads, n, layout.head_dim)
    if reps is None:
        reps = rng.normal(size=(layout.n_layers, layout.representatives, layout.search_dim)).astype(np.float32)
    return MemoryBlock(
        rng.normal(size=shape).astype(np.float16), rng.normal(size=shape).astype(np.float16), reps, start, start + n
    )


@pytest.mark.parametrize("ivf_threshold", [10**9, 64])
def test_retrieval_returns_the_block_holding_a_planted_key(tiny, ivf_threshold):
    layout = block_layout(tiny.config, SMALL)
    rng = np.random.default_rng(6)
    source = InMemorySource(layout, ivf_threshold=ivf_threshold)
    for i in range(60):
        source.add(_random_block(layout, rng, i * layout.block_size))
    query = rng.normal(size=layout.search_dim).astype(np.float32)
    query /= np.linalg.norm(query)
    planted_reps = rng.normal(size=(layout.n_layers, layout.representatives, layout.search_dim)).astype(np.float32)
    planted_reps[:, 0] = 25 * query  # one representative points along the query
    planted = source.add(_random_block(layout, rng, 60 * layout.block_size, planted_reps))
    for layer in layout.layers:
        _, ids = source.search(layer, query[None], 3)
        assert ids[0, 0] == planted
        assert len(set(ids[0].tolist())) == 3
    fetched = source.fetch(layout.layers[0], np.array([planted]))
    assert tuple(fetched.spans[0]) == (60 * layout.block_size, 61 * layout.block_size)
    # the same block is found through a view over several sources, with its source index attached
    other = InMemorySource(layout)
    other.add(_random_block(layout, rng, 0))
    view = MemoryView([other, source])
    _, ids = view.search(layout.layers[0], query[None], 2)
    assert split_view_id(ids[0, 0]) == (1, planted)
    assert view.fetch(layout.layers[0], ids[0]).keys.shape[0] == 2


@pytest.mark.parametrize("retrieval", ["mean", "last", "heads"])
def test_a_fresh_states_first_chunk_retrieves_from_a_prefilled_source(tiny, retrieval):
    """A knowledge-base question: a new state whose memory already holds blocks retrieves them while
    it reads its very first chunk, under every scoring (``heads`` used to z-score against an empty
    sample of local keys: NaN scores, nothing retrieved)."""
    layout = block_layout(tiny.config, SMALL)
    rng = np.random.default_rng(7)
    source = InMemorySource(layout)
    for i in range(10):
        source.add(_random_block(layout, rng, i * layout.block_size))
    state = StreamingAttention(tiny.config, tiny.rope, SMALL, memory=source, retrieval=retrieval, trace=True)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(8))
    out = _read(tiny, state, ids, 16)
    assert torch.isfinite(out).all()
    assert {layer: len(r.ids) for layer, r in state._retrieved.items()} == dict.fromkeys(layout.layers, SMALL.top_k)
    assert sum(state.trace.mass.values()) > 0


@pytest.mark.parametrize("n_blocks", [5, 300])
def test_block_index_search_returns_each_blocks_best_score_best_first(n_blocks):
    """Against brute force: distinct block ids ranked by their best representative's inner product,
    padded with id -1 / score -inf when there are fewer blocks than k."""
    rng = np.random.default_rng(n_blocks)
    reps, dim, k = 4, 24, 16
    ids = np.repeat(np.arange(100, 100 + n_blocks), reps)
    vectors = rng.normal(size=(n_blocks * reps, dim)).astype(np.float32)
    index = BlockIndex(dim)
    index.add(ids, vectors)
    queries = rng.normal(size=(3, dim)).astype(np.float32)
    scores, got = index.search(queries, k)
    best = (queries @ vectors.T).reshape(3, n_blocks, reps).max(-1)  # (3, blocks)
    for row in range(3):
        order = np.argsort(-best[row])[:k]
        n = len(order)
        assert got[row, :n].tolist() == (100 + order).tolist()
        np.testing.assert_allclose(scores[row, :n], best[row, order], rtol=1e-5, atol=1e-5)
        assert (got[row, n:] == -1).all() and np.isneginf(scores[row, n:]).all()


def test_memorizing_mode_attends_each_querys_own_nearest_tokens(tiny):
    """Token-level kNN mode: equal to full attention before eviction; after eviction, memory is read
    and the output differs from window-only attention."""
    mem = MemorySettings(
        mode="memorizing",
        sinks=4,
        window=32,
        chunk=16,
        block_size=8,
        memorizing_layers="1",
        memorizing_top_k=8,
        memory_distance=40,
    )
    ids = torch.randint(0, 512, (1, 120), generator=torch.Generator().manual_seed(7))
    state = StreamingAttention(tiny.config, tiny.rope, mem)
    out = _read(tiny, state, ids, 16)
    full = _read(tiny, _state(tiny, MemorySettings(mode="full")), ids, 16)
    win = _read(
        tiny, StreamingAttention(tiny.config, tiny.rope, MemorySettings(**{**mem.__dict__, "mode": "window"})), ids, 16
    )
    assert torch.allclose(out[:, :32], full[:, :32], atol=1e-5)
    assert len(state.token_memory) == state.evicted_blocks * 8 > 0
    assert (out[:, -16:] - win[:, -16:]).abs().max() > 1e-4


def test_per_head_rows_score_one_head_at_a_time():
    """A per-head search row's inner product with a concatenated key is that head's own logit."""
    from memllm.memory.retrieval import key_statistics, per_head_rows, zscores

    g = torch.Generator().manual_seed(8)
    hq, hkv, t, d = 6, 2, 5, 8
    q = torch.randn(hq, t, d, generator=g)
    rows, kv, vectors = per_head_rows(q, hkv, last_n=3)
    assert rows.shape == (hq * 3, hkv * d)
    key = torch.randn(hkv, d, generator=g)  # one token's keys, concatenated below
    logits = rows @ key.reshape(-1)
    expected = torch.stack([q[h, t - 3 + i] @ key[h // (hq // hkv)] for h in range(hq) for i in range(3)])
    assert torch.allclose(logits, expected, atol=1e-5)
    # z-scores: a key drawn far along a row's query direction stands out in every head
    keys = torch.randn(hkv, 500, d, generator=g)
    mean, cov = key_statistics(keys)
    typical = zscores(torch.stack([vectors[i] @ keys[kv[i], :50].T for i in range(len(kv))]), vectors, kv, mean, cov)
    assert typical.abs().mean() < 1.5
    planted = zscores((vectors * vectors).sum(-1, keepdim=True) * 3, vectors, kv, mean, cov)
    assert (planted > 3).all()


def _fetching_without_reuse(monkeypatch) -> None:
    """Every search fetches and casts all its blocks again (the path before reuse)."""
    monkeypatch.setattr(StreamingAttention, "_gather_blocks", StreamingAttention._fetch_blocks)


def test_blocks_of_the_previous_search_are_reused_with_the_same_result(tiny, monkeypatch):
    """Consecutive searches share blocks: the shared ones stay in place, not fetched again. Every
    layer holds the blocks of fetching everything (in another order, which attention does not see:
    the logits agree up to the order of the float sums), each key for key its stored payload."""
    mem = dataclasses.replace(SMALL, top_k=4)
    ids = torch.randint(0, 512, (1, 200), generator=torch.Generator().manual_seed(3))

    def read(reuse: bool) -> tuple[torch.Tensor, StreamingAttention, int]:
        state = _state(tiny, mem)
        fetched = 0
        fetch = state.memory.fetch

        def counting(layer, block_ids):
            nonlocal fetched
            fetched += len(block_ids)
            return fetch(layer, block_ids)

        state.memory.fetch = counting
        with monkeypatch.context() as m:
            if not reuse:
                _fetching_without_reuse(m)
            logits = torch.cat(
                [_read(tiny, state, ids[:, i : i + 8], 1 if i >= 160 else 8) for i in range(0, 200, 8)], 1
            )
        return logits, state, fetched

    logits, state, fetched = read(reuse=True)
    plain_logits, plain, plain_fetched = read(reuse=False)
    torch.testing.assert_close(logits, plain_logits, atol=1e-4, rtol=1e-3)
    for layer, got in state._retrieved.items():
        assert sorted(got.ids.tolist()) == sorted(plain._retrieved[layer].ids.tolist())
        want = state._fetch_blocks(layer, got.ids, got.keys.dtype)  # its blocks, in its order, fetched afresh
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
        assert torch.equal(got.mask, want.mask)
    assert fetched < 0.75 * plain_fetched  # many blocks came from the previous search


class _ProvisionalSource(InMemorySource):
    """An in-memory source whose ids are all provisional, like a store's staged blocks."""

    def search(self, layer: int, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = super().search(layer, queries, k)
        return scores, np.where(ids >= 0, ids + PROVISIONAL_BASE, ids)

    def fetch(self, layer: int, block_ids: np.ndarray):
        return super().fetch(layer, np.asarray(block_ids) - PROVISIONAL_BASE)


@pytest.mark.parametrize("provisional", [False, True])
def test_only_stable_block_ids_are_reused(tiny, provisional):
    """A provisional id may name another payload at the next search: it is fetched again. A
    stable id names one payload for good: it is reused."""
    layout = block_layout(tiny.config, SMALL)
    source = (_ProvisionalSource if provisional else InMemorySource)(layout)
    state = StreamingAttention(tiny.config, tiny.rope, SMALL, memory=source, sink=source)
    _read(tiny, state, torch.randint(0, 512, (1, 96), generator=torch.Generator().manual_seed(5)), 16)
    layer, before = next(iter(state._retrieved.items()))
    source._keys *= 2  # every payload changes under its id (a staged id given to another block)
    source._values *= 2
    again = state._gather_blocks(layer, before.ids, before.keys.dtype)
    if provisional:
        assert torch.equal(again.keys, 2 * before.keys) and torch.equal(again.values, 2 * before.values)
    else:
        assert again is before


def test_a_reads_key_mass_is_owed_until_read_and_equals_the_mass_added_at_once(tiny, monkeypatch):
    """A forward of several tokens only keeps the rows its key mass comes from; the mass is added when
    first read (an eviction, a spill, a copy) or at ``settle``, and equals the mass added at once:
    the same blocks leave with the same representatives."""
    mem = dataclasses.replace(SMALL, mass_stride=4)
    ids = torch.randint(0, 512, (1, 120), generator=torch.Generator().manual_seed(11))

    def read(at_once: bool) -> StreamingAttention:
        state = _state(tiny, mem)
        if at_once:
            owe = KVBuffer.owe_mass

            def owe_and_settle(self, *args):
                owe(self, *args)
                self.settle_mass()

            monkeypatch.setattr(KVBuffer, "owe_mass", owe_and_settle)
        _read(tiny, state, ids, 16)
        monkeypatch.undo()
        return state

    deferred, at_once = read(at_once=False), read(at_once=True)
    assert deferred.buf.owes_mass and not at_once.buf.owes_mass  # the last chunk's mass is still owed
    assert deferred.evicted_blocks == at_once.evicted_blocks > 0
    n = deferred.buf.length
    torch.testing.assert_close(deferred.buf.mass[:, :, :, :n], at_once.buf.mass[:, :, :, :n])  # reading settles
    assert not deferred.buf.owes_mass
    for layer in deferred.layout.layers:
        got = deferred.memory.fetch(layer, np.arange(deferred.memory.num_blocks()))
        want = at_once.memory.fetch(layer, np.arange(at_once.memory.num_blocks()))
        assert np.array_equal(got.keys, want.keys)
    # each sampled query spreads one unit per query head over the keys it sees: Hq / Hkv per kv head
    fresh = _state(tiny, mem)
    _read(tiny, fresh, ids[:, :16], 16)
    group = tiny.config.n_heads // tiny.config.n_kv_heads
    want = torch.full((tiny.config.n_layers, 1, tiny.config.n_kv_heads), 16.0 * group)
    torch.testing.assert_close(fresh.buf.mass[:, :, :, :16].sum(-1), want)


def test_settle_adds_the_owed_mass_and_the_copy_of_a_buffer_owes_nothing(tiny):
    state = _state(tiny, SMALL)
    _read(tiny, state, torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(12)), 16)
    assert state.buf.owes_mass
    copied = state.buf.copy()
    assert not state.buf.owes_mass and not copied.owes_mass
    assert torch.equal(copied.mass, state.buf.mass) and copied.mass is not state.buf.mass
    _read(tiny, state, torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(13)), 8)
    assert state.buf.owes_mass and not copied.owes_mass  # the copy shares no owed list
    state.settle()
    assert not state.buf.owes_mass


@pytest.mark.parametrize("group", [1, 3])
def test_layers_of_a_search_group_attend_to_the_blocks_their_first_layer_chose(tiny, group, monkeypatch):
    """``search_group``: one search per group of consecutive memory layers in a forward; every layer
    of the group attends to those blocks, its own keys and values of them."""
    mem = dataclasses.replace(SMALL, search_group=group)
    state = _state(tiny, mem)
    _read(tiny, state, torch.randint(0, 512, (1, 112), generator=torch.Generator().manual_seed(14)), 16)
    searched = []
    search = state.memory.search
    monkeypatch.setattr(state.memory, "search", lambda layer, q, k: (searched.append(layer), search(layer, q, k))[1])
    _read(tiny, state, torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(15)), 8)
    layers = sorted(state.memory_layers)
    leaders = layers[::group]
    assert searched == leaders
    for i, layer in enumerate(layers):
        leader = layers[i - i % group]
        got = state._retrieved[layer]
        assert sorted(got.ids.tolist()) == sorted(state._retrieved[leader].ids.tolist())
        want = state._fetch_blocks(layer, got.ids, got.keys.dtype)  # this layer's own payload of them
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)


def test_search_group_below_one_is_refused(tiny):
    with pytest.raises(ValueError, match="search_group"):
        _state(tiny, dataclasses.replace(SMALL, search_group=0))
