"""``memllm eval conversations``: chatting over long histories, measured on LoCoMo.

Each conversation is read session by session (each LoCoMo session, under its date, becomes one
message of a chat session), then its questions are asked, every question against the same
history (answers are not remembered). Modes, same model, same run:

``memory``      the chat session: sinks + local window live, older turns as kNN-retrieved blocks;
``truncation``  only the last N tokens of the same history (default: as many as memory keeps live),
                full attention;
``retrieval``   no history in attention; the past turns that best match the question (embeddings
                + BM25) pasted into the prompt under a token budget;
``hybrid``      ``memory`` plus the pasted turns.

Scoring is LoCoMo's official protocol (task_eval/evaluation.py of snap-research/locomo):
normalise (lowercase, drop commas and punctuation, drop a/an/the/and), Porter-stem, token F1;
category 1 (multi-hop) averages, over the comma-split gold parts, the best F1 against the
comma-split prediction parts; category 3 scores against the gold cut at the first ';';
category 5 (adversarial) is asked as the official two-option question ("Not mentioned in the
conversation" vs the adversarial answer) and scores 1 when the answer contains "no information
available" or "not mentioned". Porter stems come from :mod:`memllm.knowledge.porter` (the
original algorithm; the official script uses NLTK's variant, which differs on a few words).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import string
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from memllm.knowledge.porter import stem

MODES = ("memory", "truncation", "retrieval", "hybrid")
QA_PROMPT = (
    "Based on the above context, write an answer in the form of a short phrase for the following question. "
    "Answer with exact words from the context whenever possible.\n\nQuestion: {question} Short answer:"
)
TEMPORAL_HINT = " Use DATE of CONVERSATION to answer with an approximate date."
NOT_MENTIONED = "Not mentioned in the conversation"
CATEGORY_NAMES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}


# ------------------------------------------------------------------------------------- data
@dataclass
class LocomoSession:
    number: int
    date: str
    turns: list[dict[str, Any]]

    def text(self) -> str:
        """The session as the official prompts print it."""
        lines = [f"DATE: {self.date}", "CONVERSATION:"]
        lines += [turn_line(t) for t in self.turns]
        return "\n".join(lines)


@dataclass
class LocomoConversation:
    sample_id: str
    sessions: list[LocomoSession]
    qa: list[dict[str, Any]] = field(default_factory=list)


def turn_line(turn: dict[str, Any]) -> str:
    line = f'{turn["speaker"]} said, "{turn["text"]}"'
    if turn.get("blip_caption"):
        line += f" and shared {turn['blip_caption']}."
    return line


def load_locomo(path: Path | str) -> list[LocomoConversation]:
    """Conversations of a file in the LoCoMo format (a list of samples)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of LoCoMo samples")
    out = []
    for i, sample in enumerate(data):
        conv = sample.get("conversation")
        if not isinstance(conv, dict):
            raise ValueError(f"{path}: sample {i} has no 'conversation' object")
        sessions = []
        for key, turns in conv.items():
            m = re.fullmatch(r"session_(\d+)", key)
            if m and isinstance(turns, list) and turns:
                n = int(m.group(1))
                sessions.append(LocomoSession(n, str(conv.get(f"{key}_date_time", "")), turns))
        sessions.sort(key=lambda s: s.number)
        out.append(LocomoConversation(str(sample.get("sample_id", i)), sessions, list(sample.get("qa", []))))
    return out


def select_conversations(convs: Sequence[LocomoConversation], sample_ids: str | None) -> list[LocomoConversation]:
    """The conversations named in the comma list ``sample_ids`` (file order), or all of them."""
    if not sample_ids:
        return list(convs)
    wanted = {x.strip() for x in sample_ids.split(",") if x.strip()}
    unknown = sorted(wanted - {c.sample_id for c in convs})
    if unknown:
        known = ", ".join(c.sample_id for c in convs)
        raise ValueError(f"no conversation {', '.join(unknown)} in the data (it has {known})")
    return [c for c in convs if c.sample_id in wanted]


