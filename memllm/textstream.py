"""Turning a stream of token ids into a stream of text, with stop strings.

``TextStream.push(id)`` returns the text that became final with that token: incomplete UTF-8
sequences and any tail that could still start a stop string are held back until resolved.
"""

from __future__ import annotations

from collections.abc import Sequence


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # decoded text of all ids so far (complete characters only)
        self.emitted = 0  # characters of self.text already returned
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; returns newly final text ('' if none). Sets ``stopped`` on a stop string."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        decoded = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if decoded.endswith("\ufffd"):
            return ""  # wait for the rest of a multi-byte character
        self.text = decoded
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                self.stopped = True
                self.text = self.text[:at]
                return self._emit(len(self.text))
        return self._emit(len(self.text) - self._held_back())

    def finish(self) -> str:
        """End of stream: release whatever was held back."""
        return self._emit(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return hold

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out
