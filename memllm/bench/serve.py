"""``memllm bench serve``: drive a running server with N concurrent streaming clients.

For each client count N (``--clients 1,2,4,8,16``), N clients each send ``--requests`` streamed
``POST /v1/completions`` one after the other (``temperature: 0``, ``max_tokens``,
``stream_options: {include_usage: true}``), so N streams are in flight at once. The prompts are
story openings that make the model write on; a stream may still end early at the end-of-text
token (the tokens are counted from each stream's final usage chunk) unless ``--ignore-eos`` asks
every request to decode exactly ``max_tokens`` (the in-process ``bench batch`` protocol).
``--repeats R`` runs the whole sweep R times on the same server; each round's speedups are
against that round's 1-client figure, and the summary is the median over rounds (the 1-client
baseline is the noisiest figure on a shared machine). Per request: time to first token (request sent -> first text) and
decode time (first text -> last text). Per N:

- ``agg_decode_tok_s``: decode tokens of all requests (completion tokens minus the first) over
  the wall time during which at least one stream was decoding (the union of the decode intervals);
- ``stream_tok_s``: the median decode speed of one stream;
- ``ttft_p50_s`` / ``ttft_p95_s``; ``speedup``: ``agg_decode_tok_s`` over the 1-client figure;
- ``mean_batch``: the mean of the server's ``memllm_scheduler_batch_size`` gauge (streams in the
  last decode step), sampled from ``/metrics`` while streams decode (blank if the server has none).

Without ``--url`` it starts its own ``memllm serve`` on a free loopback port, in a temporary data
dir whose ``models`` folder links to the configured data dir's (no second model conversion).
:class:`memllm_api.local_server.LocalServer` is that start/stop logic (the API tests use it too).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from memllm_api.local_server import LocalServer

STORY_OPENINGS = (
    "It was a cold morning in the harbour town when the old fisherman found a sealed bottle on the beach.",
    "The letter arrived on a Tuesday, written in a hand that Clara had not seen for twenty years.",
    "Nobody in the village remembered who had built the stone tower on the hill, or why.",
    "The train stopped in the middle of the forest, and the conductor walked slowly down the aisle.",
    "On the first day of the expedition, the map turned out to be wrong in a very interesting way.",
    "The robot had been cleaning the same library for three hundred years when the door finally opened.",
    "Every night at midnight the lighthouse keeper wrote one page of his journal, and this is the last one.",
    "The market was loud and bright, and in the middle of it sat a girl selling maps of places that did not exist.",
)
FILLER = (
    "The weather had been strange all season, and the people of the valley talked about little else. "
    "Farmers watched the sky, merchants counted their stock, and children ran along the river banks "
    "collecting smooth stones and telling each other stories about the mountains beyond the pass. "
)


def start_server(max_batch: int = 16, max_output_tokens: int = 2048) -> LocalServer:
    """A started :class:`LocalServer` for benchmarking: the caller's settings (``MEMLLM_*``), a
    temporary data dir sharing the configured model cache, no demo KB, no rate limit."""
    from memllm.settings import get_settings

    env = {
        "MEMLLM_API_RATE_LIMIT_PER_MINUTE": "0",
        "MEMLLM_API_MAX_BATCH": str(max_batch),
        "MEMLLM_API_MAX_OUTPUT_TOKENS": str(max_output_tokens),
    }
    server = LocalServer(
        models_dir=get_settings().data_dir / "models", env=env, args=("--no-demo",), inherit_memllm_env=True
    )
    return server.start()


# --------------------------------------------------------------------------------- measuring
def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation; nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals (overlaps counted once)."""
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def make_prompt(index: int, prompt_tokens: int) -> str:
    """A story opening (varied by ``index``) grown to about ``prompt_tokens`` tokens, ending where
    the model goes on writing."""
    opening = STORY_OPENINGS[index % len(STORY_OPENINGS)]
    words = FILLER.split()
    target_words = max(0, int(prompt_tokens * 0.86) - len(opening.split()) - 12)
    filler = " ".join(words[i % len(words)] for i in range(target_words))
    return f"Chapter {index + 1}\n\n{filler}\n\n{opening} This is the long story of what happened next.\n\n"


