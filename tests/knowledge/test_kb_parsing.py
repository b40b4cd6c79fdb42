"""Parsers (txt, md, html, pdf, json, jsonl) and the refusal of bad files."""

from __future__ import annotations

import json
import random

import pytest

from memllm.knowledge.parsing import BadDocumentError, clean_text, parse_bytes, parse_file

_rng = random.Random(1)
NOISE = bytes(_rng.randrange(128, 256) for _ in range(400))


def minimal_pdf(lines: list[str]) -> bytes:
    """A valid one-page PDF with the given text lines (Helvetica), xref offsets computed."""
    stream = "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({line}) Tj T*" for line in lines) + " ET"
    objs = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        "/Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = b"%PDF-1.4\n"
    offsets = []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def test_plain_text_is_cleaned():
    docs = parse_bytes(b"  Line one.\r\nLine\ttwo  \x07\n\n\n\nPara two.\n", "a.txt")
    assert docs[0].text == "Line one.\nLine\ttwo\n\nPara two."
    assert docs[0].media_type == "text/plain"


def test_markdown_drops_link_targets_and_images():
    md = "# Title\n\nSee [the docs](http://x.y/z) and ![a cat](cat.png).\n\n```py\ncode()\n```\n"
    text = parse_bytes(md.encode(), "r.md")[0].text
    assert "http" not in text and "cat.png" not in text
    assert "See the docs and a cat." in text and "# Title" in text and "code()" in text


def test_html_visible_text_only():
    page = (
        "<html><head><title>My Page</title><style>p{color:red}</style><script>var x=1;</script></head>"
        "<body><h1>Header</h1><p>First &amp; second.</p><div>Third<br>line</div></body></html>"
    )
    doc = parse_bytes(page.encode(), "p.html")[0]
    assert doc.meta["title"] == "My Page"
    assert doc.text.split("\n\n") == ["Header", "First & second.", "Third", "line"]
    assert "color" not in doc.text and "var x" not in doc.text


def test_pdf_text():
    doc = parse_bytes(minimal_pdf(["Hello PDF world.", "Second line here."]), "d.pdf")[0]
    assert "Hello PDF world." in doc.text and "Second line here." in doc.text
    assert doc.meta["pages"] == 1 and doc.media_type == "application/pdf"


def test_json_and_jsonl_records():
    arr = json.dumps([{"title": "T1", "text": "Body one.", "year": 2020}, {"content": "Body two."}])
    docs = parse_bytes(arr.encode(), "a.json")
    assert [d.text for d in docs] == ["T1\n\nBody one.", "Body two."]
    assert docs[0].meta == {"title": "T1", "year": 2020, "record": 0}
    lines = "\n".join(json.dumps({"abstract": ["S one.", "S two."], "id": i}) for i in range(3))
    docs = parse_bytes(lines.encode(), "b.jsonl")
    assert len(docs) == 3 and docs[1].text == "S one.\n\nS two." and docs[1].meta["id"] == 1
    docs = parse_bytes(json.dumps({"body": "x", "note": "Use me."}).encode(), "c.json", text_field="note")
    assert docs[0].text == "Use me."


@pytest.mark.parametrize(
    ("data", "name", "reason"),
    [
        (b"", "empty.txt", "empty"),
        (b"   \n\n  ", "blank.txt", "empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200), "image.txt", "binary"),
        (NOISE, "noise.txt", "decode"),
        (b"%PDF-1.4\nthis is not a pdf", "broken.pdf", "PDF"),
        (b"{not json", "bad.json", "invalid JSON"),
        (json.dumps([{"id": 1}]).encode(), "notext.json", "no text field"),
        (b"<html><script>only()</script></html>", "empty.html", "no text"),
    ],
)
def test_bad_files_are_refused_with_a_reason(data, name, reason):
    with pytest.raises(BadDocumentError, match=reason):
        parse_bytes(data, name)


def test_too_large(tmp_path):
    f = tmp_path / "big.txt"
    f.write_text("word " * 1000)
    with pytest.raises(BadDocumentError, match="too large"):
        parse_file(f, max_bytes=1000)
    assert parse_file(f, max_bytes=10_000)[0].text.startswith("word word")


def test_latin1_text_is_decoded(tmp_path):
    f = tmp_path / "old.txt"
    f.write_bytes("Café crème et déjà vu, à Noël. ".encode("latin-1") * 5)
    assert "Café crème" in parse_file(f)[0].text


def test_clean_text_keeps_paragraphs():
    assert clean_text("a\n\n\n\nb\u00a0c") == "a\n\nb c"
