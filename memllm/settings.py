"""Settings read once from ``MEMLLM_*`` environment variables.

``get_settings()`` builds a :class:`Settings` from the environment on first call and returns the
same object afterwards; code receives settings as arguments where it can (tests build their own).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

ENV_PREFIX = "MEMLLM_"


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "memllm"


@dataclass(frozen=True)
class MemorySettings:
    """How attention reaches past the local window (see memllm/memory)."""

    mode: str = "memory"  # memory | window | full | memorizing
    sinks: int = 64  # first tokens always attended (StreamingLLM "attention sinks")
    window: int = 2048  # most recent tokens attended at their true relative positions
    chunk: int = 512  # tokens per prefill chunk (one kNN search per chunk and layer)
    block_size: int = 128  # tokens per memory block
    representatives: int = 4  # representative keys per block, indexed by FAISS
    # which tokens' keys represent a block: mass (InfLLM), distinct, mass+distinct (memllm/memory/retrieval.py)
    representative_choice: str = "mass"
    mass_stride: int = 8  # representatives ranked by the attention of every Nth chunk query (1 = all)
    # blocks retrieved per search (a prompt's last forward, decoding; chunks read ahead are capped
    # by reading_top_k; chat sessions change it: Settings.chat_memory). Before the question read on its own,
    # 16 missed the needle at 16K: docs/RESULTS.md
    top_k: int = 32
    layer_top_k: str = ""  # per-layer overrides of top_k, "LAYERS:K,...", e.g. "11-29:8" (docs/RESULTS.md)
    # at most this many blocks per layer for a chunk of a prompt that goes on after it (reading a long
    # input; InfLLM's 16): the prompt's last forward, chat turns and decoding keep top_k. 0 = top_k
    reading_top_k: int = 16
    # blocks retrieved per layer while a knowledge-base document is read for ingestion: 0 = a window read
    # (its blocks attend to the window and sinks only; docs/RESULTS.md: ~2x faster, same answers), -1 = the
    # reading settings above (top_k, layer_top_k, reading_top_k)
    ingest_top_k: int = 0
    layers: str = "all"  # layers that use memory: "all" or a comma list / ranges "0-29"
    memory_distance: int = 4096  # every memory key is seen at this relative distance (docs/RESULTS.md)
    # fixed: every memory key at memory_distance (InfLLM); ordered: a block's tokens keep their order and
    # spacing, the block's last token at memory_distance and its first block_size - 1 tokens farther
    memory_positions: str = "fixed"
    # added to every memory key's logit while input is read (< 0: memory must score higher to draw
    # attention); -0.5 brings the 64K book perplexity to the window's and keeps the passkey, -1 loses one
    # (docs/RESULTS.md)
    memory_bias: float = -0.5
    # the same, while answering: in the question's forward (READ_QUESTION) and every one-token step
    # (decoding). With the retrieval heads, 0 recalls the essay passkey at 32K in 36 of 50 trials where
    # the read's -0.5 recalls 28 (docs/RESULTS.md, 2026-12-05/c47aad7); perplexity only reads, so keeps -0.5
    answer_memory_bias: float = 0.0
    # the answer's bias instead where the question's retrieval heads (``question_heads``) score their best
    # memory block above their best local one (sinks + window, cut as memory is): the answer then reads
    # memory louder. Where they match best locally, answer_memory_bias stays (+1 everywhere took the
    # attention from needles in the window or the sinks: docs/RESULTS.md, 2026-12-05/1406098). 2 recalls the
    # 32K essay passkey in 41 of 50 trials against 34 at 0, the oracle 43 (2026-12-05/c4bfe48)
    recalled_memory_bias: float = 2.0
    # where the heads match best locally instead, the answer reads their best local block (sinks + window
    # cut as memory is) at this logit bias, the other local keys at 0 (>= 0; 0 = off). 1 recalls the 32K
    # essay passkey in 43 of 50 trials against 41 at 0, both wins with the needle in the window; 2 the same,
    # 3 loses one of them (docs/RESULTS.md, 2026-12-05/afd2dfa)
    recalled_local_bias: float = 1.0
    # and the heads' best memory block, wherever they matched best, this much above the rest of memory (>= 0;
    # 0 = off). 2 recalls the 32K essay passkey in 47 of 50 trials against 43 at 0; the best memory block was
    # the needle where the sinks' block outscored it locally (docs/RESULTS.md, 2026-12-05/afd2dfa)
    recalled_block_bias: float = 2.0
    # consecutive memory layers that share one kNN search in a forward read as a whole (a chat turn, the
    # last or only chunk of a prompt, decoding; not a question's per-head search nor its vote): the first
    # of each group searches, the others attend to the blocks it chose (their own keys and values of
    # them). Saves the other layers' searches, whose cost grows with memory. 1 = every layer searches
    search_group: int = 1
    decode_search_every: int = 16  # re-search memory every N decode steps
    asking_tokens: int = 16  # per-head retrieval: the last N tokens of a chunk search memory
    # a prompt longer than one chunk reads its last N tokens in a forward of their own, so that they
    # search memory for themselves: the question, not the mean of ~500 tokens of context before it
    # (the 16K passkey miss at depth 0.75 from 2026-11-29/18bb2f5 to 2026-11-30/9822a59 was this;
    # docs/RESULTS.md, 2026-11-30/8b37903). 0 = off
    final_chunk: int = 16
    # how those final tokens (the question) search memory: a retrieval strategy (mean, last, mean+last,
    # heads; memllm/memory/retrieval.py), "" = as every other chunk (``Settings.retrieval``), and how many
    # blocks they retrieve per memory layer (0 = top_k; 16 queries, so a wide search costs little). heads
    # and 64 recalled the three passkey misses at 32K and 64K that the chunk mean and top_k missed
    # (docs/RESULTS.md, 2026-11-30/5a0d270)
    final_retrieval: str = "heads"
    final_top_k: int = 64
    # the question's forward runs twice: the first pass only votes (each memory layer's ranked blocks give
    # block b 1/(1+rank)), and in the second every memory layer also attends to the N most voted blocks.
    # Layers that cannot tell the needle from filler (3-9 at 128K) then see the block the discriminating
    # layers found: 4, 8 and 16 recalled the 128K passkey miss (docs/RESULTS.md, 2026-12-01/866a07e).
    # 0 = one pass
    final_consensus: int = 8
    # retrieval heads ("LAYER:HEAD,...", ``memllm bench retrieval-heads``) that choose those N blocks instead
    # of the rank vote: each candidate (a block some memory layer's vote pass found) scores, per head, its
    # best z-scored logit over the question's asking tokens and every token of the block, summed over the
    # heads. "auto" = the loaded model's calibrated heads (``memllm.loading.RETRIEVAL_HEADS``), or the rank
    # vote for a model without them; "vote" (or "") = the rank vote. At 32K with essays auto recalls 36 of
    # 50 trials where the vote recalls 18 (docs/RESULTS.md, 2026-12-05/c47aad7)
    question_heads: str = "auto"
    ivf_threshold: int = 200_000  # vectors per index above which an IVF index is built
    payload_dtype: str = "float16"  # float16 | int8
    memorizing_layers: str = "8,16"  # layers with token-level kNN in the memorizing mode
    memorizing_top_k: int = 32  # tokens retrieved per query token in the memorizing mode


CHAT_MEMORY = "top_k=8,search_group=5"


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(default_factory=_default_data_dir)
    model: str = "smollm2-135m-instruct"  # bundled name, or a path to a local HF folder
    dtype: str = "auto"  # auto | float32 | bfloat16 (auto: bfloat16 only where the CPU has native bf16 math)
    threads: int = 0  # 0 = torch's default
    database_url: str = ""  # default: SQLite file in data_dir
    eval_data: Path = Path("../shared/data")
    log_level: str = "WARNING"
    retrieval: str = "mean"  # how a chunk searches memory (memllm/memory/retrieval.py)
    chat_max_live: int = 4  # chat sessions whose live state (sinks + window) stays in memory
    chat_spill: int = 8  # live states kept on disk when they leave memory (memllm/chat/spill.py); 0 = none
    # memory settings that chat sessions change, "FIELD=VALUE,..." ("none": the engine's as they are): a
    # turn's first token attends over fewer retrieved blocks, and consecutive layers share a search
    # (docs/RESULTS.md, 2026-12-07/fd97283: time to first token and LoCoMo)
    chat_memory: str = CHAT_MEMORY
    memory: MemorySettings = field(default_factory=MemorySettings)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'memllm.db'}"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        """Build settings from ``MEMLLM_<FIELD>`` and ``MEMLLM_MEMORY_<FIELD>`` variables."""
        env = os.environ if environ is None else environ
        top = _fields_from_env(cls, env, ENV_PREFIX, skip={"memory"})
        memory = MemorySettings(**_fields_from_env(MemorySettings, env, ENV_PREFIX + "MEMORY_"))
        return cls(memory=memory, **top)

    def with_memory(self, **changes: object) -> Settings:
        return dataclasses.replace(self, memory=dataclasses.replace(self.memory, **changes))


def _fields_from_env(cls: type, env: dict[str, str] | os._Environ, prefix: str, skip=frozenset()) -> dict:
    values: dict[str, object] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        raw = env.get(prefix + f.name.upper())
        if raw is None or raw == "":
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        try:
            if isinstance(default, bool):
                values[f.name] = raw.lower() in {"1", "true", "yes", "on"}
            elif isinstance(default, int):
                values[f.name] = int(raw)
            elif isinstance(default, float):
                values[f.name] = float(raw)
            elif isinstance(default, Path):
                values[f.name] = Path(raw).expanduser()
            else:
                values[f.name] = raw
        except ValueError as exc:
            raise ValueError(f"{prefix}{f.name.upper()}={raw!r} is not a valid {type(default).__name__}") from exc
    return values


def parse_memory_changes(spec: str) -> dict[str, object]:
    """ "top_k=64,final_retrieval=heads" -> {"top_k": 64, "final_retrieval": "heads"}: ``MemorySettings``
    fields, each value read as its ``MEMLLM_MEMORY_*`` variable would be. A part without ``=`` goes on
    the value before it, for settings that are lists themselves: "question_heads=18:7,21:8,top_k=64"."""
    raw: dict[str, str] = {}
    names = {f.name for f in dataclasses.fields(MemorySettings)}
    last = None
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep and last is not None:
            raw[last] += "," + part
            continue
        if not sep or name not in names:
            raise ValueError(f"{part!r}: expected FIELD=VALUE with a memory setting, one of {sorted(names)}")
        last = ENV_PREFIX + "MEMORY_" + name.upper()
        raw[last] = value.strip()
    return _fields_from_env(MemorySettings, raw, ENV_PREFIX + "MEMORY_")


def memory_overrides(**given: object) -> dict[str, object]:
    """The ``MemorySettings`` changes among ``given`` (None = not given). A ``top_k`` given for one
    request or command applies to every layer and to every chunk: it replaces the per-layer
    ``layer_top_k`` and the reading cap ``reading_top_k``."""
    out = {k: v for k, v in given.items() if v is not None}
    if "top_k" in out:
        out.setdefault("layer_top_k", "")
        out.setdefault("reading_top_k", 0)
    return out


def ingest_overrides(mem: MemorySettings) -> dict[str, object]:
    """The ``MemorySettings`` changes for reading a document into a knowledge base (``ingest_top_k``)."""
    return memory_overrides(top_k=mem.ingest_top_k) if mem.ingest_top_k >= 0 else {}


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings.from_env()


def chat_memory_changes(settings: Settings) -> dict[str, object]:
    """The ``MemorySettings`` changes of chat sessions (``MEMLLM_CHAT_MEMORY``; ``none``: no change)."""
    if settings.chat_memory.strip().lower() == "none":
        return {}
    try:
        return parse_memory_changes(settings.chat_memory)
    except ValueError as exc:
        raise ValueError(f"MEMLLM_CHAT_MEMORY={settings.chat_memory!r}: {exc}") from exc
