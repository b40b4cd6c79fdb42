"""The scheduler: batched jobs produce what they would alone; cancel, errors, tasks, close."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from serving_helpers import prompt

from memllm.sampling import SamplingParams
from memllm.serving import Done, GenerateJob, Scheduler, SchedulerClosed, Token, run_job

# (mode, prompt length, max tokens, stop at the n-th token it would generate or None)
JOBS = [
    ("memory", 5, 30, None),
    ("memory", 100, 25, 6),
    ("window", 70, 40, None),
    ("full", 23, 12, None),
    ("memory", 41, 33, 3),
    ("window", 3, 20, None),
    ("memory", 60, 1, None),
    ("full", 9, 0, None),
]


def _alone(engine, mode, ids, params, stop_ids):
    state = engine.new_state(mode)
    job = GenerateJob(params, stop_ids, ids)
    tokens = [e.id for e in run_job(engine, state, job, ids) if isinstance(e, Token)]
    return tokens, job.finish_reason, list(job.read_ids), state.n_tokens


def _cases(engine):
    cases = []
    for i, (mode, n, max_tokens, stop_at) in enumerate(JOBS):
        ids = prompt(i, n)
        params = SamplingParams(max_tokens=max_tokens)
        stop_ids = frozenset()
        if stop_at is not None:
            stop_ids = frozenset([_alone(engine, mode, ids, params, stop_ids)[0][stop_at]])
        cases.append((mode, ids, params, stop_ids, _alone(engine, mode, ids, params, stop_ids)))
    return cases


async def _consume(handle) -> tuple[list[int], Done]:
    tokens, done = [], None
    async for event in handle:
        if isinstance(event, Token):
            tokens.append(event.id)
        elif isinstance(event, Done):
            done = event
    return tokens, done


@pytest.mark.parametrize("max_batch", [16, 3])
async def test_concurrent_jobs_produce_what_they_produce_alone(engine, max_batch):
    cases = _cases(engine)
    firsts: list[float] = []
    sched = Scheduler(engine, max_batch=max_batch, prefill_budget=16, on_first_token=firsts.append)
    try:
        jobs, states, handles = [], [], []
        for mode, ids, params, stop_ids, _ in cases:
            job, state = GenerateJob(params, stop_ids, ids), engine.new_state(mode)
            jobs.append(job)
            states.append(state)
            handles.append(sched.submit(job, state, ids))
        results = await asyncio.gather(*(_consume(h) for h in handles))
        for (_, ids, _, _, want), job, state, (tokens, done) in zip(cases, jobs, states, results, strict=True):
            assert (tokens, job.finish_reason, job.read_ids, state.n_tokens) == want
            assert done.finish_reason == state.finish_reason == job.finish_reason
            assert (done.prompt_tokens, done.completion_tokens) == (len(ids), len(tokens))
        assert {job.finish_reason for job in jobs} == {"stop", "length"}
        stats = sched.stats()
        assert stats.completed == len(cases) and stats.failed == stats.cancelled == 0
        assert stats.tokens_generated == sum(len(t) for t, _ in results)
        assert stats.queued == stats.running == stats.prefilling == 0
        assert len(firsts) == stats.ttft_count == sum(1 for t, _ in results if t)
    finally:
        await sched.close()


async def test_cancel_stops_a_job_and_the_others_finish(engine):
    params = SamplingParams(max_tokens=60)
    sched = Scheduler(engine, max_batch=2)
    try:
        ids = [prompt(10 + i, 20) for i in range(3)]
        states = [engine.new_state("memory") for _ in ids]
        jobs = [GenerateJob(params, (), p) for p in ids]
        handles = [sched.submit(j, s, p) for j, s, p in zip(jobs, states, ids, strict=True)]
        handles[2].cancel()  # still queued (max_batch=2): never starts
        seen = 0
        async for event in handles[0]:
            seen += isinstance(event, Token)
            if seen == 3:
                await handles[0].aclose()  # a client that went away
                break
        assert handles[0].released and handles[0].done.finish_reason == "cancelled"
        assert states[0].finish_reason is None
        # the state holds exactly the prompt and the tokens read (consistent at step boundaries)
        assert states[0].n_tokens == len(ids[0]) + len(jobs[0].read_ids) < len(ids[0]) + 60
        tokens, done = await _consume(handles[1])
        assert done.finish_reason == "length" and len(tokens) == 60
        assert tokens == _alone(engine, "memory", ids[1], params, frozenset())[0]
        assert (await handles[2].result()).finish_reason == "cancelled" and states[2].n_tokens == 0
        assert sched.stats().cancelled == 2
    finally:
        await sched.close()


async def test_a_close_cancelled_while_it_waits_leaves_the_model_thread_running(engine):
    """A request task cancelled inside ``aclose`` (a client that went away twice over) must not
    cancel the release future the model thread completes: the scheduler keeps serving."""
    params = SamplingParams(max_tokens=200)
    sched = Scheduler(engine, max_batch=2)
    try:
        ids = prompt(30, 20)
        handle = sched.submit(GenerateJob(params, (), ids), engine.new_state("memory"), ids)
        async for event in handle:
            if isinstance(event, Token):
                break
        closing = asyncio.ensure_future(handle.aclose())
        await asyncio.sleep(0)  # inside aclose, waiting for the model thread
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        for _ in range(200):
            if handle.released:
                break
            await asyncio.sleep(0.01)
        assert handle.released and handle.done is not None and handle.done.finish_reason == "cancelled"
        short = SamplingParams(max_tokens=4)
        other = sched.submit(GenerateJob(short, (), ids), engine.new_state("memory"), ids)
        tokens, done = await _consume(other)  # the model thread is alive
        assert done.finish_reason == "length" and len(tokens) == 4
    finally:
        await sched.close()


async def test_an_exception_fails_only_its_own_job(engine):
    params = SamplingParams(max_tokens=15)

    def explode(token: int) -> None:
        if len(bad.generated) == 2:
            raise RuntimeError("callback broke")

    class BrokenMemory:
        def num_blocks(self) -> int:
            return 1

        def search(self, layer, queries, k):
            raise OSError("disk gone")

    sched = Scheduler(engine)
    try:
        ids = [prompt(20 + i, 30) for i in range(4)]
        bad = GenerateJob(params, (), ids[0], on_token=explode)
        broken_state = engine.new_state("memory")
        h_bad = sched.submit(bad, engine.new_state("memory"), ids[0])
        h_empty = sched.submit(GenerateJob(params, ()), engine.new_state("memory"), [])
        h_good = sched.submit(GenerateJob(params, (), ids[2]), engine.new_state("memory"), ids[2])
        await sched.run(engine.prefill, broken_state, ids[3])
        broken_state.memory = BrokenMemory()
        h_broken = sched.submit(GenerateJob(params, ()), broken_state, [], logits=torch.zeros(512))
        with pytest.raises(RuntimeError, match="callback broke"):
            await _consume(h_bad)
        with pytest.raises(ValueError, match="empty"):
            await _consume(h_empty)
        with pytest.raises(OSError, match="disk gone"):
            await _consume(h_broken)
        tokens, done = await _consume(h_good)
        assert tokens == _alone(engine, "memory", ids[2], params, frozenset())[0] and done.finish_reason == "length"
        assert sched.stats().failed == 3
        with pytest.raises(ZeroDivisionError):
            await sched.run(lambda: 1 / 0)
        assert await sched.run(lambda: threading.current_thread().name) == "memllm-model"
    finally:
        await sched.close()


async def test_a_long_task_lets_running_streams_advance_at_checkpoints(engine):
    sched = Scheduler(engine)
    try:
        handle = sched.submit(GenerateJob(SamplingParams(max_tokens=400), ()), engine.new_state("window"), prompt(1, 8))
        async for event in handle:
            if isinstance(event, Token):
                break

        def long_prefill() -> int:
            before = sched.stats().steps
            engine.prefill(engine.new_state("memory"), prompt(2, 160), progress=lambda n: sched.checkpoint())
            return sched.stats().steps - before

        assert await sched.run(long_prefill) >= 5  # one decode step per 16-token chunk
        await handle.aclose()
    finally:
        await sched.close()


async def test_a_newcomer_reads_its_prompt_in_the_running_streams_forwards(engine):
    """While a 160-token prompt is read (ten 16-token chunks, one per round with this budget), the
    running stream decodes a token in each of those forwards: ten forwards, not twenty (plus the
    voting pass of the prompt's question, ``final_consensus``, which reads that chunk alone)."""
    sched = Scheduler(engine, prefill_budget=16)
    forwards = 0
    real_forward = engine.model.forward

    def counting_forward(*args, **kwargs):
        nonlocal forwards
        forwards += 1
        return real_forward(*args, **kwargs)

    try:
        running = sched.submit(
            GenerateJob(SamplingParams(max_tokens=400), ()), engine.new_state("window"), prompt(1, 9)
        )
        async for event in running:
            if isinstance(event, Token):
                break
        engine.model.forward = counting_forward
        before = sched.stats().steps
        job = GenerateJob(SamplingParams(max_tokens=1), ())
        newcomer = sched.submit(job, engine.new_state("memory"), prompt(2, 160))
        tokens, done = await _consume(newcomer)
        del engine.model.forward
        assert len(tokens) == 1 and done.finish_reason == "length"
        decoded = sched.stats().steps - before
        assert decoded >= 10, "the running stream advanced in every forward that read a chunk"
        voting = 1 if engine.memory_settings.final_consensus else 0  # the question's voting pass (its own forward)
        assert forwards <= decoded + 1 + voting, (forwards, decoded)
        await running.aclose()
    finally:
        engine.model.__dict__.pop("forward", None)
        await sched.close()


def test_worker_threads_use_it_synchronously(engine):
    sched = Scheduler(engine)
    try:
        ids = prompt(5, 12)
        params = SamplingParams(max_tokens=8)
        out: list = []
        worker = threading.Thread(
            target=lambda: out.extend(sched.submit(GenerateJob(params, (), ids), engine.new_state("window"), ids))
        )
        worker.start()
        worker.join(60)
        assert [e.id for e in out if isinstance(e, Token)] == _alone(engine, "window", ids, params, frozenset())[0]
        assert isinstance(out[-1], Done)
        assert sched.run_sync(lambda: 42) == 42
    finally:
        sched.close_sync()


async def test_close_fails_unfinished_work_and_refuses_new(engine):
    sched = Scheduler(engine)
    handle = sched.submit(GenerateJob(SamplingParams(max_tokens=10_000), ()), engine.new_state("window"), prompt(1, 8))
    async for event in handle:
        if isinstance(event, Token):
            break
    await sched.close()
    with pytest.raises(SchedulerClosed):
        await _consume(handle)
    assert handle.released
    with pytest.raises(SchedulerClosed):
        sched.submit(GenerateJob(SamplingParams(), ()), engine.new_state("window"), [1])
    with pytest.raises(SchedulerClosed):
        await sched.run(lambda: None)