def pick_questions(qa: Sequence[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """All questions, or ``limit`` of them spread evenly over the list (so every category shows up)."""
    if limit is None or limit >= len(qa):
        return list(qa)
    step = len(qa) / limit
    return [qa[int(i * step)] for i in range(limit)]


def limit_sessions(conv: LocomoConversation, k: int) -> LocomoConversation:
    """The first ``k`` sessions and the questions whose evidence lies only in them."""
    kept = conv.sessions[:k]
    numbers = {s.number for s in kept}

    def inside(q: dict[str, Any]) -> bool:
        ev = [e for e in q.get("evidence", []) if isinstance(e, str) and re.match(r"D\d+:", e)]
        return bool(ev) and all(int(e[1 : e.index(":")]) in numbers for e in ev)

    return LocomoConversation(conv.sample_id, kept, [q for q in conv.qa if inside(q)])


# ---------------------------------------------------------------------------------- scoring
_ARTICLES = re.compile(r"\b(a|an|the|and)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    s = s.replace(",", "").lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def f1_score(prediction: str, gold: str) -> float:
    p = [stem(w) for w in normalize_answer(prediction).split()]
    g = [stem(w) for w in normalize_answer(gold).split()]
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def f1_multi(prediction: str, gold: str) -> float:
    preds = [x.strip() for x in prediction.split(",")]
    golds = [x.strip() for x in gold.split(",")]
    return sum(max(f1_score(p, g) for p in preds) for g in golds) / len(golds)


def score_answer(category: int, prediction: str, gold: Any) -> float:
    """LoCoMo's official score of one answer (see module docstring)."""
    if category == 5:
        low = prediction.lower()
        return float("no information available" in low or "not mentioned" in low)
    gold = str(gold)
    if category == 3:
        gold = gold.split(";")[0].strip()
    if category == 1:
        return float(f1_multi(prediction, gold))
    if category in (2, 3, 4):
        return f1_score(prediction, gold)
    raise ValueError(f"unknown LoCoMo category {category!r}")


def question_text(qa: dict[str, Any], rng: random.Random) -> tuple[str, dict[str, str] | None]:
    """(question as asked, option key for category 5)."""
    q = str(qa["question"])
    if qa.get("category") == 2:
        q += TEMPORAL_HINT
    key = None
    if qa.get("category") == 5:
        adversarial = str(qa.get("adversarial_answer", qa.get("answer", "")))
        key = {"a": NOT_MENTIONED, "b": adversarial} if rng.random() < 0.5 else {"a": adversarial, "b": NOT_MENTIONED}
        q += f" Select the correct answer: (a) {key['a']} (b) {key['b']}."
    return QA_PROMPT.format(question=q), key


def resolve_option(prediction: str, key: dict[str, str] | None) -> str:
    """Map a two-option answer ("(a)", "b", ...) to the option's text, as the official scripts do."""
    if key is None:
        return prediction
    p = prediction.strip().lower()
    if len(p) == 1 and p in key:
        return key[p]
    for letter in ("a", "b"):
        if f"({letter})" in p or p.startswith(f"{letter})") or p.startswith(f"{letter}."):
            return key[letter]
    return prediction


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """F1 per category and overall (mean over questions)."""
    by_cat: dict[int, list[float]] = defaultdict(list)
    for r in records:
        by_cat[r["category"]].append(r["score"])
    all_scores = [r["score"] for r in records]
    return {
        "overall": sum(all_scores) / len(all_scores) if all_scores else None,
        "n": len(all_scores),
        "by_category": {
            str(c): {"name": CATEGORY_NAMES.get(c, str(c)), "f1": sum(v) / len(v), "n": len(v)}
            for c, v in sorted(by_cat.items())
        },
    }


# ----------------------------------------------------------------------------------- runner
@dataclass
class RunConfig:
    modes: tuple[str, ...] = MODES
    limit_conversations: int | None = None
    limit_questions: int | None = None
    limit_sessions: int | None = None  # read only the first K sessions; ask only questions about them
    max_answer_tokens: int = 24
    truncation_tokens: int | None = None  # default: sinks + window of the memory settings
    retrieval_budget: int = 768  # tokens of pasted turns (retrieval, hybrid)
    retrieval_k: int = 20
    seed: int = 0


class ConversationEval:
    def __init__(self, engine, config: RunConfig, log=print, progress: bool = True) -> None:
        self.engine = engine
        self.config = config
        self.log = log
        self.progress = progress
        mem = engine.memory_settings
        self.truncation_tokens = config.truncation_tokens or (mem.sinks + mem.window)
        self._retriever_embedder = None

    async def run(self, conversations: Sequence[LocomoConversation]) -> dict[str, Any]:
        from memllm.sampling import SamplingParams

        self.params = SamplingParams(max_tokens=self.config.max_answer_tokens, stop=("\n",))
        records: list[dict[str, Any]] = []
        timing: dict[str, float] = defaultdict(float)
        for conv in conversations[: self.config.limit_conversations]:
            records += await self._conversation(conv, timing)
        return {
            "modes": {m: summarize([r | {"score": r["scores"][m]} for r in records]) for m in self.config.modes},
            "timing_s": dict(timing),
            "questions": records,
        }

    async def _conversation(self, conv: LocomoConversation, timing: dict[str, float]) -> list[dict[str, Any]]:
        cfg = self.config
        if cfg.limit_sessions is not None:
            conv = limit_sessions(conv, cfg.limit_sessions)
        questions = pick_questions(conv.qa, cfg.limit_questions)
        rng = random.Random(cfg.seed)
        asked = [question_text(q, rng) for q in questions]
        records = [
            {
                "sample_id": conv.sample_id,
                "question": q["question"],
                "category": int(q["category"]),
                "gold": q.get("answer", q.get("adversarial_answer")),
                "predictions": {},
                "scores": {},
            }
            for q in questions
        ]
        self.log(f"{conv.sample_id}: {len(conv.sessions)} sessions, {len(questions)} questions")
        turns = _past_turns(conv)
        retriever = None
        if {"retrieval", "hybrid"} & set(cfg.modes):
            from memllm.chat.baselines import TurnRetriever

            t0 = time.perf_counter()
            retriever = TurnRetriever(turns, embedder=self._embedder())
            timing["index_turns"] += time.perf_counter() - t0
        contexts = {}
        if retriever is not None:
            count = lambda s: len(self.engine.encode(s))  # noqa: E731
            for i, q in enumerate(questions):
                contexts[i] = retriever.context(str(q["question"]), count, cfg.retrieval_budget, cfg.retrieval_k)

        def record(mode: str, i: int, answer: str) -> None:
            _text, key = asked[i]
            resolved = resolve_option(answer, key)
            r = records[i]
            r["predictions"][mode] = resolved
            r["scores"][mode] = score_answer(r["category"], resolved, r["gold"] if r["category"] != 5 else "")

        if {"memory", "hybrid"} & set(cfg.modes):
            await self._memory_modes(conv, asked, contexts, record, timing)
        if "truncation" in cfg.modes:
            self._truncation(conv, asked, record, timing)
        if "retrieval" in cfg.modes:
            t0 = time.perf_counter()
            for i, (text, _) in self._questions(asked, conv.sample_id, "retrieval"):
                answer = self._answer_fresh(f"{contexts[i]}\n\n{text}")
                record("retrieval", i, answer)
            timing["retrieval_questions"] += time.perf_counter() - t0
        return records

    def _questions(self, asked, sample_id: str, mode: str):
        """The asked questions with their index, under a progress bar (stderr) when enabled."""
        from tqdm import tqdm

        desc = f"{sample_id} {mode}"
        return tqdm(list(enumerate(asked)), desc=desc, unit="q", disable=not self.progress, leave=False)

    def _embedder(self):
        if self._retriever_embedder is None:
            from memllm.knowledge.embeddings import Embedder

            self._retriever_embedder = Embedder()
        return self._retriever_embedder

    async def _memory_modes(self, conv, asked, contexts, record, timing) -> None:
        from memllm.chat.service import ChatService
        from storage.store import MemoryStore

        with tempfile.TemporaryDirectory(prefix="memllm-eval-") as tmp:
            url = f"sqlite+aiosqlite:///{tmp}/eval.db"
            await _migrate(url)
            store = await MemoryStore.open(url, Path(tmp) / "data")
            try:
                service = ChatService(self.engine, store, mode="memory")
                info = await service.create(f"locomo-{conv.sample_id}")
                t0 = time.perf_counter()
                messages = [{"role": "user", "content": s.text()} for s in conv.sessions]
                n_tokens = 0

                def progress(n: int) -> None:
                    nonlocal n_tokens
                    n_tokens += n

                await service.append_messages(info.id, messages, progress=progress)
                dt = time.perf_counter() - t0
                timing["memory_read"] += dt
                self.log(f"  read {n_tokens} tokens into the session in {dt:.0f} s ({n_tokens / dt:.0f} tok/s)")
                for mode in ("memory", "hybrid"):
                    if mode not in self.config.modes:
                        continue
                    t0 = time.perf_counter()
                    for i, (text, _) in self._questions(asked, conv.sample_id, mode):
                        prompt = text if mode == "memory" else f"{contexts[i]}\n\n{text}"
                        result = await service.reply(info.id, prompt, self.params, ephemeral=True)
                        record(mode, i, result.text)
                    timing[f"{mode}_questions"] += time.perf_counter() - t0
            finally:
                await store.close()

    def _truncation(self, conv, asked, record, timing) -> None:
        from memllm.chat.baselines import last_tokens
        from memllm.chat.state import fork_state
        from memllm.conversation import ChatTemplate, generate_reply
        from memllm.textstream import TextStream

        t0 = time.perf_counter()
        engine, tok = self.engine, self.engine.tokenizer
        history = "\n\n".join(s.text() for s in conv.sessions)
        kept = last_tokens(history, engine.encode, lambda ids: tok.decode(ids), self.truncation_tokens)
        template = ChatTemplate(tok)
        first = {"role": "user", "content": kept}
        state = engine.new_state("full")
        engine.prefill(state, engine.encode(template.delta([], first)))
        timing["truncation_read"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for i, (text, _) in self._questions(asked, conv.sample_id, "truncation"):
            fork = fork_state(engine, state, sink=None, extra_sources=[])
            ids = engine.encode(template.delta([first], {"role": "user", "content": text}, True))
            stream = TextStream(tok, self.params.stop)
            for _ in generate_reply(engine, fork, ids, self.params, stream, []):
                pass
            record("truncation", i, stream.text)
        timing["truncation_questions"] += time.perf_counter() - t0

    def _answer_fresh(self, prompt: str) -> str:
        from memllm.conversation import generate_reply
        from memllm.textstream import TextStream

        engine = self.engine
        ids = engine.chat_ids([{"role": "user", "content": prompt}])
        stream = TextStream(engine.tokenizer, self.params.stop)
        for _ in generate_reply(engine, engine.new_state("full"), ids, self.params, stream, []):
            pass
        return stream.text


def _past_turns(conv: LocomoConversation):
    from memllm.chat.baselines import PastTurn

    out = []
    for s in conv.sessions:
        for t in s.turns:
            out.append(PastTurn(len(out), turn_line(t), s.date, f"session_{s.number}"))
    return out


async def _migrate(url: str) -> None:
    from storage import migrate
    from storage.engine import make_engine

    eng = make_engine(url)
    try:
        await migrate.upgrade(eng)
    finally:
        await eng.dispose()


def format_report(result: dict[str, Any], modes: Sequence[str]) -> str:
    cats = sorted({c for m in modes for c in result["modes"][m]["by_category"]}, key=int)
    head = ["mode", "overall", "n"] + [f"{c} {CATEGORY_NAMES.get(int(c), c)}" for c in cats]
    rows = [head]
    for m in modes:
        s = result["modes"][m]
        row = [m, f"{s['overall']:.3f}" if s["overall"] is not None else "-", str(s["n"])]
        for c in cats:
            v = s["by_category"].get(c)
            row.append(f"{v['f1']:.3f} ({v['n']})" if v else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)) for r in rows)


@click.command("conversations")
@click.option(
    "--data",
    "data",
    type=click.Path(path_type=Path),
    default=None,
    help="a file in the LoCoMo format (default: <eval data>/locomo/locomo5-dev.json)",
)
@click.option("--modes", default=",".join(MODES), show_default=True, help="comma list of " + ", ".join(MODES))
@click.option("--limit-conversations", type=int, default=None, help="first N conversations")
@click.option(
    "--conversations",
    "sample_ids",
    default=None,
    help="comma list of sample ids to run (e.g. conv-41,conv-42), in file order; default all",
)
@click.option("--limit-questions", type=int, default=None, help="M questions per conversation, spread evenly")
@click.option(
    "--limit-sessions",
    type=int,
    default=None,
    help="read only the first K sessions of each conversation and ask only about them",
)
@click.option("--max-answer-tokens", default=24, show_default=True)
@click.option("--truncation-tokens", type=int, default=None, help="history kept by truncation (default sinks+window)")
@click.option("--retrieval-budget", default=768, show_default=True, help="tokens of pasted turns")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="write results as JSON here")
def conversations_command(
    data,
    modes,
    limit_conversations,
    sample_ids,
    limit_questions,
    limit_sessions,
    max_answer_tokens,
    truncation_tokens,
    retrieval_budget,
    json_out,
) -> None:
    """Chat over long histories: LoCoMo F1 per category for memory, truncation, retrieval, hybrid."""
    from memllm.engine import Engine
    from memllm.loading import load_model
    from memllm.settings import get_settings

    settings = get_settings()
    if data is None:
        data = settings.eval_data / "locomo" / "locomo5-dev.json"
    if not Path(data).exists():
        raise click.ClickException(f"evaluation data not found: {data} (pass --data or set MEMLLM_EVAL_DATA)")
    chosen = tuple(m.strip() for m in modes.split(",") if m.strip())
    bad = [m for m in chosen if m not in MODES]
    if bad:
        raise click.ClickException(f"unknown modes {bad}; choose from {', '.join(MODES)}")
    config = RunConfig(
        modes=chosen,
        limit_conversations=limit_conversations,
        limit_questions=limit_questions,
        limit_sessions=limit_sessions,
        max_answer_tokens=max_answer_tokens,
        truncation_tokens=truncation_tokens,
        retrieval_budget=retrieval_budget,
    )
    try:
        convs = select_conversations(load_locomo(data), sample_ids)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    engine = Engine(load_model(settings), settings.memory, retrieval=settings.retrieval)
    t0 = time.perf_counter()
    evaluation = ConversationEval(engine, config, log=lambda s: click.echo(s, err=True))
    result = asyncio.run(evaluation.run(convs))
    result.update(
        data=str(data),
        model=engine.loaded.name,
        memory={k: getattr(settings.memory, k) for k in ("sinks", "window", "chunk", "block_size", "top_k")},
        retrieval=settings.retrieval,
        config={
            k: getattr(config, k)
            for k in (
                "limit_conversations",
                "limit_questions",
                "limit_sessions",
                "max_answer_tokens",
                "retrieval_budget",
            )
        }
        | {
            "truncation_tokens": evaluation.truncation_tokens,
            "conversations": [c.sample_id for c in convs[:limit_conversations]],
        },
        wall_s=time.perf_counter() - t0,
    )
    click.echo(format_report(result, chosen))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2, default=str))
        click.echo(f"wrote {json_out}")
