"""The bundled model (SmolLM2-135M) where behaviour matters: memory attention over a knowledge base
must draw on the block that holds the fact, and the trace and citations must point at it."""

from __future__ import annotations

import pytest
from kb_helpers import service_at

from memllm.engine import Engine
from memllm.settings import MemorySettings

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY = "71432"


@pytest.mark.slow
async def test_memory_answer_cites_the_passage_it_read(real_model, tmp_path):
    engine = Engine(real_model, MemorySettings(window=512, chunk=256, sinks=16, memory_distance=512))
    text = (
        "There is an important info hidden inside a lot of irrelevant text.\n\n"
        + FILLER * 14
        + f"\n\nThe pass key is {KEY}. Remember it. {KEY} is the pass key.\n\n"
        + FILLER * 14
    )
    async with service_at(tmp_path / "data", engine) as svc:
        await svc.create_kb("facts")
        res = await svc.ingest_text("facts", "haystack.txt", text)
        assert res.status == "ready" and res.tokens > 600 and res.blocks >= 5
        ans = await svc.ask(
            "facts",
            "What is the pass key?",
            mode="memory",
            restrict="none",
            max_tokens=12,
            trace_blocks=4,
            system=None,
        )
        assert KEY in ans.text, ans.text  # the model read the key from the knowledge base's memory
        top = ans.trace[0]  # the block that drew the most attention is the one holding the key
        assert KEY in top.passage
        assert KEY in text[top.char_start - 20 : top.char_end + 20]
        # the block straddles two chunks; the chunk holding the key is among the citations
        assert any(KEY in text[c.char_start : c.char_end] for c in ans.citations)
