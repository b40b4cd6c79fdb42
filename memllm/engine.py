"""The engine: token ids in, token ids out. No text, no HTTP, no storage.

An :class:`Engine` owns the loaded model. Each stream of tokens has its own attention state
(``new_state``), into which the engine reads prompts in chunks (``prefill``) and from which it
generates (``generate``). Memory is passed in as a view over sources; the engine never owns it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import torch

from memllm.attention import StreamingAttention
from memllm.loading import LoadedModel
from memllm.memory.source import InMemorySource, MemorySource, MemoryView, WritableMemorySource
from memllm.sampling import SamplingParams, sample
from memllm.settings import MemorySettings

ProgressFn = Callable[[int], None]


class Engine:
    def __init__(self, loaded: LoadedModel, memory: MemorySettings | None = None, retrieval: str = "mean") -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.memory_settings = memory or MemorySettings()
        self.retrieval = retrieval
        self.stop_ids = self._stop_ids()

    def _stop_ids(self) -> frozenset[int]:
        tok = self.tokenizer
        ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        for name in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"):
            i = tok.convert_tokens_to_ids(name)
            if isinstance(i, int) and i != tok.unk_token_id and i >= 0:
                ids.add(i)
        return frozenset(ids)

    # -------------------------------------------------------------------------------- states
    def new_state(
        self,
        mode: str | None = None,
        extra_sources: Sequence[MemorySource] = (),
        sink: WritableMemorySource | None = None,
        trace: bool = False,
        **overrides: object,
    ) -> StreamingAttention:
        """A fresh attention state. In memory mode, evicted blocks go to ``sink`` (default: a new
        in-memory source for this input) and retrieval reads the sink plus ``extra_sources``."""
        mem = dataclasses.replace(self.memory_settings, **overrides)
        if mode is not None:
            mem = dataclasses.replace(mem, mode=mode)
        memory: MemorySource | None = None
        if mem.mode == "memory":
            from memllm.attention import block_layout

            sink = sink if sink is not None else InMemorySource(block_layout(self.model.config, mem))
            memory = MemoryView([sink, *extra_sources]) if extra_sources else sink
        return StreamingAttention(
            self.model.config,
            self.loaded.rope,
            mem,
            dtype=self.model.dtype,
            memory=memory,
            sink=sink,
            retrieval=self.retrieval,
            trace=trace,
        )

    # ------------------------------------------------------------------------------- reading
    @torch.inference_mode()
    def prefill(
        self, state: StreamingAttention, ids: Sequence[int], progress: ProgressFn | None = None
    ) -> torch.Tensor:
        """Read ``ids`` into the state in chunks; returns the logits (V,) after the last token."""
        if not ids:
            raise ValueError("nothing to read: the prompt is empty")
        chunk = self.prefill_chunk(state)
        logits = None
        for start in range(0, len(ids), chunk):
            piece = torch.tensor([list(ids[start : start + chunk])], dtype=torch.long)
            logits = state.forward(self.model, piece, last_only=True)
            if progress is not None:
                progress(piece.shape[1])
        assert logits is not None
        return logits[0, -1]

    @staticmethod
    def prefill_chunk(state: StreamingAttention) -> int:
        """Tokens per prefill forward: memory/window modes search and evict per chunk; full attention
        has nothing to do between chunks, so it reads up to 4096 tokens at once (fewer, larger products)."""
        return max(state.mem.chunk, 4096) if state.mode == "full" else state.mem.chunk

    @torch.inference_mode()
    def logits_of(
        self, state: StreamingAttention, ids: Sequence[int], progress: ProgressFn | None = None
    ) -> torch.Tensor:
        """Read ``ids`` and return all their logits (T, V) float32 (for perplexity)."""
        out = []
        chunk = state.mem.chunk
        for start in range(0, len(ids), chunk):
            piece = torch.tensor([list(ids[start : start + chunk])], dtype=torch.long)
            out.append(state.forward(self.model, piece)[0])
            if progress is not None:
                progress(piece.shape[1])
        return torch.cat(out)

    # ---------------------------------------------------------------------------- generation
    @torch.inference_mode()
    def generate(
        self,
        state: StreamingAttention,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        logits: torch.Tensor | None = None,
    ) -> Iterator[int]:
        """Yield generated token ids one at a time (stop tokens are not yielded).

        Reads ``prompt_ids`` first (unless ``logits`` after an already-read prompt are given).
        The last generated token is read back into the state, so the state ends holding the
        whole exchange and a conversation can continue from it.
        """
        if logits is None:
            logits = self.prefill(state, prompt_ids)
        generator = params.generator()
        history = list(prompt_ids)
        state.finish_reason = None  # stays None if the consumer stops early (the last token is unread)
        for _ in range(params.max_tokens):
            token = sample(logits, params, history, generator)
            if token in self.stop_ids:
                state.forward(self.model, torch.tensor([[token]]), last_only=True)  # close the turn in memory
                state.finish_reason = "stop"
                return
            yield token
            history.append(token)
            logits = state.forward(self.model, torch.tensor([[token]]), last_only=True)[0, -1]
        state.finish_reason = "length"

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat_ids(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation in the model's chat template."""
        text = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=False
        )
        return self.encode(text)
