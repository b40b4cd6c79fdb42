"""Turning files and raw text into clean document text (txt, md, html, pdf, json/jsonl).

``parse_bytes(data, name)`` returns a :class:`ParsedDocument` or raises :class:`BadDocumentError`
with a one-line reason (binary, empty, undecodable, too large, unsupported, broken PDF). Nothing
here touches the database or the model.
"""

from __future__ import annotations

import contextlib
import html
import html.parser
import io
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_BYTES = 50 * 1024 * 1024  # refuse files larger than this (the CLI can change it)

MEDIA_TYPES = {
    ".txt": "text/plain",
    ".text": "text/plain",
    ".rst": "text/plain",
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".html": "text/html",
    ".htm": "text/html",
    ".pdf": "application/pdf",
    ".json": "application/json",
    ".jsonl": "application/jsonl",
    ".ndjson": "application/jsonl",
}
SUPPORTED_SUFFIXES = tuple(MEDIA_TYPES)
# JSON fields read as the document text, in order of preference (the rest become metadata).
TEXT_FIELDS = ("text", "content", "body", "abstract", "input", "document", "page_content")


class BadDocumentError(ValueError):
    """A document that cannot be ingested; the message says why (shown to the user as is)."""


@dataclass
class ParsedDocument:
    text: str
    media_type: str
    meta: dict[str, Any] = field(default_factory=dict)


def media_type_for(name: str) -> str:
    return MEDIA_TYPES.get(Path(name).suffix.lower(), "text/plain")


