"""``memllm bench passkey``: the passkey retrieval protocol (Landmark Attention / InfLLM / LongLLaMA).

Prompt (raw, no chat template), lines joined by newlines: the instruction line, filler, the needle
``The pass key is K. Remember it. K is the pass key.`` at a chosen depth, more filler, and
``What is the pass key? The pass key is``. K is a random 5-digit number; a trial passes when the
first integer of the greedy continuation equals K. Filler: the grass/sky/sun sentences, or Paul
Graham essays (harder: natural text competes with the needle). The ``oracle`` arm asks the model
with full attention over only what perfect retrieval would give it (``oracle_prompt``): the ceiling
that separates retrieval misses from the model's own.

Results are appended to a JSON file as they come, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import random
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from memllm.attention import MODES, READ_QUESTION, check_memory_settings
from memllm.bench.common import essays_text, format_table, machine_info, machine_label, write_json
from memllm.engine import Engine
from memllm.sampling import SamplingParams
from memllm.settings import MemorySettings, memory_overrides, parse_memory_changes

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
GRASS = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
# a bench arm, not an attention mode: full attention over what perfect retrieval would hand the model
ORACLE = "oracle"
UNRECORDED = "unrecorded"  # the machine of a trial written before trials recorded it
PASSKEY_MODES = (*MODES, ORACLE)
TRIAL_OFFSET = 7919  # filler tokens skipped per trial number: each trial reads the filler from its own place


def trial_offset(trial: int) -> int:
    return trial * TRIAL_OFFSET


def needle(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


@dataclass(frozen=True)
class PasskeyPrompt:
    ids: list[int]
    key: int
    needle_span: tuple[int, int]  # token span of the needle line


def filler_ids(engine: Engine, kind: str, n: int, offset: int = 0) -> list[int]:
    """n filler tokens: grass sentences repeated, or essays from a token offset (wrapping)."""
    if kind == "grass":
        unit = engine.encode(" ".join([GRASS] * 20) + " ")
    elif kind == "essays":
        unit = _essay_ids(engine)
    else:
        raise ValueError(f"unknown filler {kind!r} (grass, essays)")
    out: list[int] = []
    pos = offset % len(unit)
    while len(out) < n:
        take = unit[pos : pos + n - len(out)]
        out += take
        pos = 0
    return out


_ESSAY_CACHE: dict[int, list[int]] = {}


def _essay_ids(engine: Engine) -> list[int]:
    key = id(engine.tokenizer)
    if key not in _ESSAY_CACHE:
        _ESSAY_CACHE[key] = engine.encode(essays_text())
    return _ESSAY_CACHE[key]


def build_prompt(engine: Engine, length: int, depth: float, key: int, filler: str, offset: int = 0) -> PasskeyPrompt:
    """A prompt of ``length`` tokens with the needle at ``depth`` (0 = start, 1 = end) of the filler.

    The protocol's lines (instruction, filler, needle, more filler, question) joined by newlines; a
    filler part with no text (depth 0 or 1) is not a line, so it leaves no blank line behind. With
    one, the needle line followed by an empty line and the question, the bundled model answers
    " a special key that is used to create" even with full attention at 4K, where it answers every
    other depth (docs/RESULTS.md, 2026-11-30/9822a59).
    """
    head = engine.encode(INSTRUCTION + "\n")
    needle_ids = engine.encode(needle(key))
    newline = engine.encode("\n")
    question = engine.encode(QUESTION)
    before, after = depth > 0, depth < 1  # filler lines around the needle
    n_fill = length - len(head) - len(needle_ids) - len(question) - len(newline) * (1 + before + after)
    if n_fill < 2:
        raise ValueError(f"length {length} is too short for the passkey prompt")
    fill = filler_ids(engine, filler, n_fill, offset)
    cut = min(max(round(n_fill * depth), int(before)), n_fill - int(after))  # each filler line non-empty
    prefix = fill[:cut] + newline if before else []
    suffix = fill[cut:] + newline if after else []
    ids = head + prefix + needle_ids + newline + suffix + question
    start = len(head) + len(prefix)
    return PasskeyPrompt(ids=ids, key=key, needle_span=(start, start + len(needle_ids)))


def oracle_positions(n: int, needle_span: tuple[int, int], mem: MemorySettings) -> list[int]:
    """The prompt positions (sorted, each once) that perfect retrieval would hand memory mode for the
    question of an ``n``-token prompt: the first ``mem.sinks``, the ``mem.block_size`` around the needle
    (centred on it, moved inside the prompt at its edges; the whole needle if it is longer), and the
    last ``mem.window``."""
    start, end = needle_span
    if not 0 <= start < end <= n:
        raise ValueError("the oracle needs the needle's span in the prompt")
    block_start = min(max(0, start - (mem.block_size - (end - start)) // 2), max(0, n - mem.block_size))
    block_end = min(n, max(end, block_start + mem.block_size))
    keep = set(range(min(mem.sinks, n))) | set(range(block_start, block_end)) | set(range(max(0, n - mem.window), n))
    return sorted(keep)


def oracle_prompt(prompt: PasskeyPrompt, mem: MemorySettings) -> PasskeyPrompt:
    """``oracle_positions`` of ``prompt`` as one short prompt for full attention, at contiguous
    positions. Its accuracy is the model's own ceiling for a memory-mode trial: a miss here is the
    model failing to copy a key it sees, not retrieval failing to find it."""
    kept = oracle_positions(len(prompt.ids), prompt.needle_span, mem)
    start, end = prompt.needle_span
    return PasskeyPrompt(
        ids=[prompt.ids[i] for i in kept], key=prompt.key, needle_span=(kept.index(start), kept.index(end - 1) + 1)
    )


def first_integer(text: str) -> int | None:
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


def run_trial(engine: Engine, prompt: PasskeyPrompt, mode: str, max_tokens: int = 8, **overrides) -> dict:
    state = engine.new_state(mode, **overrides)
    t0 = time.perf_counter()
    tokens = list(engine.generate(state, prompt.ids, SamplingParams(max_tokens=max_tokens)))
    return _scored(engine, prompt, tokens, time.perf_counter() - t0)


# settings an answer may change without changing the read it shares (``run_answer_variants``)
ANSWER_SETTINGS = frozenset(
    {
        "final_retrieval",
        "final_top_k",
        "final_consensus",
        "top_k",
        "layer_top_k",
        "answer_memory_bias",
        "recalled_memory_bias",
        "recalled_local_bias",
        "recalled_block_bias",
        "memory_distance",
        "memory_positions",
        "asking_tokens",
        "question_heads",
    }
)


def parse_variant(spec: str) -> dict[str, object]:
    """ "final_retrieval=heads,top_k=64" -> the memory settings changes of one answer variant."""
    changes = parse_memory_changes(spec)
    if not changes:
        raise ValueError("an empty answer variant")
    fixed = sorted(set(changes) - ANSWER_SETTINGS)
    if fixed:
        raise ValueError(f"{fixed}: the shared read fixes these; a variant may change {sorted(ANSWER_SETTINGS)}")
    changes = memory_overrides(**changes)
    check_memory_settings(dataclasses.replace(MemorySettings(), **changes))
    return changes


def run_answer_variants(
    engine: Engine, prompt: PasskeyPrompt, variants: list[str], max_tokens: int = 8, **overrides
) -> list[dict]:
    """One memory-mode trial answered once per variant, from one read.

    The prompt is read up to its question (the final forward ``Engine.prefill_end`` splits off);
    each variant (``parse_variant``: e.g. ``final_retrieval=heads`` or ``top_k=64``) then reads the
    question and answers from a copy of that state, over the same memory, with its settings. Each
    answer is the one ``run_trial`` gives when the question and answer alone run with those
    settings; the read, which is nearly all of a trial's time, is shared. ``seconds``: the read
    plus that answer.
    """
    from memllm.chat.state import fork_state
    from memllm.memory.source import InMemorySource

    changes = [parse_variant(v) for v in variants]
    state = engine.new_state("memory", **overrides)
    total = len(prompt.ids)
    t0 = time.perf_counter()
    read = 0
    for n, _ in engine.prefill_steps(state, prompt.ids):
        read += n
        if engine.is_question(state, read, total):
            break  # the generator stops before it reads the question
    else:
        raise ValueError(f"a {total}-token prompt is read in one forward: no question forward to vary")
    shared = time.perf_counter() - t0
    question = torch.tensor([prompt.ids[read:]], dtype=torch.long)
    results = []
    for variant, change in zip(variants, changes, strict=True):
        t1 = time.perf_counter()
        copy = fork_state(
            engine, state, sink=InMemorySource(state.layout, name="answer"), extra_sources=[state.memory], **change
        )
        with torch.inference_mode():
            copy.reading = READ_QUESTION
            logits = copy.forward(engine.model, question, last_only=True)[0, -1]
        tokens = list(engine.generate(copy, prompt.ids, SamplingParams(max_tokens=max_tokens), logits=logits))
        scored = _scored(engine, prompt, tokens, shared + time.perf_counter() - t1)
        results.append({"variant": variant, **scored, "recall_scores": copy.recall_scores})
    return results


def _scored(engine: Engine, prompt: PasskeyPrompt, tokens: list[int], seconds: float) -> dict:
    answer = engine.tokenizer.decode(tokens, skip_special_tokens=True)
    return {"answer": answer, "passed": first_integer(answer) == prompt.key, "seconds": seconds}


def arm(trial: dict) -> str:
    """What a trial record measured: its mode, and the answer variant where the run had several."""
    variant = trial.get("variant")
    return trial["mode"] if variant is None else f"{trial['mode']}/{variant}"


def trial_key(seed: int, length: int, depth: float, trial: int) -> int:
    """The 5-digit key of one trial: a function of the trial alone, so that a grid split over
    several runs (some depths here, others there) asks the keys the whole grid would ask."""
    return random.Random(f"{seed}:{length}:{depth:g}:{trial}").randint(10000, 99999)


def run(
    engine: Engine,
    lengths: list[int],
    depths: list[float],
    trials: int,
    filler: str,
    modes: list[str],
    out: Path,
    seed: int = 0,
    workers: int = 1,
    variants: list[str] | None = None,
    **overrides,
) -> list[dict]:
    """Run (or resume) the grid; returns one summary row per (arm, length) of every trial ``out``
    holds (this run's and earlier runs' into the same file), as does the heatmap.

    ``variants``: memory-mode trials are answered once per variant from one read
    (``run_answer_variants``); each variant is an arm of its own, ``memory/VARIANT``.
    ``workers`` > 1 runs trials in that many processes, each loading the configured model (the
    ``MEMLLM_*`` settings, not ``engine``) with ``threads // workers`` threads; ``engine`` then only
    builds the prompts. Keys, prompts and answers are those of a one-process run.
    """
    unknown = [m for m in modes if m not in PASSKEY_MODES]
    if unknown:
        raise ValueError(f"unknown passkey mode(s) {unknown}; choose among {list(PASSKEY_MODES)}")
    for v in variants or ():
        parse_variant(v)  # refused before any trial
    done: list[dict] = []
    if out.exists():
        done = json.loads(out.read_text()).get("trials", [])
    seen = {(arm(r), r["length"], r["depth"], r["trial"]) for r in done}
    max_len = engine.model.config.max_positions

    def unseen(mode: str, length: int, depth: float, trial: int) -> tuple[str, ...] | None:
        """The answer variants still to run (None: a plain trial), () when done."""
        if mode == "memory" and variants:
            return tuple(v for v in variants if (f"{mode}/{v}", length, depth, trial) not in seen)
        return None if (mode, length, depth, trial) not in seen else ()

    jobs = [
        (mode, length, depth, trial, todo)
        for length in lengths
        for trial in range(trials)
        for depth in depths
        for mode in modes
        if (todo := unseen(mode, length, depth, trial)) != () and not (mode == "full" and length > max_len)
    ]
    keys = {
        (length, depth, trial): trial_key(seed, length, depth, trial)
        for length in lengths
        for depth in depths
        for trial in range(trials)
    }

    def prompt(job: tuple) -> PasskeyPrompt:
        _, length, depth, trial, _ = job
        return build_prompt(engine, length, depth, keys[(length, depth, trial)], filler, offset=trial_offset(trial))

    ran_on = machine_label(machine_info())
    bar = tqdm(total=len(jobs), desc=f"passkey ({filler})", unit="trial")
    for (mode, length, depth, trial, _), results in _trial_results(engine, jobs, prompt, workers, overrides):
        key = keys[(length, depth, trial)]
        for result in results:
            done.append(
                {"mode": mode, "length": length, "depth": depth, "trial": trial, "key": key, **result, "ran_on": ran_on}
            )
        bar.update()
        bar.set_postfix(mode=mode, length=length, ok="".join("+-"[not r["passed"]] for r in results))
        _save(out, done, filler, overrides)
    bar.close()
    # the file may hold more of the grid than this run asked for (runs split by length or depth)
    all_lengths = sorted({t["length"] for t in done} | set(lengths))
    all_depths = sorted({t["depth"] for t in done} | set(depths))
    rows = summarize(done, modes, all_lengths)
    plot(done, modes, all_lengths, all_depths, out.with_suffix(".png"))
    return rows


def _run_job(engine: Engine, prompt: PasskeyPrompt, mode: str, variants: tuple[str, ...] | None, overrides: dict):
    """The results (one per arm) of one (mode, length, depth, trial) job."""
    if mode == ORACLE:
        mem = dataclasses.replace(engine.memory_settings, **overrides)
        return [run_trial(engine, oracle_prompt(prompt, mem), "full", **overrides)]
    if variants:
        return run_answer_variants(engine, prompt, list(variants), **overrides)
    return [run_trial(engine, prompt, mode, **overrides)]


def _trial_results(
    engine: Engine, jobs: list[tuple], prompt: Callable[[tuple], PasskeyPrompt], workers: int, overrides: dict
) -> Iterator[tuple[tuple, dict]]:
    """(job, results) for every (mode, length, depth, trial, variants) job, in order of completion. In one
    process each prompt is built when its trial starts; with workers, all are built and queued."""
    if workers <= 1:
        for job in jobs:
            yield job, _run_job(engine, prompt(job), job[0], job[4], overrides)
        return
    threads = max(1, torch.get_num_threads() // workers)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch thread pool forked mid-use
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(threads,))
    try:
        futures = {}
        for job in jobs:
            p = prompt(job)
            futures[pool.submit(_worker_trial, p, job[0], job[4], overrides)] = job
        for future in as_completed(futures):
            yield futures[future], future.result()
    finally:  # interrupted or failed: drop the trials not started, wait only for those running
        pool.shutdown(wait=True, cancel_futures=True)


_WORKER_ENGINE: Engine | None = None


def _start_worker(threads: int) -> None:
    """A worker process: load the configured model once, with ``threads`` threads."""
    global _WORKER_ENGINE
    from memllm.loading import load_model
    from memllm.settings import get_settings

    settings = dataclasses.replace(get_settings(), threads=threads)
    _WORKER_ENGINE = Engine(load_model(settings), settings.memory, retrieval=settings.retrieval)


def _worker_trial(prompt: PasskeyPrompt, mode: str, variants: tuple[str, ...] | None, overrides: dict):
    assert _WORKER_ENGINE is not None, "the worker was not started"
    return _run_job(_WORKER_ENGINE, prompt, mode, variants, overrides)


def _save(out: Path, trials: list[dict], filler: str, overrides: dict) -> None:
    write_json(
        out, {"bench": "passkey", "filler": filler, "overrides": overrides, "machine": machine_info(), "trials": trials}
    )


def _arms(trials: list[dict], modes: list[str]) -> list[str]:
    """The arms of ``modes`` that ``trials`` hold, in the order of ``modes``, then of first appearance."""
    return [a for mode in modes for a in dict.fromkeys(arm(t) for t in trials if t["mode"] == mode)]


def summarize(trials: list[dict], modes: list[str], lengths: list[int]) -> list[dict]:
    rows = []
    for name in _arms(trials, modes):
        for length in lengths:
            got = [t for t in trials if arm(t) == name and t["length"] == length]
            if got:
                rows.append(
                    {
                        "mode": name,
                        "length": length,
                        "trials": len(got),
                        "accuracy": sum(t["passed"] for t in got) / len(got),
                        "s/trial": sum(t["seconds"] for t in got) / len(got),
                        # a resumed file may mix machines, and bfloat16 answers differ between CPUs
                        "ran on": " + ".join(sorted({t.get("ran_on", UNRECORDED) for t in got})),
                    }
                )
    return rows


def plot(trials: list[dict], modes: list[str], lengths: list[int], depths: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = _arms(trials, modes)
    if not arms:
        return
    cols = min(4, len(arms))  # arms wrap onto rows of four panels
    rows = -(-len(arms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.5 * rows), squeeze=False, layout="constrained")
    for ax in axes.ravel()[len(arms) :]:
        ax.set_visible(False)
    for ax, name in zip(axes.ravel(), arms, strict=False):
        grid = torch.full((len(depths), len(lengths)), float("nan"))
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                got = [t["passed"] for t in trials if arm(t) == name and t["length"] == n and t["depth"] == d]
                if got:
                    grid[i, j] = sum(got) / len(got)
        im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("length")
        ax.set_ylabel("depth")
        ax.set_title(name.replace(",", ",\n"), fontsize=9)  # one setting per line: long variants stay legible
    fig.colorbar(im, ax=axes.ravel().tolist(), label="accuracy")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_summary(rows: list[dict]) -> None:
    print(format_table(rows))
