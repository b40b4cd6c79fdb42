"""The engine: token ids in, token ids out. No text, no HTTP, no storage.

An :class:`Engine` owns the loaded model. Each stream of tokens has its own attention state
(``new_state``), into which the engine reads prompts in chunks (``prefill``) and from which it
generates (``generate``). Memory is passed in as a view over sources; the engine never owns it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import torch

from memllm.attention import AUTO_HEADS, READ_AHEAD, READ_LAST, READ_QUESTION, VOTE_HEADS, StreamingAttention
from memllm.loading import RETRIEVAL_HEADS, LoadedModel
from memllm.memory.source import InMemorySource, MemorySource, MemoryView, WritableMemorySource
from memllm.sampling import SamplingParams
from memllm.serving.jobs import GenerateJob, Token, run_job
from memllm.settings import MemorySettings
from memllm.textstream import TextStream

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
        if mem.question_heads == AUTO_HEADS:  # this model's calibrated heads, or the rank vote
            mem = dataclasses.replace(mem, question_heads=RETRIEVAL_HEADS.get(self.loaded.name, VOTE_HEADS))
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
    def prefill(
        self, state: StreamingAttention, ids: Sequence[int], progress: ProgressFn | None = None
    ) -> torch.Tensor:
        """Read ``ids`` into the state in chunks; returns the logits (V,) after the last token."""
        last = None
        for n, logits in self.prefill_steps(state, ids):
            last = logits
            if progress is not None:
                progress(n)
        assert last is not None
        return last

    @torch.inference_mode()
    def prefill_steps(self, state: StreamingAttention, ids: Sequence[int]) -> Iterator[tuple[int, torch.Tensor]]:
        """Read ``ids`` one forward (``prefill_end``) per step: yields (tokens read, logits (V,) after
        the last of them). The state is consistent between steps, so a caller may do other model
        work (other streams) between them; the last step's logits are the prompt's."""
        if not ids:
            raise ValueError("nothing to read: the prompt is empty")
        start = 0
        while start < len(ids):
            end = self.prefill_end(state, start, len(ids))
            state.reading = self.reading_part(state, start, end, len(ids))
            piece = torch.tensor([list(ids[start:end])], dtype=torch.long)
            yield piece.shape[1], state.forward(self.model, piece, last_only=True)[0, -1]
            start = end

    @staticmethod
    def prefill_chunk(state: StreamingAttention) -> int:
        """Tokens per prefill forward: memory/window modes search and evict per chunk; full attention
        has nothing to do between chunks, so it reads up to 4096 tokens at once (fewer, larger products)."""
        return max(state.mem.chunk, 4096) if state.mode == "full" else state.mem.chunk

    @classmethod
    def prefill_end(cls, state: StreamingAttention, read: int, total: int) -> int:
        """Where the next prefill forward of a ``total``-token prompt, ``read`` tokens in, ends.

        ``prefill_chunk`` tokens at a time, except that in memory mode a prompt longer than one
        chunk reads its last ``final_chunk`` tokens in a forward of their own: a chunk searches
        memory with the mean of its queries (InfLLM), and the question at the end of a long prompt
        would otherwise search with the mean of the context before it. A short prompt (a chat turn)
        stays one forward.
        """
        end = min(read + cls.prefill_chunk(state), total)
        question = cls._question_start(state, total)
        return question if question is not None and read < question < end else end

    @classmethod
    def reading_part(cls, state: StreamingAttention, read: int, end: int, total: int) -> str:
        """What the forward reading tokens [read, end) of a ``total``-token prompt is to memory search
        (the reader sets it as ``state.reading``): the final tokens that ``prefill_end`` split off
        (READ_QUESTION), a chunk that more of the prompt follows (READ_AHEAD), or the prompt's last."""
        if cls.is_question(state, read, total):
            return READ_QUESTION
        return READ_AHEAD if end < total else READ_LAST

    @classmethod
    def is_question(cls, state: StreamingAttention, read: int, total: int) -> bool:
        """Whether the forward from ``read`` on reads the final tokens that ``prefill_end`` split off."""
        return read == cls._question_start(state, total)

    @classmethod
    def _question_start(cls, state: StreamingAttention, total: int) -> int | None:
        """Where the final forward of a ``total``-token prompt starts, or None when it is not split."""
        final = state.mem.final_chunk
        if state.mode == "memory" and 0 < final < total and total > cls.prefill_chunk(state):
            return total - final
        return None

    @torch.inference_mode()
    def logits_of(
        self, state: StreamingAttention, ids: Sequence[int], progress: ProgressFn | None = None
    ) -> torch.Tensor:
        """Read ``ids`` and return all their logits (T, V) float32 (for perplexity)."""
        out = []
        chunk = state.mem.chunk
        for start in range(0, len(ids), chunk):
            piece = torch.tensor([list(ids[start : start + chunk])], dtype=torch.long)
            state.reading = READ_AHEAD if start + chunk < len(ids) else READ_LAST
            out.append(state.forward(self.model, piece)[0])
            if progress is not None:
                progress(piece.shape[1])
        return torch.cat(out)

    # ---------------------------------------------------------------------------- generation
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
        whole exchange and a conversation can continue from it. Sets ``state.finish_reason``
        ("stop" | "length"); it stays None if the consumer stops early (the last token is unread).
        The logic is :meth:`generation_job`'s, driven on this thread by ``run_job``.
        """
        job = self.generation_job(params, prompt_ids)
        for event in run_job(self, state, job, prompt_ids, logits):
            if isinstance(event, Token):
                yield event.id

    def generation_job(
        self, params: SamplingParams, prompt_ids: Sequence[int] = (), stream: TextStream | None = None
    ) -> GenerateJob:
        """The plain generation job (see memllm/serving/jobs.py): sample until one of the model's
        stop ids (read back, not output) or ``max_tokens``; with ``stream``, also Text events and
        its stop strings."""
        return GenerateJob(params, self.stop_ids, prompt_ids, stream=stream)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat_ids(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation in the model's chat template."""
        text = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=False
        )
        return self.encode(text)
