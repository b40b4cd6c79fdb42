"""The ``memllm`` command line. Errors print as one line (``memllm: error: ...``), exit code 1."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from memllm.cli_common import CliError, _engine, _sampling, friendly_errors, sampling_options
from memllm.settings import get_settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="log details (and show tracebacks)")
def cli(verbose: bool) -> None:
    """memllm: a language model that attends over kNN-retrieved memory of everything it has read."""
    level = logging.DEBUG if verbose else getattr(logging, get_settings().log_level.upper(), logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@click.argument("prompt")
@click.option("--raw", is_flag=True, help="no chat template: continue the text as given")
@click.option("--mode", type=click.Choice(["memory", "window", "full"]), default=None, help="attention mode")
@sampling_options
@friendly_errors
def generate(prompt: str, raw: bool, mode: str | None, **sampling) -> None:
    """Stream the model's answer to PROMPT ("-" reads it from stdin)."""
    from memllm.textstream import TextStream

    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise CliError("the prompt is empty")
    engine = _engine()
    params = _sampling(**sampling)
    ids = engine.encode(prompt) if raw else engine.chat_ids([{"role": "user", "content": prompt}])
    stream = TextStream(engine.tokenizer, params.stop)
    for token in engine.generate(engine.new_state(mode), ids, params):
        click.echo(stream.push(token), nl=False)
        if stream.stopped:
            break
    click.echo(stream.finish())


@cli.command()
@friendly_errors
def info() -> None:
    """Model, dtype, threads, data directory and settings."""
    import dataclasses

    import torch

    from memllm.loading import load_model

    settings = get_settings()
    loaded = load_model(settings)
    cfg = loaded.config
    click.echo(f"model         {loaded.name} ({loaded.path})")
    click.echo(
        f"architecture  {loaded.hf_config.model_type}: {cfg.n_layers} layers, {cfg.n_heads} heads "
        f"({cfg.n_kv_heads} kv), head dim {cfg.head_dim}, hidden {cfg.dim}, {cfg.max_positions} positions"
    )
    params = sum(p.numel() for p in loaded.model.parameters())
    click.echo(f"parameters    {params / 1e6:.1f} M")
    click.echo(f"dtype         {loaded.dtype} (setting: {settings.dtype})")
    click.echo(f"threads       {torch.get_num_threads()}")
    click.echo(f"data dir      {settings.data_dir}")
    click.echo(f"database      {settings.resolved_database_url}")
    click.echo(f"chat          {settings.chat_max_live} live sessions in memory, {settings.chat_spill} on disk")
    for f in dataclasses.fields(settings.memory):
        click.echo(f"memory.{f.name:<20} {getattr(settings.memory, f.name)}")


@cli.group()
def bench() -> None:
    """Benchmarks (print tables, write JSON under --out)."""


@bench.command("speed")
@click.option("--context", default="512,2048,8192", show_default=True, help="context lengths (k suffix ok)")
@click.option("--decode-tokens", default=32, show_default=True)
@click.option("--mode", type=click.Choice(["full", "window", "memory"]), default="full", show_default=True)
@click.option("--no-hf", is_flag=True, help="skip the transformers reference")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench-results/speed.json"), show_default=True)
@friendly_errors
def bench_speed(context: str, decode_tokens: int, mode: str, no_hf: bool, out: Path) -> None:
    """Prefill and decode tokens/s, ours vs transformers, side by side in one run."""
    from memllm.bench import speed
    from memllm.bench.common import format_table, parse_sizes

    rows = speed.run(_engine(), parse_sizes(context), decode_tokens, mode, out, with_hf=not no_hf)
    click.echo("\n" + format_table(rows))
    click.echo(f"wrote {out}")


@bench.command("batch")
@click.option("--streams", default="1,2,4,8,16", show_default=True, help="concurrent stream counts")
@click.option("--max-tokens", default=64, show_default=True, help="tokens each stream decodes")
@click.option("--mode", type=click.Choice(["full", "window", "memory"]), default=None, help="default: the settings'")
@click.option("--threads", type=int, default=None, help="model thread's intra-op threads (default: torch's)")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench-results/batch.json"), show_default=True)
@friendly_errors
def bench_batch(streams: str, max_tokens: int, mode: str | None, threads: int | None, out: Path) -> None:
    """Aggregate decode tokens/s of concurrent streams batched by the scheduler (continuous batching)."""
    import dataclasses

    import torch

    from memllm.bench import batch
    from memllm.bench.common import format_table, parse_sizes

    settings = get_settings()
    threads = threads or settings.threads or torch.get_num_threads()
    torch.set_num_threads(1)  # as a server should: only the model thread runs a multi-threaded team
    engine = _engine(dataclasses.replace(settings, threads=0))
    rows = batch.run(engine, parse_sizes(streams), max_tokens, mode, out, threads=threads)
    click.echo("\n" + format_table(rows))
    click.echo(f"wrote {out}")


