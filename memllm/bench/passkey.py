"""``memllm bench passkey``: the passkey retrieval protocol (Landmark Attention / InfLLM / LongLLaMA).

Prompt (raw, no chat template), lines joined by newlines: the instruction line, filler, the needle
``The pass key is K. Remember it. K is the pass key.`` at a chosen depth, more filler, and
``What is the pass key? The pass key is``. K is a random 5-digit number; a trial passes when the
first integer of the greedy continuation equals K. Filler: the grass/sky/sun sentences, or Paul
Graham essays (harder: natural text competes with the needle).

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

from memllm.bench.common import essays_text, format_table, machine_info, write_json
from memllm.engine import Engine
from memllm.sampling import SamplingParams

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
GRASS = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"


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
    other depth (docs/RESULTS.md, session 12).
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


def first_integer(text: str) -> int | None:
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


def run_trial(engine: Engine, prompt: PasskeyPrompt, mode: str, max_tokens: int = 8, **overrides) -> dict:
    state = engine.new_state(mode, **overrides)
    t0 = time.perf_counter()
    tokens = list(engine.generate(state, prompt.ids, SamplingParams(max_tokens=max_tokens)))
    elapsed = time.perf_counter() - t0
    answer = engine.tokenizer.decode(tokens, skip_special_tokens=True)
    return {"answer": answer, "passed": first_integer(answer) == prompt.key, "seconds": elapsed}


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
    **overrides,
) -> list[dict]:
    """Run (or resume) the grid; returns one summary row per (mode, length).

    ``workers`` > 1 runs trials in that many processes, each loading the configured model (the
    ``MEMLLM_*`` settings, not ``engine``) with ``threads // workers`` threads; ``engine`` then only
    builds the prompts. Keys, prompts and answers are those of a one-process run.
    """
    done: list[dict] = []
    if out.exists():
        done = json.loads(out.read_text()).get("trials", [])
    seen = {(r["mode"], r["length"], r["depth"], r["trial"]) for r in done}
    max_len = engine.model.config.max_positions
    jobs = [
        (mode, length, depth, trial)
        for length in lengths
        for trial in range(trials)
        for depth in depths
        for mode in modes
        if (mode, length, depth, trial) not in seen and not (mode == "full" and length > max_len)
    ]
    keys = {
        (length, depth, trial): trial_key(seed, length, depth, trial)
        for length in lengths
        for depth in depths
        for trial in range(trials)
    }

    def prompt(job: tuple) -> PasskeyPrompt:
        _, length, depth, trial = job
        return build_prompt(engine, length, depth, keys[(length, depth, trial)], filler, offset=trial * 7919)

    bar = tqdm(total=len(jobs), desc=f"passkey ({filler})", unit="trial")
    for (mode, length, depth, trial), result in _trial_results(engine, jobs, prompt, workers, overrides):
        key = keys[(length, depth, trial)]
        done.append({"mode": mode, "length": length, "depth": depth, "trial": trial, "key": key, **result})
        bar.update()
        bar.set_postfix(mode=mode, length=length, ok=result["passed"])
        _save(out, done, filler, overrides)
    bar.close()
    rows = summarize(done, modes, lengths)
    plot(done, modes, lengths, depths, out.with_suffix(".png"))
    return rows


def _trial_results(
    engine: Engine, jobs: list[tuple], prompt: Callable[[tuple], PasskeyPrompt], workers: int, overrides: dict
) -> Iterator[tuple[tuple, dict]]:
    """(job, result) for every (mode, length, depth, trial) job, in order of completion. In one
    process each prompt is built when its trial starts; with workers, all are built and queued."""
    if workers <= 1:
        for job in jobs:
            yield job, run_trial(engine, prompt(job), job[0], **overrides)
        return
    threads = max(1, torch.get_num_threads() // workers)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch thread pool forked mid-use
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(threads,))
    try:
        futures = {}
        for job in jobs:
            p = prompt(job)
            futures[pool.submit(_worker_trial, p.ids, p.key, job[0], overrides)] = job
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


def _worker_trial(ids: list[int], key: int, mode: str, overrides: dict) -> dict:
    assert _WORKER_ENGINE is not None, "the worker was not started"
    return run_trial(_WORKER_ENGINE, PasskeyPrompt(ids=ids, key=key, needle_span=(0, 0)), mode, **overrides)


def _save(out: Path, trials: list[dict], filler: str, overrides: dict) -> None:
    write_json(
        out, {"bench": "passkey", "filler": filler, "overrides": overrides, "machine": machine_info(), "trials": trials}
    )


def summarize(trials: list[dict], modes: list[str], lengths: list[int]) -> list[dict]:
    rows = []
    for mode in modes:
        for length in lengths:
            got = [t for t in trials if t["mode"] == mode and t["length"] == length]
            if got:
                rows.append(
                    {
                        "mode": mode,
                        "length": length,
                        "trials": len(got),
                        "accuracy": sum(t["passed"] for t in got) / len(got),
                        "s/trial": sum(t["seconds"] for t in got) / len(got),
                    }
                )
    return rows


def plot(trials: list[dict], modes: list[str], lengths: list[int], depths: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(modes), figsize=(4 * len(modes), 3.5), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        grid = torch.full((len(depths), len(lengths)), float("nan"))
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                got = [t["passed"] for t in trials if t["mode"] == mode and t["length"] == n and t["depth"] == d]
                if got:
                    grid[i, j] = sum(got) / len(got)
        im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("length")
        ax.set_ylabel("depth")
        ax.set_title(mode)
    fig.colorbar(im, ax=axes.ravel().tolist())
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_summary(rows: list[dict]) -> None:
    print(format_table(rows))