@dataclass
class RequestResult:
    ttft_s: float
    decode_s: float
    completion_tokens: int
    prompt_tokens: int
    first_at: float  # monotonic time of the first text
    last_at: float  # monotonic time of the last text
    finish_reason: str | None = None

    @property
    def decode_tokens(self) -> int:
        return max(0, self.completion_tokens - 1)


@dataclass
class PhaseResult:
    clients: int
    requests: list[RequestResult] = field(default_factory=list)
    wall_s: float = 0.0
    batch_samples: list[float] = field(default_factory=list)
    metrics_delta: dict[str, float] = field(default_factory=dict)


async def stream_completion(
    client, model: str, prompt: str, max_tokens: int, ignore_eos: bool = False
) -> RequestResult:
    """One streamed ``/v1/completions`` request, timed."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    t0 = time.monotonic()
    first = last = None
    usage = None
    finish = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if not 200 <= r.status_code < 300:
            await r.aread()
            raise RuntimeError(f"POST /v1/completions answered {r.status_code}: {r.text[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            frame = json.loads(payload)
            if "error" in frame:
                raise RuntimeError(f"the stream failed: {frame['error']}")
            if frame.get("usage"):
                usage = frame["usage"]
            for choice in frame.get("choices") or []:
                if choice.get("text"):
                    now = time.monotonic()
                    first = first if first is not None else now
                    last = now
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
    if usage is None:
        raise RuntimeError("the stream had no usage chunk (stream_options.include_usage)")
    if first is None:
        first = last = time.monotonic()
    return RequestResult(
        ttft_s=first - t0,
        decode_s=last - first,
        completion_tokens=int(usage.get("completion_tokens", 0)),
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        first_at=first,
        last_at=last,
        finish_reason=finish,
    )


METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfINFNa]+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name: value}, labelled series summed per metric name."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = METRIC_LINE.match(line)
        if m:
            try:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
            except ValueError:
                continue
    return out


async def read_metrics(client) -> dict[str, float] | None:
    try:
        r = await client.get("/metrics")
    except Exception:
        return None
    return parse_metrics(r.text) if r.status_code == 200 else None


REPORTED_METRICS = (
    "memllm_generated_tokens_total",
    "memllm_prompt_tokens_total",
    "memllm_time_to_first_token_seconds_sum",
    "memllm_time_to_first_token_seconds_count",
)


async def run_phase(
    client,
    model: str,
    clients: int,
    requests_per_client: int,
    max_tokens: int,
    prompt_tokens: int,
    sample_every_s: float = 0.25,
    ignore_eos: bool = False,
) -> PhaseResult:
    phase = PhaseResult(clients)
    before = await read_metrics(client)

    async def one_client(c: int) -> list[RequestResult]:
        out = []
        for k in range(requests_per_client):
            prompt = make_prompt(c * requests_per_client + k, prompt_tokens)
            out.append(await stream_completion(client, model, prompt, max_tokens, ignore_eos))
        return out

    done = asyncio.Event()

    async def sampler() -> None:
        while not done.is_set():
            m = await read_metrics(client)
            if m is not None and "memllm_scheduler_batch_size" in m and m["memllm_scheduler_batch_size"] > 0:
                phase.batch_samples.append(m["memllm_scheduler_batch_size"])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), sample_every_s)

    sampling = asyncio.create_task(sampler())
    t0 = time.monotonic()
    try:
        results = await asyncio.gather(*(one_client(c) for c in range(clients)))
    finally:
        phase.wall_s = time.monotonic() - t0
        done.set()
        await sampling
    phase.requests = [r for rs in results for r in rs]
    after = await read_metrics(client)
    if before is not None and after is not None:
        phase.metrics_delta = {k: after[k] - before.get(k, 0.0) for k in REPORTED_METRICS if k in after}
    return phase


def phase_row(phase: PhaseResult, base_agg: float | None) -> dict[str, Any]:
    reqs = phase.requests
    decode_tokens = sum(r.decode_tokens for r in reqs)
    decode_wall = union_length([(r.first_at, r.last_at) for r in reqs])
    agg = decode_tokens / decode_wall if decode_wall > 0 else math.nan
    per_stream = [r.decode_tokens / r.decode_s for r in reqs if r.decode_s > 0 and r.decode_tokens > 0]
    ttft = [r.ttft_s for r in reqs]
    row: dict[str, Any] = {
        "clients": phase.clients,
        "requests": len(reqs),
        "completion_tokens": sum(r.completion_tokens for r in reqs),
        "prompt_tokens": round(statistics.mean(r.prompt_tokens for r in reqs)) if reqs else 0,
        "agg_decode_tok_s": agg,
        "stream_tok_s": statistics.median(per_stream) if per_stream else math.nan,
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p95_s": percentile(ttft, 0.95),
        "throughput_tok_s": sum(r.completion_tokens for r in reqs) / phase.wall_s if phase.wall_s > 0 else math.nan,
        "speedup": agg / base_agg if base_agg else math.nan,
        "mean_batch": statistics.mean(phase.batch_samples) if phase.batch_samples else "",
    }
    return row


COLUMNS = (
    "round",
    "clients",
    "requests",
    "completion_tokens",
    "agg_decode_tok_s",
    "stream_tok_s",
    "ttft_p50_s",
    "ttft_p95_s",
    "throughput_tok_s",
    "speedup",
    "mean_batch",
)


async def measure(
    url: str,
    clients: list[int],
    max_tokens: int,
    prompt_tokens: int,
    requests_per_client: int,
    api_key: str | None = None,
    log=print,
    ignore_eos: bool = False,
    repeats: int = 1,
) -> dict[str, Any]:
    import httpx

    from memllm.bench.common import format_table

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(clients) + 8, max_keepalive_connections=max(clients) + 8)
    timeout = httpx.Timeout(600.0, connect=30.0)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout) as client:
        r = await client.get("/v1/models")
        r.raise_for_status()
        model = r.json()["data"][0]["id"]
        log(f"server {url}: model {model}")
        await stream_completion(client, model, make_prompt(0, prompt_tokens), min(8, max_tokens))  # warm-up
        rows, phases = [], []
        for round_ in range(1, repeats + 1):
            base = None  # this round's 1-client figure, once measured
            for n in sorted(set(clients)):
                phase = await run_phase(
                    client, model, n, requests_per_client, max_tokens, prompt_tokens, ignore_eos=ignore_eos
                )
                row = {"round": round_, **phase_row(phase, base)}
                if n == 1:
                    base = row["agg_decode_tok_s"]
                    row["speedup"] = 1.0
                rows.append(row)
                phases.append(phase)
                log(format_table([row], COLUMNS))
    return {
        "url": url,
        "model": model,
        "max_tokens": max_tokens,
        "prompt_tokens": prompt_tokens,
        "requests_per_client": requests_per_client,
        "ignore_eos": ignore_eos,
        "repeats": repeats,
        "rows": rows,
        "summary": summarize(rows),
        "phases": [
            {
                "clients": p.clients,
                "wall_s": p.wall_s,
                "batch_samples": p.batch_samples,
                "metrics_delta": p.metrics_delta,
                "requests": [
                    {
                        "ttft_s": q.ttft_s,
                        "decode_s": q.decode_s,
                        "completion_tokens": q.completion_tokens,
                        "prompt_tokens": q.prompt_tokens,
                        "finish_reason": q.finish_reason,
                    }
                    for q in p.requests
                ],
            }
            for p in phases
        ],
    }


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per client count: the median over rounds of the aggregate decode tok/s and of the speedup
    (each round's speedup is against its own 1-client figure)."""
    out = []
    for n in sorted({r["clients"] for r in rows}):
        mine = [r for r in rows if r["clients"] == n]
        speedups = [r["speedup"] for r in mine if isinstance(r["speedup"], float) and not math.isnan(r["speedup"])]
        out.append(
            {
                "clients": n,
                "rounds": len(mine),
                "agg_decode_tok_s": statistics.median(r["agg_decode_tok_s"] for r in mine),
                "speedup": statistics.median(speedups) if speedups else math.nan,
                "speedups": [round(x, 2) for x in speedups],
            }
        )
    return out


