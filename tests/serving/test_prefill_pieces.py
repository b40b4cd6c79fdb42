"""How a prompt is cut into prefill forwards: chunks, and in memory mode the prompt's last
``final_chunk`` tokens on their own, so that the question searches memory for itself."""

from __future__ import annotations

import dataclasses

import pytest
from serving_helpers import SMALL, prompt, read_in_scheduler, tiny_engine


@pytest.mark.parametrize(
    ("mode", "total", "final", "pieces"),
    [
        ("memory", 100, 16, [16, 16, 16, 16, 16, 4, 16]),  # the last 16 split off the last chunk
        ("memory", 96, 16, [16] * 6),  # the last chunk already holds just the last 16
        ("memory", 40, 5, [16, 16, 3, 5]),
        ("memory", 10, 5, [10]),  # a prompt of one chunk (a chat turn) stays one forward
        ("memory", 100, 0, [16] * 6 + [4]),  # off
        ("window", 100, 16, [16] * 6 + [4]),  # no memory to search: chunks only
    ],
)
def test_prefill_pieces(tiny, mode, total, final, pieces):
    engine = tiny_engine(tiny, dataclasses.replace(SMALL, final_chunk=final))
    state = engine.new_state(mode)
    got = [n for n, _ in engine.prefill_steps(state, prompt(0, total))]
    assert got == pieces
    assert state.n_tokens == total


def test_the_last_search_comes_from_the_final_piece(tiny, monkeypatch):
    """The last memory search of a long prompt is made by the forward that reads only its last
    ``final_chunk`` tokens (a chunk searches with the mean of its own queries)."""
    engine = tiny_engine(tiny)
    state = engine.new_state("memory")
    searched: list[int] = []
    real_search = state.memory.search

    def search(layer, queries, k):
        searched.append(state.n_tokens + state._pending)  # tokens read once this forward ends
        return real_search(layer, queries, k)

    monkeypatch.setattr(state.memory, "search", search)
    engine.prefill(state, prompt(1, 100))
    assert searched, "a 100-token prompt evicts blocks and searches them"
    assert state.n_tokens == 100
    # every layer's last search came in the forward that read the final 16 tokens, and the one
    # before it in the forward that stopped 16 tokens short of the end
    ends = sorted(set(searched))
    assert ends[-1] == 100
    assert ends[-1] - ends[-2] == SMALL.final_chunk


def _searches(state, with_k: bool = False) -> list[tuple[int, ...]]:
    """Record (tokens read once the searching forward ends, query rows[, k]) of each memory search."""
    seen: list[tuple[int, ...]] = []
    real_search = state.memory.search

    def search(layer, queries, k):
        seen.append((state.n_tokens + state._pending, len(queries), *((k,) if with_k else ())))
        return real_search(layer, queries, k)

    state.memory.search = search
    return seen


@pytest.mark.parametrize("reader", ["engine", "scheduler"])
async def test_the_question_searches_with_the_final_retrieval(tiny, reader):
    """With ``final_retrieval=heads``, the forward that reads the final tokens searches per head
    (one row per query head and token); every other forward searches with the chunk mean (one row)."""
    engine = tiny_engine(tiny, dataclasses.replace(SMALL, final_retrieval="heads"))
    state = engine.new_state("memory")
    seen = _searches(state)
    ids = prompt(2, 100)
    if reader == "engine":
        engine.prefill(state, ids)
    else:
        await read_in_scheduler(engine, state, ids)
    assert state.n_tokens == 100
    heads_rows = tiny.config.n_heads * SMALL.final_chunk
    assert {rows for end, rows in seen if end == 100} == {heads_rows}
    assert {rows for end, rows in seen if end < 100} == {1}
    # the setting is the only difference: with final_retrieval "" the question searches with its mean too
    plain_engine = tiny_engine(tiny, dataclasses.replace(SMALL, final_retrieval=""))
    plain = plain_engine.new_state("memory")
    seen_plain = _searches(plain)
    plain_engine.prefill(plain, ids)
    assert {rows for _, rows in seen_plain} == {1}
    assert [end for end, _ in seen_plain] == [end for end, _ in seen]


