"""Attention states: what each layer attends to, as the engine feeds tokens through the model.

One class serves the three modes, chosen by ``MemorySettings.mode``:

``full``    every past token at its true position (capped at the model's trained length).
``window``  StreamingLLM: ``sinks`` first tokens + the most recent ``window`` tokens; older tokens
            are dropped a block at a time.
``memorizing`` Memorizing-Transformers-style: like ``window``, plus token-level kNN at
            ``memorizing_layers`` (each query retrieves its own top-k past tokens).
``memory``  InfLLM-style: like ``window``, but dropped blocks go to a memory sink and every layer
            in ``layers`` also attends, in the same softmax, to the top-k blocks retrieved by kNN
            from a memory view (this input's evicted past, sessions, knowledge bases).

Positions. Local tokens live in compact slots: slot i is rotated at position i (sinks take slots
0..sinks-1, the local window follows), so every local distance stays below sinks+window+chunk.
Memory keys are stored before RoPE and left unrotated; queries attending to them are rotated at
``memory_distance``, so every memory key is seen at that one distance (inside the trained range).
With ``memory_positions="ordered"`` a retrieved block's keys are rotated at their offsets in the
block (0..bs-1) and the queries at ``memory_distance + bs - 1``: every block is seen at the same
place, its tokens in their own order and spacing (distances memory_distance .. + bs - 1).

Protocol per forward: ``begin(n)`` (evicts, fixes positions), the model calls ``attend`` once per
layer, ``end()`` commits. ``forward(model, tokens)`` does all three.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from memllm.memory.retrieval import (
    REPRESENTATIVE_CHOICES,
    STRATEGIES,
    choose_representatives,
    consensus_blocks,
    every_token_scores,
    group_sum_queries,
    key_statistics,
    parse_heads,
    per_head_rows,
    search_vectors,
    sum_head_scores,
    zscores,
)
from memllm.memory.source import MemorySource, WritableMemorySource, stable_ids
from memllm.memory.token_memory import TokenMemory
from memllm.memory.types import BlockLayout, MemoryBlock
from memllm.model import ModelConfig, Transformer
from memllm.rope import Rope
from memllm.settings import MemorySettings
from memllm_kernels.grouped import (
    causal_attention_with_lse,
    causal_attention_with_sampled_mass,
    causal_key_mass,
    decode_attention_with_lse,
    grouped_attention_with_lse,
    key_mass_from_lse,
    keys_attention_with_lse,
    sampled_queries,
)
from memllm_kernels.reference import merge_attention

MODES = ("full", "window", "memory", "memorizing")
AUTO_HEADS = "auto"  # ``question_heads``: the loaded model's calibrated heads (``Engine.new_state``)
VOTE_HEADS = "vote"  # ``question_heads``: no heads, the rank vote chooses the question's blocks
NAMED_HEADS = ("", AUTO_HEADS, VOTE_HEADS)  # ``question_heads`` values that are not a LAYER:HEAD list
MEMORY_POSITIONS = ("fixed", "ordered")

# What a forward of several tokens is to memory search; the reader sets ``StreamingAttention.reading``
# before it (``Engine.reading_part``), and ``end`` resets it to READ_LAST.
READ_AHEAD = "ahead"  # a chunk of a prompt that goes on after it: at most ``reading_top_k`` blocks
READ_QUESTION = "question"  # a long prompt's final tokens: ``final_retrieval``, ``final_top_k``, the vote
READ_LAST = "last"  # a prompt's last (or only) forward, and every decode step: ``top_k`` blocks


class ContextLengthError(ValueError):
    """The input does not fit the chosen attention mode (full attention past the trained length)."""


def parse_layers(spec: str, n_layers: int) -> tuple[int, ...]:
    """ "all" | "0-9,12,20-29" -> sorted tuple of layer indices."""
    if spec.strip() in ("", "all"):
        return tuple(range(n_layers))
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    bad = [i for i in out if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"memory layers {bad} outside 0..{n_layers - 1}")
    return tuple(sorted(out))


def parse_layer_top_k(spec: str, default: int, n_layers: int) -> tuple[int, ...]:
    """ "11-29:8,0:16" -> blocks retrieved per search at each layer (``default`` where not named)."""
    top_k = [default] * n_layers
    for part in filter(None, (p.strip() for p in spec.split(","))):
        layers, sep, k = part.partition(":")
        if not sep or not k.strip().isdigit():
            raise ValueError(f"layer top-k {part!r}: expected LAYERS:K, e.g. 11-29:8")
        for layer in parse_layers(layers, n_layers):
            top_k[layer] = int(k)
    return tuple(top_k)


def block_layout(cfg: ModelConfig, mem: MemorySettings) -> BlockLayout:
    return BlockLayout(
        layers=parse_layers(mem.layers, cfg.n_layers),
        n_kv_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        block_size=mem.block_size,
        representatives=mem.representatives,
    )


def check_memory_settings(mem: MemorySettings, retrieval: str = "mean") -> None:
    """Raise ValueError for settings no attention state can run with (before any work is done)."""
    if mem.mode not in MODES:
        raise ValueError(f"unknown attention mode {mem.mode!r}; choose one of {MODES}")
    if mem.memory_positions not in MEMORY_POSITIONS:
        raise ValueError(f"unknown memory_positions {mem.memory_positions!r}; choose one of {MEMORY_POSITIONS}")
    if mem.representative_choice not in REPRESENTATIVE_CHOICES:
        raise ValueError(
            f"unknown representative_choice {mem.representative_choice!r}; choose one of {REPRESENTATIVE_CHOICES}"
        )
    for name, strategy in (("retrieval", retrieval), ("final_retrieval", mem.final_retrieval or retrieval)):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown {name} strategy {strategy!r}; choose one of {STRATEGIES}")
    if mem.mode != "full" and mem.window % mem.block_size:
        raise ValueError(f"window ({mem.window}) must be a multiple of block_size ({mem.block_size})")
    parse_layer_top_k(mem.layer_top_k, mem.top_k, 1 << 16)
    if mem.reading_top_k < 0:
        raise ValueError(f"reading_top_k ({mem.reading_top_k}) must be >= 0 (0: chunks read ahead retrieve top_k)")
    for name in ("recalled_local_bias", "recalled_block_bias"):
        if getattr(mem, name) < 0:
            raise ValueError(f"{name} ({getattr(mem, name)}) must be >= 0 (0: off)")
    if mem.search_group < 1:
        raise ValueError(f"search_group ({mem.search_group}) must be >= 1 (1: every memory layer searches)")
    if mem.final_consensus < 0:
        raise ValueError(f"final_consensus ({mem.final_consensus}) must be >= 0 (0: the question reads in one pass)")
    if mem.question_heads not in NAMED_HEADS:
        parse_heads(mem.question_heads)


class KVBuffer:
    """Sinks + local tokens of every layer, in compact slots that grow on demand.

    raw, rot, val: (L, B, Hkv, capacity, D) model dtype (keys before RoPE, keys rotated at their
    slot position, values); mass: (L, B, Hkv, capacity) float32 attention each key has drawn.
    Slots [0, length) are valid.

    The key mass of a forward of several tokens may be owed (``owe_mass``): only the rows it is
    computed from are kept, and it is added the first time ``mass`` is read, or at ``settle_mass``.
    It only ranks a block's keys when the block leaves the window, so a chat turn's first token
    need not wait for it.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self.shape = (n_layers, batch, n_kv_heads, 0, head_dim)
        self.raw = torch.empty(self.shape, dtype=dtype)
        self.rot = torch.empty(self.shape, dtype=dtype)
        self.val = torch.empty(self.shape, dtype=dtype)
        self._mass = torch.zeros(self.shape[:4], dtype=torch.float32)
        self._owed: list[_OwedMass] = []
        self.length = 0
        self.version = 0  # bumped whenever slots below ``length`` change (eviction shifts them)

    @property
    def mass(self) -> torch.Tensor:
        self.settle_mass()
        return self._mass

    @mass.setter
    def mass(self, value: torch.Tensor) -> None:
        self._owed = []
        self._mass = value

    def owe_mass(
        self, layer: int, q: torch.Tensor, lse: torch.Tensor, positions: torch.Tensor, weight: float, scale: float
    ) -> None:
        """Key mass of one layer's forward, added later: ``weight`` times the attention that the
        sampled queries q (B, Hq, S, D), rotated, with their rows' log-sum-exp lse (B, Hq, S) at
        logit scale ``scale``, drew from the keys at slots [0, position] (slot ``positions[i]`` (S,)
        is query i's own)."""
        self._owed.append(_OwedMass(layer, q, lse, positions, weight, scale))

    @torch.inference_mode()
    def settle_mass(self) -> None:
        """Add every owed key mass (see ``owe_mass``) while the slots are still where it was owed."""
        owed, self._owed = self._owed, []
        for o in owed:
            end = int(o.positions.max()) + 1
            mass = causal_key_mass(o.q, self.rot[o.layer, :, :, :end], o.lse, o.positions, o.scale)
            self._mass[o.layer, :, :, :end] += mass.mul_(o.weight)

    @property
    def owes_mass(self) -> bool:
        return bool(self._owed)

    def forget_owed_mass(self) -> None:
        """Drop the owed key mass unsettled (a pass whose mass is not to be kept)."""
        self._owed = []

    def copy(self) -> KVBuffer:
        """An independent copy (owed mass settled first)."""
        self.settle_mass()
        new = copy.copy(self)
        for name in ("raw", "rot", "val", "_mass"):
            setattr(new, name, getattr(self, name).clone())
        new._owed = []
        return new

    @property
    def capacity(self) -> int:
        return self.raw.shape[3]

    def reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity, 256)
        for name in ("raw", "rot", "val", "_mass"):
            old = getattr(self, name)
            grown = torch.zeros((*old.shape[:3], new_cap, *old.shape[4:]), dtype=old.dtype)
            grown[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, grown)

    def drop(self, start: int, count: int, rope: Rope) -> None:
        """Remove slots [start, start+count), shift later slots down and re-rotate them."""
        self.settle_mass()
        end = self.length
        self.version += 1
        for name in ("raw", "val", "_mass"):
            buf = getattr(self, name)
            buf[:, :, :, start : end - count] = buf[:, :, :, start + count : end].clone()
        self.length = end - count
        positions = torch.arange(start, self.length)
        raw = self.raw[:, :, :, start : self.length]  # (L, B, Hkv, n, D)
        l, b, h, n, d = raw.shape
        self.rot[:, :, :, start : self.length] = rope.apply(raw.reshape(l * b, h, n, d), positions).view(l, b, h, n, d)