def parse_clients(spec: str) -> list[int]:
    out = [int(p) for p in spec.split(",") if p.strip()]
    if not out or any(n < 1 for n in out):
        raise click.BadParameter("give client counts >= 1, e.g. 1,2,4,8", param_hint="--clients")
    return out


@click.command("serve")
@click.option("--url", default=None, help="a running server (default: start one on a free loopback port)")
@click.option("--clients", default="1,2,4,8,16", show_default=True, help="concurrent client counts")
@click.option("--max-tokens", default=64, show_default=True, help="max_tokens of each request")
@click.option("--prompt-tokens", default=128, show_default=True, help="approximate prompt length")
@click.option("--requests", "requests_per_client", default=3, show_default=True, help="requests per client")
@click.option("--ignore-eos", is_flag=True, help="every request decodes exactly --max-tokens (as bench batch)")
@click.option("--repeats", default=1, show_default=True, help="rounds of the whole sweep (median speedup)")
@click.option("--api-key", envvar="MEMLLM_BENCH_API_KEY", default=None, help="bearer key (MEMLLM_BENCH_API_KEY)")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="write the results here")
def bench_serve(
    url, clients, max_tokens, prompt_tokens, requests_per_client, ignore_eos, repeats, api_key, json_path
) -> None:
    """Continuous batching: aggregate decode tokens/s of N concurrent streaming clients."""
    from memllm.bench.common import format_table, machine_info, write_json
    from memllm.cli_common import CliError

    try:
        import httpx  # noqa: F401
    except ImportError:
        raise CliError("memllm bench serve needs httpx (pip install httpx)") from None
    counts = parse_clients(clients)
    if requests_per_client < 1 or max_tokens < 1 or repeats < 1:
        raise CliError("--requests, --max-tokens and --repeats must be at least 1")
    server = None
    if url is None:
        click.echo("starting memllm serve on a free loopback port ...", err=True)
        try:
            server = start_server(max_batch=max(16, max(counts)), max_output_tokens=max(2048, max_tokens))
        except RuntimeError as exc:
            raise CliError(str(exc)) from None
        url = server.url
    try:
        result = asyncio.run(
            measure(
                url.rstrip("/"),
                counts,
                max_tokens,
                prompt_tokens,
                requests_per_client,
                api_key,
                log=lambda s: click.echo(s, err=True),
                ignore_eos=ignore_eos,
                repeats=repeats,
            )
        )
    except Exception as exc:
        detail = f"\nserver log:\n{server.log()}" if server is not None else ""
        raise CliError(f"{type(exc).__name__}: {exc}{detail}") from exc
    finally:
        if server is not None:
            server.stop()
    click.echo("\n" + format_table(result["rows"], COLUMNS))
    summary = {r["clients"]: r for r in result["summary"]}
    if 1 in summary and len(summary) > 1:
        top = summary[max(summary)]
        rounds = f" (median of {top['rounds']} rounds: {top['speedups']})" if top["rounds"] > 1 else ""
        click.echo(f"{top['clients']} clients: {top['speedup']:.2f}x the aggregate decode tokens/s of 1 client{rounds}")
    if json_path is not None:
        machine = {**machine_info(), "loadavg": os.getloadavg()}  # of this machine (the server's, if local)
        write_json(json_path, {"bench": "serve", "machine": machine, **result})
        click.echo(f"wrote {json_path}")
