"""Names that look like numbers to ``str.isdigit`` but are not ids: found by name, never a crash."""

from __future__ import annotations

import pytest

from memllm_storage import NotFoundError
from memllm_storage.repositories import parse_id


def test_parse_id_takes_only_short_ascii_numbers():
    assert parse_id("42") == 42 and parse_id("0") == 0
    for text in ("²", "٣", "4²", "", " 7", "-3", "1e3", "9" * 19, "9" * 5000):
        assert parse_id(text) is None, text


async def test_unicode_digit_and_huge_names_are_names(svc):
    kb = await svc.create_kb("²")
    assert (await svc.get_kb("²")).id == kb.id
    result = await svc.ingest_text("²", "²", "A short note about the lighthouse keeper of Varnholm.")
    assert result.status == "ready"
    assert (await svc.get_document("²", "²")).id == result.document_id
    again = await svc.ingest_text("²", "²", "A second version of the note about the keeper of Varnholm.")
    assert again.status == "ready" and again.document_id == result.document_id
    with pytest.raises(NotFoundError):
        await svc.get_kb("9" * 5000)
    with pytest.raises(NotFoundError):
        await svc.get_document("²", "9" * 5000)
