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
