from __future__ import annotations

from memllm.textstream import TextStream


class CharTokenizer:
    """Token id = byte value; decode like a byte-level BPE (incomplete UTF-8 -> U+FFFD)."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def feed(stream: TextStream, text: str) -> str:
    out = ""
    for b in text.encode():
        out += stream.push(b)
        if stream.stopped:
            break
    return out + stream.finish()


def test_stream_reassembles_text_including_multibyte():
    assert feed(TextStream(CharTokenizer()), "héllo wörld ✓") == "héllo wörld ✓"


def test_stop_string_cuts_output_and_never_leaks_a_prefix():
    s = TextStream(CharTokenizer(), stop=["END"])
    pieces = []
    for b in b"abc EN":
        pieces.append(s.push(b))
    assert "".join(pieces) == "abc "  # "EN" held back: it may start "END"
    s.push(ord("D"))
    assert s.stopped and s.finish() == ""


def test_held_back_prefix_is_released_when_it_is_not_a_stop():
    s = TextStream(CharTokenizer(), stop=["END"])
    assert feed(s, "an ENgine") == "an ENgine" and not s.stopped


def test_fast_tokenizer_streams_incrementally_and_matches_a_whole_decode(real_model):
    """The bundled (fast) tokenizer goes through DecodeStream: same text as decoding all ids at once."""
    from memllm.textstream import _IncrementalDecoder

    tok = real_model.tokenizer
    first = "The whale, Ishmael said, was white. Naïve café — 日本語 🙂 and “quotes”."
    ids = [*tok.encode(first, add_special_tokens=False), tok.eos_token_id]  # a special token: no text
    ids += tok.encode("\n\nNext line.", add_special_tokens=False)
    stream = TextStream(tok, stop=["Next"])
    assert isinstance(stream._decoder, _IncrementalDecoder)
    out = ""
    for i in ids:
        out += stream.push(i)
        if stream.stopped:
            break
    out += stream.finish()
    assert stream.stopped
    whole = tok.decode(ids, skip_special_tokens=True)
    assert out == whole[: whole.index("Next")]
    assert "日本語 🙂" in out and "\ufffd" not in out
