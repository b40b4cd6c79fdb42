"""The reference is the spec: check it against independent constructions (SDPA, loops, merges)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memllm_kernels import patterns as P
from memllm_kernels.reference import (
    attention_with_lse,
    block_mass,
    expand_kv,
    memory_attention,
    merge_attention,
    pattern_attention,
)


def _qkv(b=2, hq=6, hkv=2, tq=40, tk=40, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, hq, tq, d, generator=g),
        torch.randn(b, hkv, tk, d, generator=g),
        torch.randn(b, hkv, tk, d, generator=g),
    )


def test_full_pattern_is_causal_sdpa() -> None:
    q, k, v = _qkv()
    got = pattern_attention(q, k, v, P.full())
    want = F.scaled_dot_product_attention(q, expand_kv(k, 6), expand_kv(v, 6), is_causal=True)
    torch.testing.assert_close(got.out, want, atol=1e-5, rtol=1e-5)


def test_window_pattern_row_by_row() -> None:
    """Each query row attends exactly to keys (p - w, p] by a plain softmax over that slice."""
    q, k, v = _qkv(b=1, hq=2, hkv=1, tq=7, tk=19, d=16)
    w = 5
    got = pattern_attention(q, k, v, P.sliding_window(w)).out
    kk, vv = expand_kv(k, 2), expand_kv(v, 2)
    for i in range(7):
        p = i + 12
        lo = max(0, p - w + 1)
        s = q[:, :, i : i + 1] @ kk[:, :, lo : p + 1].transpose(-1, -2) / 4.0
        want = torch.softmax(s, -1) @ vv[:, :, lo : p + 1]
        torch.testing.assert_close(got[:, :, i : i + 1], want, atol=1e-5, rtol=1e-5)


def test_lse_and_key_mass_are_consistent() -> None:
    q, k, v = _qkv(hq=4, hkv=2, tq=10, tk=40)
    res = pattern_attention(q, k, v, P.bigbird(8, 2, 2, random_block=4), return_key_mass=True)
    assert res.key_mass is not None and res.key_mass.shape == (2, 2, 40)
    # every query row's probabilities sum to 1: total mass = queries x heads per group
    torch.testing.assert_close(res.key_mass.sum(-1), torch.full((2, 2), 10.0 * 2))
    hidden = ~P.token_mask(P.bigbird(8, 2, 2, random_block=4), 10, 40)
    assert hidden.all(0).any(), "test needs a key no query sees"
    assert (res.key_mass[..., hidden.all(0)] == 0).all(), "a key no query sees must get zero mass"


def test_merge_of_disjoint_parts_equals_one_softmax() -> None:
    q, k, v = _qkv(tq=10, tk=30)
    whole = attention_with_lse(q, k, v)
    parts = [attention_with_lse(q, k[:, :, a:b], v[:, :, a:b]) for a, b in ((0, 7), (7, 20), (20, 30))]
    merged = merge_attention([(o, lse) for o, lse, _ in parts])
    torch.testing.assert_close(merged, whole[0], atol=1e-5, rtol=1e-5)


def test_merge_of_two_parts_equals_one_softmax_and_empty_parts_add_nothing() -> None:
    """The two-part path: one softmax over both key sets; a part without keys (lse -inf, out 0)
    leaves the other as it is; rows empty in both parts stay 0."""
    q, k, v = _qkv(tq=10, tk=30)
    whole = attention_with_lse(q, k, v)
    first, second = (attention_with_lse(q, k[:, :, a:b], v[:, :, a:b]) for a, b in ((0, 11), (11, 30)))
    torch.testing.assert_close(merge_attention([first[:2], second[:2]]), whole[0], atol=1e-5, rtol=1e-5)
    none = torch.zeros(q.shape[:3], dtype=torch.bool).unsqueeze(-1).expand(*q.shape[:3], 30)
    empty = attention_with_lse(q, k, v, none)[:2]
    assert torch.isinf(empty[1]).all() and not empty[0].any()
    torch.testing.assert_close(merge_attention([whole[:2], empty]), whole[0])
    torch.testing.assert_close(merge_attention([empty, whole[:2]]), whole[0])
    assert torch.equal(merge_attention([empty, empty]), torch.zeros_like(q))


def _memory_case(per_head: bool, seed: int = 0):
    q, k, v = _qkv(b=2, hq=4, hkv=2, tq=24, tk=50, d=16, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    pool_k, pool_v = torch.randn(7, 2, 8, 16, generator=g), torch.randn(7, 2, 8, 16, generator=g)
    lens = torch.tensor([8, 3, 8, 1, 5, 8, 2])
    heads = 2 if per_head else 1
    ids = torch.stack([torch.randperm(7, generator=g)[:3] for _ in range(2 * heads * 3)]).view(2, heads, 3, 3)
    ids[0, :, 1, 2] = -1
    q_mem = torch.randn(q.shape, generator=g)
    return q, k, v, pool_k, pool_v, lens, ids, q_mem


@pytest.mark.parametrize("per_head", [False, True])
def test_memory_is_one_softmax_over_concatenated_keys(per_head: bool) -> None:
    """Build, per chunk and batch and kv head, the concatenation [memory tokens | local keys] by hand."""
    q, k, v, pool_k, pool_v, lens, ids, q_mem = _memory_case(per_head)
    local = P.sinks_window(3, 10)
    res = memory_attention(
        q,
        k,
        v,
        pool_k,
        pool_v,
        ids,
        local=local,
        q_mem=q_mem,
        pool_lens=lens,
        chunk_size=8,
        return_key_mass=True,
    )
    mask_local = P.token_mask(local, 24, 50)
    scale = 16**-0.5
    for b in range(2):
        for h in range(4):
            hk = h // 2
            for c in range(3):
                rows = range(c * 8, c * 8 + 8)
                row_ids = ids[b, hk if per_head else 0, c]
                mk = [pool_k[i, hk, : lens[i]] for i in row_ids.tolist() if i >= 0]
                mv = [pool_v[i, hk, : lens[i]] for i in row_ids.tolist() if i >= 0]
                mk, mv = torch.cat(mk), torch.cat(mv)
                for i in rows:
                    s_mem = (q_mem[b, h, i] @ mk.T) * scale
                    s_loc = (q[b, h, i] @ k[b, hk].T) * scale
                    s_loc = s_loc.masked_fill(~mask_local[i], float("-inf"))
                    p = torch.softmax(torch.cat([s_mem, s_loc]), 0)
                    want = p[: len(mk)] @ mv + p[len(mk) :] @ v[b, hk]
                    torch.testing.assert_close(res.out[b, h, i], want, atol=1e-5, rtol=1e-5)
                    torch.testing.assert_close(res.lse[b, h, i], torch.logsumexp(torch.cat([s_mem, s_loc]), 0))
    # masses: each row's probabilities sum to one over memory + local
    total = res.key_mass.sum(-1) + res.memory_mass.sum((-1, -2))
    torch.testing.assert_close(total, torch.full((2, 2), 24.0 * 2))
    assert (res.memory_mass[0, :, 1, 2] == 0).all(), "an empty slot (-1) gets no mass"


def test_memory_without_blocks_is_the_local_pattern() -> None:
    q, k, v, pool_k, pool_v, lens, ids, _ = _memory_case(False)
    local = P.sinks_window(3, 10)
    res = memory_attention(q, k, v, pool_k, pool_v, torch.full_like(ids, -1), local=local, pool_lens=lens)
    torch.testing.assert_close(res.out, pattern_attention(q, k, v, local).out)


def test_memory_shape_errors() -> None:
    q, k, v, pool_k, pool_v, _, ids, _ = _memory_case(False)
    with pytest.raises(ValueError, match="chunks"):
        memory_attention(q, k, v, pool_k, pool_v, ids, local=P.full(), chunk_size=5)
    with pytest.raises(ValueError, match="pool"):
        memory_attention(q, k, v, pool_k[:, :1], pool_v[:, :1], ids, local=P.full())
    with pytest.raises(ValueError, match="multiple"):
        pattern_attention(q[:, :3], k, v, P.full())


def test_block_mass_sums_ragged_blocks() -> None:
    m = torch.arange(10.0).view(1, 10)
    assert block_mass(m, 4).tolist() == [[6.0, 22.0, 17.0]]


def test_pattern_validation() -> None:
    with pytest.raises(ValueError):
        P.Pattern("window", window=0)
    with pytest.raises(ValueError):
        P.Pattern("fixed", stride=4, summary=5)
    with pytest.raises(ValueError):
        P.Pattern("dilated")  # type: ignore[arg-type]
    assert P.bigbird(64, 8, 3).name == "bigbird64+g8+r3x64"
    assert P.sliding_window(4) == P.Pattern("window", window=4), "patterns compare by rule, not name"
