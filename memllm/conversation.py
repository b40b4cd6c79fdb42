"""A multi-turn conversation read incrementally into one attention state.

Each turn feeds only what is new in the chat template (the state already holds the earlier turns,
in its window or its memory), so a turn's cost does not grow with the history.
"""

from __future__ import annotations

from collections.abc import Iterator

from memllm.attention import StreamingAttention
from memllm.engine import Engine
from memllm.sampling import SamplingParams
from memllm.textstream import TextStream


END_OF_TURN = "<|im_end|>"


class Conversation:
    def __init__(self, engine: Engine, state: StreamingAttention, system: str | None = None) -> None:
        self.engine = engine
        self.state = state
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.fed_text = ""  # template text already read into the state

    def _delta(self) -> str:
        full = self.engine.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=False)
        if not full.startswith(self.fed_text):
            raise RuntimeError("the chat template is not prefix-stable for this model; cannot continue incrementally")
        return full[len(self.fed_text) :]

    def reply(self, user: str, params: SamplingParams) -> Iterator[str]:
        """Add a user turn and stream the assistant's answer as text pieces."""
        self.messages.append({"role": "user", "content": user})
        delta = self._delta()
        stream = TextStream(self.engine.tokenizer, params.stop)
        ids = self.engine.encode(delta)
        tokens: list[int] = []
        for token in self.engine.generate(self.state, ids, params):
            tokens.append(token)
            piece = stream.push(token)
            if piece:
                yield piece
            if stream.stopped:
                break
        tail = stream.finish()
        if tail:
            yield tail
        if self.state.finish_reason != "stop":
            # the model did not close its turn: read the unread last token (if the stream was cut
            # short) and the end-of-turn marker, so the state holds exactly the template text
            unread = tokens[-1:] if self.state.finish_reason is None else []
            self.engine.prefill(self.state, unread + self.engine.encode(END_OF_TURN))
        answer = self.engine.tokenizer.decode(tokens, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": stream.text})
        self.fed_text += delta + answer + END_OF_TURN