@bench.command("structured")
@click.option("--libraries", default="llguidance,xgrammar,outlines-core", show_default=True)
@click.option("--tokens", default=400, show_default=True, help="constrained tokens timed per library and grammar")
@click.option("--threads", type=int, default=None, help="model thread's intra-op threads (default: torch's)")
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("bench-results/structured.json"), show_default=True
)
@friendly_errors
def bench_structured(libraries: str, tokens: int, threads: int | None, out: Path) -> None:
    """Per-token grammar mask cost (constrained decoding) vs a decode step at 1 and 8 streams."""
    import dataclasses

    import torch

    from memllm.bench import structured
    from memllm.bench.common import format_table

    settings = get_settings()
    threads = threads or settings.threads or torch.get_num_threads()
    torch.set_num_threads(1)  # as a server should: only the model thread runs a multi-threaded team
    engine = _engine(dataclasses.replace(settings, threads=0))
    rows = structured.run(engine, [x.strip() for x in libraries.split(",") if x.strip()], tokens, out, threads)
    click.echo("\n" + format_table(rows))
    click.echo(f"wrote {out}")


def _memory_overrides(sinks, window, top_k, block_size, layers) -> dict:
    from memllm.settings import memory_overrides

    return memory_overrides(sinks=sinks, window=window, top_k=top_k, block_size=block_size, layers=layers)


def memory_options(fn):
    for opt in reversed(
        [
            click.option("--sinks", type=int, default=None, help="override MEMLLM_MEMORY_SINKS"),
            click.option("--window", type=int, default=None, help="override MEMLLM_MEMORY_WINDOW"),
            click.option("--top-k", "top_k", type=int, default=None, help="override MEMLLM_MEMORY_TOP_K"),
            click.option("--block-size", type=int, default=None, help="override MEMLLM_MEMORY_BLOCK_SIZE"),
            click.option("--layers", default=None, help="memory layers, e.g. all or 0-9,20"),
        ]
    ):
        fn = opt(fn)
    return fn


@bench.command("passkey")
@click.option("--lengths", default="8k,16k,32k", show_default=True)
@click.option("--depths", default="0,0.25,0.5,0.75,1", show_default=True)
@click.option("--trials", default=2, show_default=True, help="trials per (length, depth)")
@click.option("--filler", type=click.Choice(["grass", "essays"]), default="grass", show_default=True)
@click.option(
    "--modes",
    default="memory,window",
    show_default=True,
    help="memory,window,full,oracle; oracle = full attention over the sinks, the needle's block and the window "
    "only: what perfect retrieval would hand the model, its ceiling",
)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="JSON (resumed if it exists)")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="trials run in this many processes at once, the threads shared among them (same keys and answers)",
)
@click.option(
    "--variants",
    default=None,
    help="memory mode: answer each trial once per variant from one read of its prompt; variants split by ';', "
    "each the settings of the question and answer, e.g. 'final_retrieval=mean;final_retrieval=heads;top_k=64'; "
    "each is an arm, memory/VARIANT",
)
@memory_options
@friendly_errors
def bench_passkey(lengths, depths, trials, filler, modes, out, workers, variants, **memory) -> None:
    """Passkey retrieval accuracy over lengths x depths, per mode (heatmap PNG beside the JSON)."""
    from memllm.bench import passkey
    from memllm.bench.common import format_table, parse_sizes

    out = out or Path(f"bench-results/passkey-{filler}.json")
    rows = passkey.run(
        _engine(),
        parse_sizes(lengths),
        [float(d) for d in depths.split(",")],
        trials,
        filler,
        [m.strip() for m in modes.split(",")],
        out,
        workers=workers,
        variants=[v.strip() for v in variants.split(";") if v.strip()] if variants else None,
        **_memory_overrides(**memory),
    )
    click.echo("\n" + format_table(rows))
    click.echo(f"wrote {out} and {out.with_suffix('.png')}")


@bench.command("ingest")
@click.option(
    "--data",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="an L-Eval .jsonl file, a folder of .txt files or one text file [default: <eval data>/leval/quality.jsonl]",
)
@click.option("--limit", type=int, default=3, show_default=True, help="first N documents (0 = all)")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench-results/ingest.json"), show_default=True)
@friendly_errors
def bench_ingest(data: Path | None, limit: int, out: Path) -> None:
    """Ingestion tokens/s against the model's raw (full-attention) prefill of the same tokens."""
    from memllm.bench import ingest
    from memllm.bench.common import eval_data_dir, format_table

    path = data or eval_data_dir() / "leval" / "quality.jsonl"
    rows = ingest.run(path, limit or None, out, get_settings(), log=lambda msg: click.echo(msg, err=True))
    click.echo("\n" + format_table(rows))
    click.echo(f"wrote {out}")


@bench.command("ppl")
@click.option("--text", "text_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--tokens", default=65536, show_default=True)
@click.option("--modes", default="memory,window,full", show_default=True)
@click.option("--no-hf", is_flag=True, help="skip transformers' full-attention reference")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench-results/ppl.json"), show_default=True)
@memory_options
@friendly_errors
def bench_ppl(text_path, tokens, modes, no_hf, out, **memory) -> None:
    """Perplexity of each attention mode over the same tokens of a long text."""
    import dataclasses

    from memllm.bench import ppl
    from memllm.bench.common import format_table

    settings = get_settings()
    settings = dataclasses.replace(settings, memory=dataclasses.replace(settings.memory, **_memory_overrides(**memory)))
    rows = ppl.run(_engine(settings), text_path, tokens, [m.strip() for m in modes.split(",")], out, with_hf=not no_hf)
    click.echo("\n" + format_table(rows))
    click.echo(f"wrote {out}")


