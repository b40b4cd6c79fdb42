"""Shared pieces of the command line: one-line errors, engine construction, sampling options."""

from __future__ import annotations

import functools
import logging
import sys

import click

from memllm.settings import Settings, get_settings


class CliError(click.ClickException):
    def show(self, file=None) -> None:
        click.echo(f"memllm: error: {self.message}", err=True)


def friendly_errors(fn=None, *, on_interrupt: str = "interrupted"):
    """Turn expected failures into one clear line instead of a traceback (``-v`` shows it).

    Use bare (``@friendly_errors``) or with a message for Ctrl-C (``@friendly_errors(on_interrupt=...)``).
    """
    if fn is None:
        return functools.partial(friendly_errors, on_interrupt=on_interrupt)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            click.echo(f"\n{on_interrupt}", err=True)
            sys.exit(130)
        except (ValueError, RuntimeError, OSError, LookupError) as exc:  # storage errors derive from these
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                raise
            raise CliError(str(exc) or type(exc).__name__) from exc

    return wrapper


def _engine(settings: Settings | None = None):
    from memllm.engine import Engine
    from memllm.loading import load_model

    settings = settings or get_settings()
    return Engine(load_model(settings), settings.memory, retrieval=settings.retrieval)


def _sampling(
    max_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    stop: tuple[str, ...],
    seed: int | None,
):
    from memllm.sampling import SamplingParams

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        stop=stop,
        seed=seed,
    )


def sampling_options(fn):
    for opt in reversed(
        [
            click.option("--max-tokens", default=256, show_default=True, help="most tokens to generate"),
            click.option("--temperature", default=0.0, show_default=True, help="0 = greedy"),
            click.option("--top-k", default=0, show_default=True, help="0 = off"),
            click.option("--top-p", default=1.0, show_default=True, help="1 = off"),
            click.option("--repetition-penalty", default=1.0, show_default=True, help="1 = off"),
            click.option("--stop", multiple=True, help="stop string (repeatable)"),
            click.option("--seed", type=int, default=None, help="random seed for sampling"),
        ]
    ):
        fn = opt(fn)
    return fn