def test_an_unknown_final_retrieval_is_refused(tiny):
    with pytest.raises(ValueError, match="final_retrieval"):
        tiny_engine(tiny, dataclasses.replace(SMALL, final_retrieval="median")).new_state("memory")


@pytest.mark.parametrize("reader", ["engine", "scheduler"])
async def test_the_question_retrieves_final_top_k_blocks(tiny, reader):
    """``final_top_k`` blocks for the question's forward, ``top_k`` for every other search; a layer
    whose top-k is 0 (``layer_top_k``) still retrieves nothing."""
    mem = dataclasses.replace(SMALL, final_top_k=5, layer_top_k="0:0")
    engine = tiny_engine(tiny, mem)
    state = engine.new_state("memory")
    seen = _searches(state, with_k=True)
    ids = prompt(4, 100)
    if reader == "engine":
        engine.prefill(state, ids)
    else:
        await read_in_scheduler(engine, state, ids)
    searching_layers = tiny.config.n_layers - 1
    passes = 2 if mem.final_consensus else 1  # the voting pass searches as the read does
    assert [k for end, _, k in seen if end == 100] == [5] * searching_layers * passes
    assert {k for end, _, k in seen if end < 100} == {SMALL.top_k}


@pytest.mark.parametrize("reader", ["engine", "scheduler"])
@pytest.mark.parametrize(("reading_top_k", "ahead_k"), [(2, 2), (10, SMALL.top_k), (0, SMALL.top_k)])
async def test_chunks_read_ahead_retrieve_reading_top_k(tiny, reader, reading_top_k, ahead_k):
    """A chunk that more of the prompt follows retrieves at most ``reading_top_k`` blocks per layer
    (0: top_k); the question keeps ``final_top_k``, and a short prompt (a chat turn) ``top_k``."""
    mem = dataclasses.replace(SMALL, reading_top_k=reading_top_k, final_top_k=5, layer_top_k="0:0")
    engine = tiny_engine(tiny, mem)
    state = engine.new_state("memory")
    seen = _searches(state, with_k=True)
    for ids in (prompt(4, 100), prompt(5, 10)):
        if reader == "engine":
            engine.prefill(state, ids)
        else:
            await read_in_scheduler(engine, state, ids)
    assert state.n_tokens == 110
    searching_layers = tiny.config.n_layers - 1  # layer 0 retrieves nothing (its top-k is 0)
    assert {k for end, _, k in seen if end < 100} == {ahead_k}
    assert len([end for end, _, _ in seen if end == 84]) == searching_layers  # the chunk before the question
    assert {k for end, _, k in seen if end == 100} == {5}
    assert [k for end, _, k in seen if end == 110] == [SMALL.top_k] * searching_layers


def test_perplexity_reads_every_chunk_but_the_last_ahead(tiny):
    engine = tiny_engine(tiny, dataclasses.replace(SMALL, reading_top_k=2))
    state = engine.new_state("memory")
    seen = _searches(state, with_k=True)
    engine.logits_of(state, prompt(3, 100))
    assert {k for end, _, k in seen if end < 100} == {2}
    assert {k for end, _, k in seen if end == 100} == {SMALL.top_k}


def test_a_negative_reading_top_k_is_refused(tiny):
    with pytest.raises(ValueError, match="reading_top_k"):
        tiny_engine(tiny, dataclasses.replace(SMALL, reading_top_k=-1)).new_state("memory")


def test_final_top_k_0_is_top_k(tiny):
    engine = tiny_engine(tiny, dataclasses.replace(SMALL, final_top_k=0))
    state = engine.new_state("memory")
    seen = _searches(state, with_k=True)
    engine.prefill(state, prompt(4, 100))
    assert {k for _, _, k in seen} == {SMALL.top_k}
