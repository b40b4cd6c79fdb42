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
available" or "not mentioned". Porter stems come from :mod:`memllm.knowledge.analysis` (PyStemmer's
original algorithm; the official script uses NLTK's variant, which differs on a few words).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import re
import string
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from memllm.knowledge.analysis import stem

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


def pick_question_indices(n: int, limit: int | None) -> list[int]:
    """All ``n`` question indices, or ``limit`` of them spread evenly (so every category shows up)."""
    if limit is None or limit >= n:
        return list(range(n))
    step = n / limit
    return [int(i * step) for i in range(limit)]


def spread_order(items: Sequence[int]) -> list[int]:
    """``items`` reordered so that every prefix is spread evenly over the list (bit-reversed ranks,
    the van der Corput order): LoCoMo lists questions by category, so a run stopped early has asked
    a fair sample of every category, not the first categories only."""
    n = len(items)
    bits = max(1, (n - 1).bit_length())
    return [items[i] for i in sorted(range(n), key=lambda i: int(format(i, f"0{bits}b")[::-1], 2))]


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


QuestionKey = tuple[str, int]  # (sample_id, index of the question in the conversation's qa list)


def record_key(record: dict[str, Any]) -> QuestionKey:
    return (str(record["sample_id"]), int(record["index"]))


class ConversationEval:
    """Runs the modes question by question, so that every finished question can be saved at once
    (``on_record``) and a later run can skip the questions already answered (``done``)."""

    def __init__(self, engine, config: RunConfig, log=print, progress: bool = True) -> None:
        self.engine = engine
        self.config = config
        self.log = log
        self.progress = progress
        mem = engine.memory_settings
        self.truncation_tokens = config.truncation_tokens or (mem.sinks + mem.window)
        self._retriever_embedder = None

    async def run(
        self,
        conversations: Sequence[LocomoConversation],
        done: Sequence[dict[str, Any]] = (),
        on_record=None,
        timing: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """Answer every selected question in every mode. ``done``: records of an earlier run of the
        same settings, kept as they are; ``on_record(records, timing)`` is called after each question
        with every record so far (``done`` first); ``timing`` carries an earlier run's seconds on."""
        from memllm.sampling import SamplingParams

        self.params = SamplingParams(max_tokens=self.config.max_answer_tokens, stop=("\n",))
        records: list[dict[str, Any]] = list(done)
        known = {record_key(r) for r in records}
        timing = defaultdict(float, timing or {})
        for conv in conversations[: self.config.limit_conversations]:
            await self._conversation(conv, known, records, timing, on_record)
        return result_payload(records, self.config.modes, dict(timing))

    async def _conversation(self, conv, known, records, timing, on_record) -> None:
        cfg = self.config
        if cfg.limit_sessions is not None:
            conv = limit_sessions(conv, cfg.limit_sessions)
        picked = pick_question_indices(len(conv.qa), cfg.limit_questions)
        pending = [i for i in spread_order(picked) if (conv.sample_id, i) not in known]
        self.log(
            f"{conv.sample_id}: {len(conv.sessions)} sessions, {len(picked)} questions"
            + (f" ({len(picked) - len(pending)} already answered)" if len(pending) < len(picked) else "")
        )
        if not pending:
            return
        asked = {i: question_text(conv.qa[i], question_rng(cfg.seed, conv.sample_id, i)) for i in pending}
        answerers = {}
        contexts: dict[int, str] = {}
        async with contextlib.AsyncExitStack() as stack:
            if {"retrieval", "hybrid"} & set(cfg.modes):
                contexts = self._retrieval_contexts(conv, pending, timing)
            if {"memory", "hybrid"} & set(cfg.modes):
                service, session_id = await stack.enter_async_context(self._memory_session(conv, timing))
                for mode in ("memory", "hybrid"):
                    if mode in cfg.modes:
                        answerers[mode] = self._memory_answerer(
                            service, session_id, mode, contexts if mode == "hybrid" else None
                        )
            if "truncation" in cfg.modes:
                answerers["truncation"] = self._truncation_answerer(conv, timing)
            if "retrieval" in cfg.modes:
                answerers["retrieval"] = lambda i, text: self._answer_fresh(f"{contexts[i]}\n\n{text}")
            for i in self._progress(pending, conv.sample_id):
                qa = conv.qa[i]
                text, key = asked[i]
                category = int(qa["category"])
                gold = qa.get("answer", qa.get("adversarial_answer"))
                record = {
                    "sample_id": conv.sample_id,
                    "index": i,
                    "question": qa["question"],
                    "category": category,
                    "gold": gold,
                    "predictions": {},
                    "scores": {},
                }
                for mode in cfg.modes:
                    t0 = time.perf_counter()
                    answer = answerers[mode](i, text)
                    if asyncio.iscoroutine(answer):
                        answer = await answer
                    timing[f"{mode}_questions"] += time.perf_counter() - t0
                    resolved = resolve_option(answer, key)
                    record["predictions"][mode] = resolved
                    record["scores"][mode] = score_answer(category, resolved, gold if category != 5 else "")
                records.append(record)
                known.add(record_key(record))
                if on_record is not None:
                    on_record(records, dict(timing))

    def _progress(self, indices: list[int], sample_id: str):
        """The questions under a progress bar (stderr) when enabled."""
        from tqdm import tqdm

        return tqdm(indices, desc=sample_id, unit="q", disable=not self.progress, leave=False)

    def _embedder(self):
        if self._retriever_embedder is None:
            from memllm.knowledge.embeddings import Embedder

            self._retriever_embedder = Embedder()
        return self._retriever_embedder

    def _retrieval_contexts(self, conv, indices: list[int], timing) -> dict[int, str]:
        """The past turns pasted for each question (embeddings + BM25 over the conversation's turns)."""
        from memllm.chat.baselines import TurnRetriever

        cfg = self.config
        t0 = time.perf_counter()
        retriever = TurnRetriever(_past_turns(conv), embedder=self._embedder())
        count = lambda s: len(self.engine.encode(s))  # noqa: E731
        contexts = {
            i: retriever.context(str(conv.qa[i]["question"]), count, cfg.retrieval_budget, cfg.retrieval_k)
            for i in indices
        }
        timing["index_turns"] += time.perf_counter() - t0
        return contexts

    @contextlib.asynccontextmanager
    async def _memory_session(self, conv, timing):
        """A chat session (temporary SQLite store) that has read the whole conversation."""
        from memllm.chat.service import ChatService
        from memllm_storage.store import MemoryStore

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
                yield service, info.id
            finally:
                await store.close()

    def _memory_answerer(self, service, session_id: int, mode: str, contexts: dict[int, str] | None):
        async def answer(i: int, text: str) -> str:
            prompt = text if contexts is None else f"{contexts[i]}\n\n{text}"
            result = await service.reply(session_id, prompt, self.params, ephemeral=True)
            return result.text

        return answer

    def _truncation_answerer(self, conv, timing):
        """Full attention over the last N tokens of the history, read once; each question forks it."""
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

        def answer(_i: int, text: str) -> str:
            fork = fork_state(engine, state, sink=None, extra_sources=[])
            ids = engine.encode(template.delta([first], {"role": "user", "content": text}, True))
            stream = TextStream(tok, self.params.stop)
            for _ in generate_reply(engine, fork, ids, self.params, stream, []):
                pass
            return stream.text

        return answer

    def _answer_fresh(self, prompt: str) -> str:
        from memllm.conversation import generate_reply
        from memllm.textstream import TextStream

        engine = self.engine
        ids = engine.chat_ids([{"role": "user", "content": prompt}])
        stream = TextStream(engine.tokenizer, self.params.stop)
        for _ in generate_reply(engine, engine.new_state("full"), ids, self.params, stream, []):
            pass
        return stream.text


def question_rng(seed: int, sample_id: str, index: int) -> random.Random:
    """The generator that orders one question's two options: its own, so that any subset of the
    questions (a limit, a resumed run, a shard) asks each question exactly as the whole run does."""
    return random.Random(f"{seed}:{sample_id}:{index}")


def result_payload(records: Sequence[dict[str, Any]], modes: Sequence[str], timing: dict[str, float]) -> dict[str, Any]:
    """Per-mode summaries over ``records`` (each scored in every mode), with the records themselves."""
    return {
        "modes": {m: summarize([r | {"score": r["scores"][m]} for r in records]) for m in modes},
        "timing_s": dict(timing),
        "questions": list(records),
    }


# The parts of a result that decide how questions are answered: runs that agree on them may be
# resumed or merged (the question selection -- limits, conversations -- may differ).
# the data by content, not by path
SAME_SETTINGS = ("data_sha256", "model", "dtype", "memory", "chat_memory", "retrieval")
SAME_CONFIG = ("limit_sessions", "max_answer_tokens", "retrieval_budget", "truncation_tokens")


def settings_mismatch(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Names of the settings under which two results' answers are not comparable (empty: they are)."""
    diff = [k for k in SAME_SETTINGS if a.get(k) != b.get(k)]
    diff += [k for k in SAME_CONFIG if a.get("config", {}).get(k) != b.get("config", {}).get(k)]
    if list(a.get("modes", {})) != list(b.get("modes", {})):
        diff.append("modes")
    return diff


def merge_results(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from runs of the same settings over disjoint questions (e.g. one process per
    group of conversations): records concatenated, summaries recomputed, seconds summed.

    Raises ``ValueError`` when the settings differ or a question appears twice."""
    if not results:
        raise ValueError("nothing to merge")
    first = results[0]
    for r in results[1:]:
        diff = settings_mismatch(first, r)
        if diff:
            raise ValueError(f"the runs differ in {', '.join(diff)}; only runs of the same settings merge")
    records = [q for r in results for q in r["questions"]]
    seen: set[QuestionKey] = set()
    for q in records:
        key = record_key(q)
        if key in seen:
            raise ValueError(f"question {key[1]} of {key[0]} is in more than one run")
        seen.add(key)
    timing: dict[str, float] = defaultdict(float)
    for r in results:
        for k, v in r.get("timing_s", {}).items():
            timing[k] += v
    merged = {k: v for k, v in first.items() if k not in ("modes", "timing_s", "questions", "wall_s", "paired")}
    merged.update(result_payload(records, list(first["modes"]), dict(timing)))
    merged["wall_s"] = sum(r.get("wall_s", 0.0) for r in results)
    merged.setdefault("config", {})["conversations"] = list(dict.fromkeys(q["sample_id"] for q in records))
    return merged


DATA_TEXT = ("question", "gold")  # a record's copies of the data's text


def without_data_text(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` without the data's text; what identifies and scores it (sample id, index,
    category, predictions, scores) stays, so the result still resumes, merges and compares."""
    return {k: v for k, v in record.items() if k not in DATA_TEXT}


def _past_turns(conv: LocomoConversation):
    from memllm.chat.baselines import PastTurn

    out = []
    for s in conv.sessions:
        for t in s.turns:
            out.append(PastTurn(len(out), turn_line(t), s.date, f"session_{s.number}"))
    return out


async def _migrate(url: str) -> None:
    from memllm_storage import migrate
    from memllm_storage.engine import make_engine

    eng = make_engine(url)
    try:
        await migrate.upgrade(eng)
    finally:
        await eng.dispose()


def compare_modes(records: Sequence[dict[str, Any]], modes: Sequence[str], baseline: str) -> dict[str, Any]:
    """Each mode against ``baseline`` on the same questions, overall and per category:
    ``{"baseline": ..., "modes": {mode: {"overall" | category: PairedDifference as a dict}}}``."""
    from memllm.evals.paired import paired_bootstrap

    groups: dict[str, list[dict[str, Any]]] = {"overall": list(records)}
    for r in sorted(records, key=lambda r: r["category"]):
        groups.setdefault(str(r["category"]), []).append(r)
    out: dict[str, Any] = {}
    for m in modes:
        if m == baseline:
            continue
        out[m] = {
            g: asdict(paired_bootstrap([r["scores"][m] for r in rs], [r["scores"][baseline] for r in rs]))
            for g, rs in groups.items()
        }
    return {"baseline": baseline, "modes": out}


def with_comparison(result: dict[str, Any], baseline: str | None) -> dict[str, Any]:
    """``result`` with its ``paired`` comparison against ``baseline`` (none when the baseline mode
    did not run, or there are no questions)."""
    modes = list(result["modes"])
    if baseline is None or baseline not in modes or not result["questions"]:
        return {k: v for k, v in result.items() if k != "paired"}
    return result | {"paired": compare_modes(result["questions"], modes, baseline)}


def format_comparison(paired: dict[str, Any]) -> str:
    """One line per mode and group: difference to the baseline, 95% interval, wins/losses; ``*``
    marks an interval that excludes 0."""
    from memllm.evals.paired import PairedDifference

    rows = [["mode", f"vs {paired['baseline']}", "n", "difference", "95% interval", "wins/losses"]]
    for m, groups in paired["modes"].items():
        for g, d in groups.items():
            diff = PairedDifference(**d)
            name = g if g == "overall" else f"{g} {CATEGORY_NAMES.get(int(g), g)}"
            rows.append(
                [
                    m,
                    name,
                    str(diff.n),
                    f"{diff.mean:+.3f}{' *' if diff.separated else ''}",
                    f"[{diff.low:+.3f}, {diff.high:+.3f}]",
                    f"{diff.wins}/{diff.losses}",
                ]
            )
    return _columns(rows)


def _columns(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)) for r in rows)


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
    table = _columns(rows)
    if "paired" in result:
        table += "\n\n" + format_comparison(result["paired"])
    return table


BASELINE_HELP = (
    "mode the others are compared to on the same questions (paired bootstrap of the F1 differences, "
    "overall and per category), when it ran"
)


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
@click.option(
    "--json",
    "json_out",
    type=click.Path(path_type=Path),
    default=None,
    help="write results as JSON here, rewritten after every question (a valid partial result at any time)",
)
@click.option(
    "--resume",
    is_flag=True,
    help="keep the questions already answered in the --json file (same settings required) and answer the rest",
)
@click.option("--baseline", type=click.Choice(MODES), default="truncation", show_default=True, help=BASELINE_HELP)
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
    resume,
    baseline,
) -> None:
    """Chat over long histories: LoCoMo F1 per category for memory, truncation, retrieval, hybrid."""
    from memllm.engine import Engine
    from memllm.evals.common import write_json
    from memllm.loading import load_model
    from memllm.settings import get_settings

    settings = get_settings()
    if data is None:
        data = settings.eval_data / "locomo" / "locomo5-dev.json"
    if not Path(data).exists():
        raise click.ClickException(f"evaluation data not found: {data} (pass --data or set MEMLLM_EVAL_DATA)")
    if resume and json_out is None:
        raise click.UsageError("--resume needs --json: the file whose answered questions are kept")
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
    evaluation = ConversationEval(engine, config, log=lambda s: click.echo(s, err=True))
    header = {
        "data": str(data),
        "data_sha256": hashlib.sha256(Path(data).read_bytes()).hexdigest(),
        "model": engine.loaded.name,
        "dtype": str(engine.loaded.dtype).removeprefix("torch."),
        "memory": asdict(settings.memory),
        "chat_memory": settings.chat_memory,  # the chat sessions' changes (memory and hybrid modes)
        "retrieval": settings.retrieval,
        "config": {
            k: getattr(config, k)
            for k in (
                "limit_conversations",
                "limit_questions",
                "limit_sessions",
                "max_answer_tokens",
                "retrieval_budget",
            )
        }
        | {"truncation_tokens": evaluation.truncation_tokens},
    }
    done, timing, wall_before = _resumed(json_out, header, chosen) if resume else ([], {}, 0.0)
    t0 = time.perf_counter()

    def payload(records, seconds) -> dict[str, Any]:
        out = header | result_payload(records, chosen, seconds)
        out["config"] = header["config"] | {"conversations": list(dict.fromkeys(r["sample_id"] for r in records))}
        out["wall_s"] = wall_before + time.perf_counter() - t0
        return out

    def checkpoint(records, seconds) -> None:
        write_json(json_out, payload(records, seconds))

    result = asyncio.run(evaluation.run(convs, done=done, on_record=checkpoint if json_out else None, timing=timing))
    result = with_comparison(payload(result["questions"], result["timing_s"]), baseline)
    click.echo(format_report(result, chosen))
    if json_out is not None:
        write_json(json_out, result)
        click.echo(f"wrote {json_out}")


