"""Serving many streams on one model: batched decode steps, per-stream jobs, the scheduler.

* :mod:`memllm.serving.batch`: ``decode_step`` reads one token into each of B attention states in
  one forward (the weights are read once for all of them); ``packed_step`` also reads prompt
  chunks of other states in that forward.
* :mod:`memllm.serving.jobs`: what a stream does with each logits vector (sampling, stop ids, stop
  strings, closing the turn), as a state machine; ``run_job`` drives one on this thread.
* :mod:`memllm.serving.scheduler`: continuous batching on one model thread, for asyncio callers.
"""

from memllm.serving.batch import BatchedAttention, decode_step, packed_step
from memllm.serving.jobs import GenerateJob, Job, Text, Token, run_job
from memllm.serving.scheduler import Done, JobHandle, Scheduler, SchedulerClosed, SchedulerStats

__all__ = [
    "BatchedAttention",
    "Done",
    "GenerateJob",
    "Job",
    "JobHandle",
    "Scheduler",
    "SchedulerClosed",
    "SchedulerStats",
    "Text",
    "Token",
    "decode_step",
    "packed_step",
    "run_job",
]