@bench.command("needle-rank")
@click.option("--length", default="16k", show_default=True)
@click.option("--depth", default=0.5, show_default=True)
@click.option("--filler", type=click.Choice(["grass", "essays"]), default="grass", show_default=True)
@click.option("--key", type=click.IntRange(10000, 99999), default=51234, show_default=True, help="the 5-digit pass key")
@click.option(
    "--trial",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="the filler of this trial of `bench passkey` (with --key, that trial's prompt)",
)
@click.option(
    "--heads",
    default="",
    help="LAYER:HEAD,... (e.g. from `bench retrieval-heads`): add the needle's rank in the one ranking "
    "these heads' summed every-token scores give",
)
@friendly_errors
def bench_needle_rank(length: str, depth: float, filler: str, key: int, trial: int, heads: str) -> None:
    """Rank of the passkey's block at every layer under each retrieval scoring (offline, no generation)."""
    from memllm.bench.common import parse_sizes
    from memllm.bench.needle_rank import needle_ranks, print_rows
    from memllm.memory.retrieval import parse_heads

    chosen = parse_heads(heads) if heads else None
    print_rows(needle_ranks(_engine(), parse_sizes(length)[0], depth, filler, key, trial, heads=chosen))


@bench.command("retrieval-heads")
@click.option("--length", default="2k", show_default=True, help="prompt length (inside the trained range)")
@click.option("--filler", type=click.Choice(["grass", "essays"]), default="essays", show_default=True)
@click.option("--trials", type=click.IntRange(min=1), default=2, show_default=True, help="prompts per depth")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="heads listed")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="JSON: every head's mean needle share")
@friendly_errors
def bench_retrieval_heads(length: str, filler: str, trials: int, top: int, out: Path | None) -> None:
    """The attention heads that look at the passkey when the model answers (full attention, short prompts)."""
    from memllm.bench.common import format_table, machine_info, parse_sizes, write_json
    from memllm.bench.retrieval_heads import calibrate, top_heads
    from memllm.memory.retrieval import format_heads

    size = parse_sizes(length)[0]
    mass = calibrate(_engine(), size, filler, trials)
    rows = top_heads(mass, top)
    click.echo("\n" + format_table(rows))
    click.echo("heads: " + format_heads([(r["layer"], r["head"]) for r in rows]))
    if out is not None:
        result = {"bench": "retrieval-heads", "length": size, "filler": filler, "trials": trials}
        write_json(out, {**result, "machine": machine_info(), "top": rows, "needle_mass": mass.tolist()})
        click.echo(f"wrote {out}")


@bench.command("patterns")
@click.option("--text", "text_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--tokens", default=32768, show_default=True)
@click.option("--patterns", default=None, help="comma list (default: all)")
@click.option("--lengths", default=None, help="lengths to time (default: tokens/8 .. tokens)")
@click.option("--backend", default=None, help="kernel backend override (reference, blocked, triton)")
@click.option("--out-dir", type=click.Path(path_type=Path), default=Path("bench-results"), show_default=True)
@friendly_errors
def bench_patterns(text_path, tokens, patterns, lengths, backend, out_dir) -> None:
    """Perplexity and time of each attention pattern (full, window, longformer, bigbird, strided, memory)."""
    from memllm.bench.common import parse_sizes
    from memllm.bench.patterns import run_patterns

    run_patterns(
        text_path,
        tokens,
        patterns=patterns.split(",") if patterns else None,
        lengths=parse_sizes(lengths) if lengths else None,
        out_dir=out_dir,
        backend=backend,
    )


def _register_extensions() -> None:
    """Commands of the other packages (imported here, at the end: they reuse the helpers above)."""
    from memllm.bench.chat_latency import chat_latency
    from memllm.bench.serve import bench_serve
    from memllm.chat.cli import chat, sessions
    from memllm.evals.cli import eval_group
    from memllm.evals.conversations import conversations_command, conversations_merge_command
    from memllm.knowledge.cli import ask, ingest, kb, search, summarize
    from memllm_api.cli import keys, serve
    from memllm_storage.cli import bench_storage, db

    for command in (db, chat, sessions, kb, ingest, ask, search, summarize, eval_group, serve, keys):
        cli.add_command(command)
    eval_group.add_command(conversations_command)
    eval_group.add_command(conversations_merge_command)
    bench.add_command(bench_storage)
    bench.add_command(chat_latency)
    bench.add_command(bench_serve)


_register_extensions()


def main() -> None:
    try:
        get_settings()  # read once, up front, so a bad MEMLLM_* variable is one clear line
    except ValueError as exc:
        click.echo(f"memllm: error: {exc}", err=True)
        sys.exit(1)
    cli(prog_name="memllm")


if __name__ == "__main__":
    main()