def _resumed(path: Path, header: dict[str, Any], modes: Sequence[str]) -> tuple[list[dict], dict[str, float], float]:
    """(records, seconds per phase, wall seconds) of an earlier run in ``path`` made with the same
    settings; nothing when the file does not exist yet."""
    if not path.exists():
        return [], {}, 0.0
    try:
        earlier = json.loads(path.read_text())
        records = earlier["questions"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise click.ClickException(f"cannot resume from {path}: not a result of this command ({exc})") from None
    diff = settings_mismatch(earlier, header | {"modes": dict.fromkeys(modes)})
    if diff:
        raise click.ClickException(
            f"cannot resume from {path}: it was made with other {', '.join(diff)}; "
            "use another --json file or the same settings"
        )
    click.echo(f"resuming {path}: {len(records)} questions already answered", err=True)
    return records, earlier.get("timing_s", {}), float(earlier.get("wall_s", 0.0))


@click.command("conversations-merge")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="write the merged result here (JSON)")
@click.option("--baseline", type=click.Choice(MODES), default="truncation", show_default=True, help=BASELINE_HELP)
@click.option(
    "--without-text",
    is_flag=True,
    help="drop the questions and gold answers (publish scores and predictions without the data's text)",
)
def conversations_merge_command(results, out, baseline, without_text) -> None:
    """Merge ``eval conversations --json`` runs of the same settings over different questions (e.g.
    one process per group of conversations) into one result and print its table. One file alone
    prints its table (e.g. a run still in progress)."""
    from memllm.evals.common import write_json

    try:
        merged = with_comparison(merge_results([json.loads(p.read_text()) for p in results]), baseline)
        if without_text:
            merged["questions"] = [without_data_text(q) for q in merged["questions"]]
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise click.ClickException(f"cannot merge: {exc}") from None
    click.echo(format_report(merged, list(merged["modes"])))
    if out is not None:
        write_json(out, merged)
        click.echo(f"wrote {out}")