def clean_text(text: str) -> str:
    """Normalise unicode (NFC), line endings, stray control characters and runs of blank space;
    paragraphs (blank-line separated) are kept."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\u00a0", " ").replace("\ufeff", "")
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _looks_like_text(text: str) -> bool:
    """Mostly letters, digits, whitespace and ordinary punctuation (a decoder that accepts any
    byte turns binary into printable noise: box drawing, symbols, control characters)."""
    if not text:
        return False
    ok = sum(ch.isalnum() or ch.isspace() or ch in ".,;:!?'\"()-[]/%&*+=<>#@$_" for ch in text)
    return ok / len(text) >= 0.85


def _decode(data: bytes, name: str) -> str:
    """UTF-8 (or UTF-16 with a BOM); else Windows-1252 (covers Latin-1 text); else the encoding
    charset-normalizer finds; refused unless the result looks like text."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            pass
    if b"\x00" in data[:8192]:
        raise BadDocumentError(f"{name}: binary file (NUL bytes), not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    candidates = []
    with contextlib.suppress(UnicodeDecodeError):
        candidates.append(data.decode("cp1252"))
    try:
        from charset_normalizer import from_bytes

        best = from_bytes(data).best()
        if best is not None and best.encoding:
            candidates.append(str(best))
    except ImportError:  # pragma: no cover - charset-normalizer ships with requests/transformers
        pass
    for text in candidates:
        if _looks_like_text(text):
            return text
    raise BadDocumentError(f"{name}: cannot decode the text (not UTF-8 or a known encoding; binary?)")


class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page: block elements become paragraph breaks; scripts are dropped."""

    BLOCKS = frozenset(
        [
            "p",
            "div",
            "section",
            "article",
            "header",
            "footer",
            "li",
            "ul",
            "ol",
            "table",
            "tr",
            "h1",
            "h2",
            "h3",
            "h4",
            "h5",
            "h6",
            "br",
            "hr",
            "pre",
            "blockquote",
            "dd",
            "dt",
            "dl",
            "figure",
            "figcaption",
            "main",
            "nav",
            "aside",
            "title",
        ]
    )
    SKIP = frozenset({"script", "style", "noscript", "template", "svg", "head"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title = ""
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "title":
            self._in_title = True
        elif tag in self.SKIP:
            self._skip += 1
        if tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in self.SKIP and self._skip:
            self._skip -= 1
        if tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
            return
        if not self._skip:
            self.parts.append(re.sub(r"\s+", " ", data))


def html_to_text(source: str) -> tuple[str, str]:
    """(text, title) of an HTML document."""
    p = _HTMLText()
    p.feed(source)
    p.close()
    text = "".join(p.parts)
    text = "\n\n".join(line.strip() for line in re.split(r"\n\s*\n", text) if line.strip())
    return html.unescape(text), p.title.strip()


def markdown_to_text(source: str) -> str:
    """Markdown kept mostly as is (the model reads it well); drops images, link targets and HTML
    comments, and code-fence markers."""
    text = re.sub(r"<!--.*?-->", "", source, flags=re.S)
    text = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"^```.*$", "", text, flags=re.M)
    return text


def pdf_to_text(data: bytes, name: str) -> tuple[str, dict[str, Any]]:
    try:
        from pypdf import PdfReader
    except ImportError as exc:
        raise BadDocumentError(f"{name}: PDF support needs the pdf extra (pip install 'memllm[pdf]')") from exc
    try:
        reader = PdfReader(io.BytesIO(data))
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as exc:  # pypdf raises many types for broken files
        raise BadDocumentError(f"{name}: unreadable PDF ({type(exc).__name__}: {exc})") from exc
    return "\n\n".join(p.strip() for p in pages if p.strip()), {"pages": len(pages)}


def _record_text(obj: Any, text_field: str | None) -> tuple[str, dict[str, Any]]:
    if isinstance(obj, str):
        return obj, {}
    if not isinstance(obj, dict):
        raise BadDocumentError("JSON record is neither an object nor a string")
    fields = (text_field,) if text_field else TEXT_FIELDS
    for f in fields:
        value = obj.get(f)
        if isinstance(value, str) and value.strip():
            meta = {k: v for k, v in obj.items() if k != f and isinstance(v, (str, int, float, bool))}
            if isinstance(obj.get("title"), str) and obj["title"].strip() and f != "title":
                return f"{obj['title'].strip()}\n\n{value}", meta
            return value, meta
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return "\n\n".join(value), {k: v for k, v in obj.items() if k != f and isinstance(v, (str, int))}
    raise BadDocumentError(f"JSON record has no text field (looked for {', '.join(fields)})")


def json_records(data: str, name: str, lines: bool, text_field: str | None = None) -> list[ParsedDocument]:
    """Each record of a JSON array / object / JSON-lines file as one document."""
    try:
        if lines:
            objs = [json.loads(line) for line in data.splitlines() if line.strip()]
        else:
            loaded = json.loads(data)
            objs = loaded if isinstance(loaded, list) else [loaded]
    except json.JSONDecodeError as exc:
        raise BadDocumentError(f"{name}: invalid JSON ({exc})") from exc
    out = []
    for i, obj in enumerate(objs):
        text, meta = _record_text(obj, text_field)
        text = clean_text(text)
        if text:
            out.append(ParsedDocument(text, "text/plain", {**meta, "record": i}))
    return out


def parse_bytes(
    data: bytes, name: str, *, max_bytes: int = MAX_BYTES, text_field: str | None = None
) -> list[ParsedDocument]:
    """Parse a file's bytes into documents (one, or one per record of a JSON array / JSON lines).

    Raises :class:`BadDocumentError` for binary, empty, undecodable, too large or broken files.
    """
    if len(data) > max_bytes:
        raise BadDocumentError(f"{name}: too large ({len(data):,} bytes > limit {max_bytes:,})")
    if not data.strip():
        raise BadDocumentError(f"{name}: empty file")
    suffix = Path(name).suffix.lower()
    media = media_type_for(name)
    if suffix == ".pdf":
        text, meta = pdf_to_text(data, name)
        docs = [ParsedDocument(clean_text(text), media, meta)]
    else:
        raw = _decode(data, name)
        if suffix in (".json", ".jsonl", ".ndjson"):
            docs = json_records(raw, name, lines=suffix != ".json", text_field=text_field)
            if not docs:
                raise BadDocumentError(f"{name}: no text in any JSON record")
            return docs
        meta: dict[str, Any] = {}
        if suffix in (".html", ".htm"):
            text, title = html_to_text(raw)
            if title:
                meta["title"] = title
        elif suffix in (".md", ".markdown"):
            text = markdown_to_text(raw)
        else:
            text = raw
        docs = [ParsedDocument(clean_text(text), media, meta)]
    if not docs[0].text:
        raise BadDocumentError(f"{name}: no text after parsing")
    return docs


def parse_file(path: Path | str, *, max_bytes: int = MAX_BYTES, text_field: str | None = None) -> list[ParsedDocument]:
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BadDocumentError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if size > max_bytes:
        raise BadDocumentError(f"{path.name}: too large ({size:,} bytes > limit {max_bytes:,})")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadDocumentError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return parse_bytes(data, path.name, max_bytes=max_bytes, text_field=text_field)