@dataclass
class _OwedMass:
    """Key mass owed by one layer's forward (``KVBuffer.owe_mass``)."""

    layer: int
    q: torch.Tensor
    lse: torch.Tensor
    positions: torch.Tensor
    weight: float
    scale: float


@dataclass
class MemoryTrace:
    """Attention mass each memory block drew (summed over layers, heads, queries and steps)."""

    mass: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    retrieved: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # block -> times retrieved

    def top(self, n: int = 8) -> list[tuple[int, float]]:
        return sorted(self.mass.items(), key=lambda kv: -kv[1])[:n]


@dataclass
class _Retrieved:
    """Memory keys/values fetched for one layer, ready to attend: shapes (1, Hkv, n*bs, D)."""

    ids: np.ndarray
    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor  # (1, 1, 1, n*bs) True where the slot holds a real token
    block_size: int
    full: bool = field(init=False)  # every slot holds a token: the attention needs no mask (its fast path)

    def __post_init__(self) -> None:
        self.full = bool(self.mask.all())

    @property
    def key_mask(self) -> torch.Tensor | None:
        """The mask for :func:`keys_attention_with_lse`: None where every slot holds a token."""
        return None if self.full else self.mask


class StreamingAttention:
    """The attention state of one token stream (batch rows advance together)."""

    def __init__(
        self,
        cfg: ModelConfig,
        rope: Rope,
        mem: MemorySettings,
        dtype: torch.dtype = torch.float32,
        batch: int = 1,
        memory: MemorySource | None = None,
        sink: WritableMemorySource | None = None,
        retrieval: str = "mean",
        trace: bool = False,
    ) -> None:
        check_memory_settings(mem, retrieval)
        if mem.mode in ("memory", "memorizing") and batch != 1:
            raise ValueError(f"{mem.mode} mode reads one stream at a time (batch=1)")
        self.cfg, self.rope, self.mem, self.dtype = cfg, rope, mem, dtype
        self.mode = mem.mode
        self.layout = block_layout(cfg, mem)
        self.memory_layers = frozenset(self.layout.layers) if self.mode == "memory" else frozenset()
        self.top_k = parse_layer_top_k(mem.layer_top_k, mem.top_k, cfg.n_layers)  # blocks per search, per layer
        # the question's forward (READ_QUESTION) searches with its own strategy and top-k; a chunk read
        # ahead (READ_AHEAD) with at most ``reading_top_k``
        self._question_top_k = tuple(mem.final_top_k if mem.final_top_k > 0 and k > 0 else k for k in self.top_k)
        self._reading_top_k = tuple(min(k, mem.reading_top_k) if mem.reading_top_k > 0 else k for k in self.top_k)
        self._top_k_now = self.top_k
        self._memory_bias_now = mem.memory_bias  # set by ``begin``: reading or answering
        self.token_memory: TokenMemory | None = None
        if self.mode == "memorizing":
            layers = parse_layers(mem.memorizing_layers, cfg.n_layers)
            self.token_memory = TokenMemory(layers, cfg.n_kv_heads, cfg.head_dim)
        self.memory = memory
        self.sink = sink
        self.retrieval = retrieval
        # set by the reader before each forward of a prompt (READ_AHEAD, READ_QUESTION or READ_LAST)
        self.reading = READ_LAST
        self._strategy = retrieval
        # the question's voting pass (``prepare_question``) fills ``_ballots`` (each memory layer's
        # ranked blocks); its second pass adds ``_consensus`` to every memory layer's blocks
        self._ballots: dict[int, np.ndarray] | None = None
        self._consensus: np.ndarray | None = None
        # ``question_heads`` by layer; the voting pass keeps their layers' asking queries in ``_asked``
        self._question_heads = _heads_by_layer(mem.question_heads, cfg, self.memory_layers)
        self._asked: dict[int, _Asked] = {}
        # the question's retrieval heads, best summed score over memory blocks and over the local
        # context's blocks (``_local_blocks``), set by the heads vote; the answer reads memory at
        # ``recalled_memory_bias`` while the first is higher (``begin``). None: no heads vote ran
        self.recall_scores: tuple[float, float] | None = None
        # the best local block's slots [start, end) and ``local_start`` at that vote: where the local
        # context wins, the answer reads this block at ``recalled_local_bias`` (``_boosted_slots``)
        self._recalled_local: tuple[int, int, int] | None = None
        self._boost_now: tuple[int, int] | None = None  # set by ``begin``: slots read louder in this forward
        # the heads' best memory block (view id): the answer reads it at ``recalled_block_bias`` more
        self._recalled_block: int | None = None
        self._answering = False  # set by ``begin``: the question's forward or a decode step
        self.trace = MemoryTrace() if trace else None
        self.buf = KVBuffer(cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim, dtype)
        self.n_tokens = 0  # tokens read so far (true positions 0..n_tokens-1)
        self.local_start = mem.sinks  # true position of the first non-sink slot
        self.evicted_blocks = 0
        self._pending = 0
        self.finish_reason: str | None = None  # set by Engine.generate: "stop" | "length"
        self._search_now = True
        self._decode_steps = 0
        self._retrieved: dict[int, _Retrieved] = {}
        # each memory layer's search leader (``search_group``), and the blocks each leader chose in this forward
        ordered_layers = sorted(self.memory_layers)
        self._search_leader = {
            layer: ordered_layers[i - i % mem.search_group] for i, layer in enumerate(ordered_layers)
        }
        self._chosen_now: dict[int, np.ndarray] = {}
        # per-head RoPE tables of the forward in progress (``_rotate_all``), and whether memory has blocks
        self._head_tables: dict[tuple[int, int, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        self._memory_now = False
        self._scale = 1.0 / math.sqrt(cfg.head_dim)
        self._cos_sin_at: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._block_offsets: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def question_top_k(self) -> tuple[int, ...]:
        """Blocks per layer that the question's forward (READ_QUESTION) retrieves."""
        return self._question_top_k

    # ----------------------------------------------------------------------------- forward protocol
    def forward(self, model: Transformer, tokens: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Read tokens (B, T) and return their logits (see Transformer.forward)."""
        self.prepare_question(model, tokens)
        self.begin(tokens.shape[1])
        try:
            return model(tokens, self, last_only=last_only)
        finally:
            self.end()

    @torch.inference_mode()
    def begin(self, n_new: int) -> None:
        if self.mode == "full" and self.n_tokens + n_new > self.cfg.max_positions:
            raise ContextLengthError(
                f"{self.n_tokens + n_new} tokens exceed the model's {self.cfg.max_positions}-token context "
                "in full attention mode; use the memory or window mode for longer inputs"
            )
        self.evict_overflow()
        self.buf.reserve(self.buf.length + n_new)
        self._pending = n_new
        start = self.buf.length  # RoPE tables of the new slots, shared by every layer of this forward
        self._cos_sin = self.rope.cos_sin(torch.arange(start, start + n_new), self.dtype)
        self._head_tables = {}
        self._memory_now = self.memory is not None and self.memory.num_blocks() > 0
        asking = self.reading == READ_QUESTION and n_new > 1
        answering = self.reading == READ_QUESTION or n_new == 1  # the question, or a decode step
        if n_new > 1 and not asking:
            # a new prompt: the last question's vote is stale
            self.recall_scores, self._recalled_local, self._recalled_block = None, None, None
        self._answering = answering
        self._memory_bias_now = self.answer_bias() if answering else self.mem.memory_bias
        self._boost_now = self._boosted_slots() if answering else None
        self._strategy = (self.mem.final_retrieval or self.retrieval) if asking else self.retrieval
        if asking:
            self._top_k_now = self._question_top_k
        elif self.reading == READ_AHEAD and n_new > 1:
            self._top_k_now = self._reading_top_k
        else:
            self._top_k_now = self.top_k
        self._chosen_now = {}
        if n_new > 1:
            self._search_now, self._decode_steps = True, 0
        else:
            self._search_now = self._decode_steps > 0 and self._decode_steps % self.mem.decode_search_every == 0
            if not self._retrieved:
                self._search_now = True
            self._decode_steps += 1

    def answer_bias(self) -> float:
        """The memory keys' logit bias in the question's forward and decode steps: ``recalled_memory_bias``
        where the question's retrieval heads matched memory better than the local context, else
        ``answer_memory_bias``."""
        scores = self.recall_scores
        recalled = scores is not None and scores[0] > scores[1]
        return self.mem.recalled_memory_bias if recalled else self.mem.answer_memory_bias

    def _boosted_slots(self) -> tuple[int, int] | None:
        """Slots [lo, hi) that the answer reads at ``recalled_local_bias``: the local block the question's
        retrieval heads scored best, where it beat memory's best block (``recall_scores``), as it stands
        after the evictions since the vote (they drop the first local slots and shift the rest down).
        None where there is no such block, it has left the window, or the bias is 0."""
        scores, block = self.recall_scores, self._recalled_local
        if self.mem.recalled_local_bias <= 0 or scores is None or block is None or scores[0] > scores[1]:
            return None
        start, end, local_start = block
        shift, n_sinks = self.local_start - local_start, self.n_sinks
        lo = start if start < n_sinks else max(n_sinks, start - shift)
        hi = end if end <= n_sinks else max(n_sinks, end - shift)
        return (lo, hi) if lo < hi else None

    @torch.inference_mode()
    def prepare_question(self, model: Transformer, tokens: torch.Tensor) -> None:
        """Before the question's forward (READ_QUESTION, ``final_consensus`` > 0, memory mode):
        read the question once without committing it, and keep the ``final_consensus`` blocks its
        memory layers' searches agree on (``consensus_blocks``) for the real forward, where every
        memory layer attends to them besides its own. A no-op otherwise. Nothing of the voting pass
        stays: the slots it wrote are rewritten, the key mass it added is restored, the trace skips it.
        """
        self._consensus, self.recall_scores, self._recalled_local, self._recalled_block = None, None, None, None
        count = self.mem.final_consensus
        if not (self.reading == READ_QUESTION and count > 0 and tokens.shape[1] > 1 and self.memory_layers):
            return
        if self.memory is None or self.memory.num_blocks() == 0:
            return
        trace, self.trace = self.trace, None
        self.begin(tokens.shape[1])
        end = self.buf.length + self._pending
        mass = self.buf.mass[:, :, :, :end].clone()
        self._ballots, self._asked = {}, {}
        try:
            model(tokens, self, last_only=True)
            ballots = [self._ballots[layer] for layer in sorted(self._ballots)]
            if self._asked:
                self._consensus = self._heads_vote(ballots, count)
            else:
                self._consensus = consensus_blocks(ballots, count)
        finally:
            self.buf.forget_owed_mass()  # the voting pass's own
            self.buf.mass[:, :, :, :end] = mass
            self._pending, self._ballots, self._asked, self.trace = 0, None, {}, trace

    def _heads_vote(self, ballots: list[np.ndarray], count: int) -> np.ndarray:
        """The ``count`` blocks the retrieval heads (``question_heads``) score highest among the
        blocks of any ballot: per head, the best z-scored logit over the question's asking tokens
        and every stored token of the block (the representatives alone lose a needle in natural
        text: docs/RESULTS.md, 2026-12-01/a8a0c33), summed over the heads. Ties keep the lower id.

        Also sets ``recall_scores``: the best candidate's total, and the best total of the local
        context read before the question, cut into blocks the same way (``_local_blocks``);
        ``_recalled_local``: that best local block's slots; ``_recalled_block``: the best candidate."""
        candidates = np.unique(np.concatenate(ballots)) if ballots else np.zeros(0, np.int64)
        if candidates.size == 0:
            return candidates
        rows: dict[int, torch.Tensor] = {}
        local_rows: dict[int, torch.Tensor] = {}
        heads: list[tuple[int, int]] = []
        n_t = 0
        for layer, asked in self._asked.items():
            n_t = asked.n_t
            chosen = self._question_heads[layer]  # their rows only: head h's n_t tokens are rows h*n_t on
            at = torch.cat([torch.arange(h * n_t, (h + 1) * n_t) for h in chosen])
            vectors, kv = asked.vectors[at], asked.kv[at]
            blocks = self.memory.fetch(layer, candidates)
            keys, lengths = torch.from_numpy(blocks.keys).float(), torch.from_numpy(blocks.lengths)
            rows[layer] = every_token_scores(keys, lengths, vectors, kv, asked.mean, asked.cov)
            local, local_lengths = self._local_blocks(layer)
            local_rows[layer] = every_token_scores(local, local_lengths, vectors, kv, asked.mean, asked.cov)
            heads += [(layer, i) for i in range(len(chosen))]
        total = sum_head_scores(rows, heads, n_t)
        local_total = sum_head_scores(local_rows, heads, n_t)
        best_local = int(torch.argmax(local_total))  # the first of equal totals
        self.recall_scores = (float(total.max()), float(local_total[best_local]))
        start = 1 + best_local * self.layout.block_size  # ``_local_blocks`` starts after the first token
        self._recalled_local = (start, min(start + self.layout.block_size, self.buf.length), self.local_start)
        order = torch.sort(total, descending=True, stable=True).indices[:count]
        self._recalled_block = int(candidates[int(order[0])])
        return candidates[order.numpy()]

    def _local_blocks(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys read so far, but the first token, as memory-sized blocks for ``every_token_scores``:
        keys (n, Hkv, block_size, D) float32 pre-RoPE and lengths (n,) (one empty block when there is
        nothing else). The first token is the attention sink, where every head's idle attention goes
        (StreamingLLM): it tops most heads' logits whatever is asked. Blocks of memory's size make the
        two sides one statistic: each head's best over one block, summed over the heads."""
        bs = self.layout.block_size
        keys = self.buf.raw[layer, 0, :, 1 : self.buf.length].float()  # (Hkv, L, D)
        hkv, length, d = keys.shape
        n = max(1, -(-length // bs))
        padded = F.pad(keys, (0, 0, 0, n * bs - length))  # zeros after the last key: (Hkv, n*bs, D)
        lengths = (length - torch.arange(n) * bs).clamp(0, bs)
        return padded.view(hkv, n, bs, d).transpose(0, 1), lengths

    def end(self) -> None:
        self.reading = READ_LAST
        self._consensus = None
        self.buf.length += self._pending
        self.n_tokens += self._pending
        self._pending = 0

    # ------------------------------------------------------------------------------------ eviction
    @property
    def n_sinks(self) -> int:
        return min(self.mem.sinks, self.n_tokens)

    @torch.inference_mode()
    def evict_overflow(self) -> None:
        """Keep at most ``window`` local tokens (whole blocks leave). Runs before every read; a
        caller with idle time (a chat session after its reply) may run it earlier: the same blocks
        leave either way, and the next read then starts without the shift and re-rotation.
        Full attention keeps everything: a no-op there."""
        over = self.overflow
        if over > 0:
            self._evict_blocks(self.n_sinks, [self.mem.block_size] * -(-over // self.mem.block_size))

    @torch.inference_mode()
    def settle(self) -> None:
        """The work a read leaves for later, done now (a chat session after its reply, in idle
        time): the owed key mass (``KVBuffer.owe_mass``) and the evictions of ``evict_overflow``."""
        self.buf.settle_mass()
        self.evict_overflow()

    @property
    def overflow(self) -> int:
        """Local tokens beyond the window, which the next ``evict_overflow`` moves out (0 in full mode)."""
        if self.mode == "full":
            return 0
        return max(0, self.buf.length - self.n_sinks - self.mem.window)

    def _evict_blocks(self, slot: int, counts: list[int]) -> None:
        """Move consecutive blocks of ``counts`` tokens from ``slot`` on to memory, then drop their
        slots at once (one shift and re-rotation of the later slots, however many blocks leave)."""
        offset = slot
        for count in counts:
            if self.mode == "memory" and self.sink is not None:
                self.sink.add(self._make_block(offset, count))
            if self.token_memory is not None:
                for layer in self.token_memory.layers:
                    sl = slice(offset, offset + count)
                    self.token_memory.add(layer, self.buf.raw[layer, 0, :, sl], self.buf.val[layer, 0, :, sl])
            self.evicted_blocks += 1
            self.local_start += count
            offset += count
        self.buf.drop(slot, offset - slot, self.rope)

    def _make_block(self, slot: int, count: int) -> MemoryBlock:
        """Slots [slot, slot+count) of batch row 0 as a MemoryBlock (pre-RoPE keys, float16)."""
        layers = list(self.layout.layers)
        keys = self.buf.raw[layers, 0, :, slot : slot + count]  # (Lm, Hkv, n, D)
        values = self.buf.val[layers, 0, :, slot : slot + count]
        mass = self.buf.mass[layers, 0, :, slot : slot + count]  # (Lm, Hkv, n)
        reps = torch.stack(
            [
                choose_representatives(keys[i], mass[i], self.layout.representatives, self.mem.representative_choice)
                for i in range(len(layers))
            ]
        )
        start = self.local_start if slot >= self.n_sinks else slot
        return MemoryBlock(
            keys=keys.to(torch.float16).numpy(),
            values=values.to(torch.float16).numpy(),
            representatives=reps.numpy(),
            token_start=start,
            token_end=start + count,
        )

    @torch.inference_mode()
    def flush_to_memory(self, include_sinks: bool = True) -> int:
        """Move every local token (and the sinks) into the memory sink, whole blocks plus a tail.

        Used at the end of a document so all of it is retrievable. Returns blocks written.
        """
        if self.mode != "memory" or self.sink is None:
            raise RuntimeError("flush_to_memory needs memory mode and a memory sink")
        written = 0
        bs = self.mem.block_size
        if include_sinks and self.n_sinks:
            self.sink.add(self._make_block(0, self.n_sinks))
            written += 1
        local = self.buf.length - self.n_sinks
        counts = [min(bs, local - start) for start in range(0, local, bs)]
        if counts:
            self._evict_blocks(self.n_sinks, counts)
        return written + len(counts)

    # ----------------------------------------------------------------------------------- attention
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, Hq, T, D), k/v (B, Hkv, T, D) pre-RoPE -> (B, Hq, T, D)."""
        buf, t = self.buf, q.shape[2]
        start = buf.length
        end = start + t
        q_rot, k_rot, q_mem = self._rotate_all(q, k, with_memory=self._memory_now and layer in self.memory_layers)
        self.store(layer, k, k_rot, v)
        keys, values = buf.rot[layer, :, :, :end], buf.val[layer, :, :, :end]

        if self.token_memory is not None and layer in self.token_memory.layers and len(self.token_memory):
            out_l, lse_l, _ = grouped_attention_with_lse(q_rot, keys, values, None, self._scale, causal=True)
            q_search = group_sum_queries(q[0], self.cfg.n_kv_heads)
            out_m, lse_m = self.token_memory.attend(
                layer, q_search, self._rotate_for_memory(q), self.mem.memorizing_top_k, self._scale
            )
            return merge_attention([(out_l, lse_l), (out_m, lse_m)])
        if layer not in self.memory_layers:
            if t == 1:  # decode: one query row per head, grouped matmul beats SDPA's kernel on CPU
                return decode_attention_with_lse(q_rot, keys, values, self._scale)[0]
            if start == 0:  # first chunk: plain causal, SDPA's fastest path
                return F.scaled_dot_product_attention(
                    q_rot, keys, values, is_causal=True, scale=self._scale, enable_gqa=True
                )
            return causal_attention_with_lse(q_rot, keys, values, self._scale)[0]
        if t == 1:
            out_l, lse_l, mass_l = decode_attention_with_lse(q_rot, keys, values, self._scale, return_key_mass=True)
        elif self.mem.mass_stride <= 1:
            out_l, lse_l, mass_l = causal_attention_with_sampled_mass(q_rot, keys, values, self._scale, 1)
        else:  # the key mass from every ``mass_stride``-th query, owed until a block leaves
            out_l, lse_l = causal_attention_with_lse(q_rot, keys, values, self._scale)
            picked = sampled_queries(t, self.mem.mass_stride)
            weight = t / picked.numel()
            buf.owe_mass(layer, q_rot[:, :, picked], lse_l[:, :, picked], picked + start, weight, self._scale)
            mass_l = None
        return self.finish_layer(layer, q, out_l, lse_l, mass_l, q_mem)

    def _rotate_all(
        self, q: torch.Tensor, k: torch.Tensor, with_memory: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """q (B, Hq, T, D) and k (B, Hkv, T, D) rotated at the new tokens' slots, and (``with_memory``)
        q rotated as the retrieved blocks' queries (``_block_query_position``), else None: one rotation
        of the heads side by side, with per-head tables built once per forward. The same numbers as
        rotating each apart (RoPE acts on each element alone)."""
        hq, hkv = q.shape[1], k.shape[1]
        key = (hq, hkv, with_memory)
        if key not in self._head_tables:
            cos, sin = self._cos_sin  # (T, D)
            tables = []
            for c, pos_c in ((cos, 0), (sin, 1)):
                parts = [c.expand(hq + hkv, *c.shape)]
                if with_memory:
                    at = self._cos_sin_at_position(self._block_query_position, c.dtype)[pos_c]  # (1, D)
                    parts.append(at.expand(hq, *c.shape))
                tables.append(torch.cat(parts).unsqueeze(0))  # (1, H, T, D)
            self._head_tables[key] = (tables[0], tables[1])
        cos, sin = self._head_tables[key]
        heads = [q, k, q] if with_memory else [q, k]
        rotated = Rope.rotate(torch.cat(heads, dim=1), cos, sin)
        q_mem = rotated[:, hq + hkv :] if with_memory else None
        return rotated[:, :hq], rotated[:, hq : hq + hkv], q_mem

    # The pieces of ``attend`` that a batched decode (memllm/serving/batch.py) calls per stream.
    def rotate_new(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, T, D) at the slots of the tokens being read now, rotated."""
        cos, sin = self._cos_sin
        return Rope.rotate(x, cos, sin)

    def store(self, layer: int, k: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor) -> None:
        """Write the new tokens' keys (pre-RoPE and rotated) and values (B, Hkv, T, D) at their slots."""
        buf = self.buf
        start, end = buf.length, buf.length + k.shape[2]
        buf.raw[layer, :, :, start:end] = k
        buf.rot[layer, :, :, start:end] = k_rot
        buf.val[layer, :, :, start:end] = v

    def uses_memory(self, layer: int) -> bool:
        """Whether ``finish_layer`` must run for this layer (memory mode), or the local output is final."""
        return layer in self.memory_layers

    def finish_layer(
        self,
        layer: int,
        q: torch.Tensor,
        out_l: torch.Tensor,
        lse_l: torch.Tensor,
        mass_l: torch.Tensor | None,
        q_mem: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A memory layer after its local attention (out (B, Hq, T, D), lse (B, Hq, T), key mass
        (B, Hkv, end), or None where it is owed): record the local keys' mass, attend to the
        retrieved blocks, merge. ``q_mem``: q rotated for the blocks, where the caller has it."""
        if mass_l is not None:
            end = self.buf.length + self._pending
            self.buf.mass[layer, :, :, :end] += mass_l
        parts = [(out_l, lse_l)]
        retrieved = self._retrieve(layer, q)
        if retrieved is not None:
            if q_mem is None:
                q_mem = self._rotate_at(q, self._block_query_position)
            out_m, lse_m = keys_attention_with_lse(
                q_mem, retrieved.keys, retrieved.values, retrieved.key_mask, self._scale
            )
            if self.trace is not None:  # observed apart, so that tracing never changes the output
                mass_m = key_mass_from_lse(q_mem, retrieved.keys, lse_m, self._scale, hidden=~retrieved.mask)
                per_block = mass_m[0].sum(0).view(len(retrieved.ids), retrieved.block_size).sum(1)  # (n_blocks,)
                for block_id, m in zip(retrieved.ids.tolist(), per_block.tolist(), strict=True):
                    self.trace.mass[block_id] += m
            # a logit bias b on every memory key is a shift of that part's log-sum-exp
            parts.append((out_m, lse_m + self._memory_bias_now))
            at = self._recalled_block_at(retrieved)
            if at is not None:
                keys, values, mask = retrieved.keys[:, :, at], retrieved.values[:, :, at], retrieved.mask[..., at]
                parts.append(
                    self._louder(q_mem, keys, values, mask, self._memory_bias_now, self.mem.recalled_block_bias)
                )
        if self._boost_now is not None:
            lo, hi = self._boost_now
            keys, values = self.buf.rot[layer, :, :, lo:hi], self.buf.val[layer, :, :, lo:hi]
            parts.append(self._louder(self.rotate_new(q), keys, values, None, 0.0, self.mem.recalled_local_bias))
        return merge_attention(parts)

    def _louder(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
        base: float,
        bias: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys that another part of the merge already reads at logit bias ``base``, once more, so that
        together they read at ``base + bias`` (``bias`` > 0): their mass e^(lse + base) gains
        e^(lse + base) (e^bias - 1). q (B, Hq, T, D) rotated as that part's; keys, values (B, Hkv, n, D);
        mask as :func:`keys_attention_with_lse`'s. Every query of an answer comes after these keys: no
        causal mask. -> (out (B, Hq, T, D), lse (B, Hq, T)) for ``merge_attention``."""
        out, lse = keys_attention_with_lse(q, keys, values, mask, self._scale)
        return out, lse + base + math.log(math.expm1(bias))

    def _recalled_block_at(self, retrieved: _Retrieved) -> slice | None:
        """Where the heads' best memory block (``_recalled_block``) lies among this layer's retrieved
        keys, while answering with ``recalled_block_bias`` > 0; None otherwise or where it is not there."""
        if not self._answering or self.mem.recalled_block_bias <= 0 or self._recalled_block is None:
            return None
        hits = np.flatnonzero(retrieved.ids == self._recalled_block)
        if hits.size == 0:
            return None
        bs = retrieved.block_size
        return slice(int(hits[0]) * bs, (int(hits[0]) + 1) * bs)

    def _rotate_for_memory(self, q: torch.Tensor) -> torch.Tensor:
        """q rotated at ``memory_distance``: the token memory's keys are unrotated (distance fixed)."""
        return self._rotate_at(q, self.mem.memory_distance)

    @property
    def _block_query_position(self) -> int:
        """Where queries attending to retrieved blocks are rotated (see the module docstring)."""
        ordered = self.mem.memory_positions == "ordered"
        return self.mem.memory_distance + (self.layout.block_size - 1 if ordered else 0)

    def _rotate_at(self, x: torch.Tensor, position: int) -> torch.Tensor:
        """x (B, H, T, D) with every token rotated at one ``position``."""
        cos, sin = self._cos_sin_at_position(position, x.dtype)
        return Rope.rotate(x, cos, sin)

    def _cos_sin_at_position(self, position: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables (1, D) of one position, cached."""
        key = (position, dtype)
        if key not in self._cos_sin_at:
            self._cos_sin_at[key] = self.rope.cos_sin(torch.tensor([position]), dtype)
        return self._cos_sin_at[key]

    def _order_block_keys(self, keys: torch.Tensor, block_size: int) -> torch.Tensor:
        """Keys (1, Hkv, n*bs, D) of n whole blocks, each token rotated at its offset in its block."""
        if keys.dtype not in self._block_offsets:
            self._block_offsets[keys.dtype] = self.rope.cos_sin(torch.arange(block_size), keys.dtype)
        cos, sin = self._block_offsets[keys.dtype]  # (bs, D)
        _, hkv, length, d = keys.shape
        return Rope.rotate(keys.view(1, hkv * (length // block_size), block_size, d), cos, sin).view(keys.shape)

    def _asking(self, layer: int, q: torch.Tensor) -> _Asked:
        """The per-head asking queries of ``q`` (Hq, T, D) pre-RoPE, with the statistics of this
        layer's local keys that z-score their logits (see retrieval.zscores)."""
        rows, kv, vectors = per_head_rows(q, self.cfg.n_kv_heads, self.mem.asking_tokens)
        # (Hkv, n, D) sinks + local + the tokens read now, a sample of keys; without the tokens read
        # now, a fresh state's first chunk (a knowledge-base question) had none: NaN scores, nothing retrieved
        mean, cov = key_statistics(self.buf.raw[layer, 0, :, : self.buf.length + self._pending])
        return _Asked(rows, kv, vectors, mean, cov, len(vectors) // q.shape[0])

    def _search_per_head(self, asked: _Asked, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Per (asking token, query head) searches, z-scored against the local keys' statistics.

        Scores are unrotated logits; z-scoring makes rows comparable so the best block of any
        head/token can win (docs/retrieval-study.md).
        """
        scores, ids = self.memory.search(layer, asked.rows.numpy(), self._top_k_now[layer])
        z = zscores(torch.from_numpy(scores), asked.vectors, asked.kv, asked.mean, asked.cov)
        return z.numpy(), ids

    def _retrieve(self, layer: int, q: torch.Tensor) -> _Retrieved | None:
        """Blocks this layer attends to for the current tokens (searched now or reused)."""
        top_k = self._top_k_now[layer]
        if self.memory is None or self.memory.num_blocks() == 0 or top_k <= 0:
            return None
        if not self._search_now and layer in self._retrieved:
            return self._retrieved[layer]
        leader = self._search_leader.get(layer, layer)
        shared = self._strategy != "heads" and self._ballots is None and self._top_k_now[leader] == top_k
        if shared and leader != layer and leader in self._chosen_now:
            chosen = self._chosen_now[leader]
        else:
            voting_heads = self._ballots is not None and layer in self._question_heads
            asked = self._asking(layer, q[0]) if self._strategy == "heads" or voting_heads else None
            if voting_heads:
                self._asked[layer] = asked
            if self._strategy == "heads":
                scores, ids = self._search_per_head(asked, layer)
            else:
                queries = search_vectors(q[0], self.cfg.n_kv_heads, self._strategy).numpy()
                scores, ids = self.memory.search(layer, queries, top_k)
            chosen = _merge_rows(scores, ids, top_k)
            if shared:
                self._chosen_now[layer] = chosen
        if self._ballots is not None:
            self._ballots[layer] = chosen
        if self._consensus is not None:
            own = set(chosen.tolist())
            extra = [b for b in self._consensus.tolist() if b not in own]
            chosen = np.concatenate([chosen, np.array(extra, dtype=np.int64)])
        if chosen.size == 0:
            return None
        got = self._gather_blocks(layer, chosen, q.dtype)
        self._retrieved[layer] = got
        if self.trace is not None:
            for block_id in chosen.tolist():
                self.trace.retrieved[block_id] += 1
        return got

    def _gather_blocks(self, layer: int, chosen: np.ndarray, dtype: torch.dtype) -> _Retrieved:
        """Blocks ``chosen`` as this layer's memory keys and values, in any order (every memory key is
        read at the same distance or, ``ordered``, at its offset in its own block: attention does not
        depend on the order of the blocks). Blocks its previous search already brought stay where they
        are: consecutive searches share most blocks (94-96% between the turns of a chat with different
        questions, docs/RESULTS.md), so only the newcomers are fetched and cast, written in place over
        the blocks that left. Provisional ids are always fetched (see
        :func:`memllm.memory.source.stable_ids`). The result holds the same blocks, key for key, as
        fetching them all; ``ids`` names the block at each place."""
        prev = self._retrieved.get(layer)
        if prev is None or prev.keys.dtype != dtype or len(prev.ids) != len(chosen):
            return self._fetch_blocks(layer, chosen, dtype)
        keep = stable_ids(prev.ids)
        wanted = set(chosen.tolist())
        stays = np.array([k and b in wanted for b, k in zip(prev.ids.tolist(), keep, strict=True)], dtype=bool)
        if stays.all():
            return prev
        held = set(prev.ids[stays].tolist())
        missing = np.array([b for b in chosen.tolist() if b not in held], dtype=np.int64)
        if len(missing) == len(chosen):
            return self._fetch_blocks(layer, chosen, dtype)
        new = self._fetch_blocks(layer, missing, dtype)
        bs = self.layout.block_size
        places = torch.from_numpy(np.flatnonzero(~stays))  # where the blocks that left were
        at = (places.unsqueeze(1) * bs + torch.arange(bs)).reshape(-1)  # their key slots, in order
        prev.keys.index_copy_(2, at, new.keys)
        prev.values.index_copy_(2, at, new.values)
        prev.mask.index_copy_(3, at, new.mask)
        ids = prev.ids.copy()
        ids[~stays] = missing
        return _Retrieved(ids, prev.keys, prev.values, prev.mask, bs)

    def _fetch_blocks(self, layer: int, block_ids: np.ndarray, dtype: torch.dtype) -> _Retrieved:
        fetched = self.memory.fetch(layer, block_ids)
        n, bs = fetched.keys.shape[0], fetched.keys.shape[2]
        keys, values = _blocks_as_keys(fetched.keys, dtype), _blocks_as_keys(fetched.values, dtype)
        if self.mem.memory_positions == "ordered":
            keys = self._order_block_keys(keys, bs)
        valid = torch.arange(bs).unsqueeze(0) < torch.from_numpy(fetched.lengths).unsqueeze(1)  # (n, bs)
        return _Retrieved(block_ids, keys, values, valid.reshape(1, 1, 1, n * bs), bs)


@dataclass
class _Asked:
    """A layer's per-head asking queries (``per_head_rows``) and its local keys' statistics
    (``key_statistics``): rows (n, Hkv*D), kv (n,), vectors (n, D), mean (Hkv, D), cov (Hkv, D, D);
    n = Hq * n_t, head h's ``n_t`` asking tokens at rows h * n_t on."""

    rows: torch.Tensor
    kv: torch.Tensor
    vectors: torch.Tensor
    mean: torch.Tensor
    cov: torch.Tensor
    n_t: int


def _heads_by_layer(spec: str, cfg: ModelConfig, memory_layers: frozenset[int]) -> dict[int, tuple[int, ...]]:
    """``question_heads`` ("18:7,20:6") as {layer: query heads}; every head must be in a memory layer
    (none outside memory mode, where ``memory_layers`` is empty). ``auto`` is resolved by
    ``Engine.new_state`` (it knows the model); a state built without an engine reads it, "" and ``vote``
    as the rank vote."""
    if not memory_layers or spec in NAMED_HEADS:
        return {}
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, head in parse_heads(spec):
        if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
            raise ValueError(
                f"question head {layer}:{head} is outside the model ({cfg.n_layers} layers, {cfg.n_heads} heads)"
            )
        if layer not in memory_layers:
            raise ValueError(f"question head {layer}:{head}: layer {layer} does not use memory")
        by_layer[layer].append(head)
    return {layer: tuple(heads) for layer, heads in by_layer.items()}


def _blocks_as_keys(payload: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Block payloads (n, Hkv, bs, D) float16 as one key (or value) sequence (1, Hkv, n*bs, D) in ``dtype``.

    Cast through float32 (exact from float16, then the same rounding): torch's direct float16 ->
    bfloat16 cast runs ~5x slower on CPU (32 blocks of one layer: 1.8 ms against 0.36 ms, an ad-hoc
    timing on 2026-11-29), and a chat turn or a decode re-search casts 60 of these.
    """
    n, hkv, bs, d = payload.shape
    t = torch.from_numpy(payload).float()
    return t.to(dtype).permute(1, 0, 2, 3).reshape(1, hkv, n * bs, d)


def _merge_rows(scores: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Distinct block ids from several search rows, best score first, at most k."""
    best: dict[int, float] = {}
    for s, i in zip(scores.ravel().tolist(), ids.ravel().tolist(), strict=True):
        if i >= 0 and s > best.get(i, -math.inf):
            best[i] = s
    return np.array(sorted(best, key=lambda i: -best[i])[:k], dtype=np.int64)
