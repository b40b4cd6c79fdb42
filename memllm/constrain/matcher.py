"""A grammar over one stream's output, enforced token by token (llguidance).

:class:`Constraint` is what a :class:`~memllm.serving.jobs.GenerateJob` holds: before each sample it
masks the (V,) logits to the tokens the grammar allows next (the others become ``-inf``), and each
sampled token advances it. When the grammar is complete and nothing more may follow, ``done`` is
true and the job ends its answer (finish ``"stop"``); where the grammar may end but could also go
on, the stop ids (the model's end-of-text / end-of-turn tokens) are allowed and end it.

The llguidance tokenizer (the vocabulary as byte strings, ~1 s to build for 49k tokens) is made once
per Hugging Face tokenizer and model vocabulary size (:func:`grammar_tokenizer`); a constraint is
made per request (~1 ms for a JSON schema) on the thread that handles the request, then used on the
model thread only.
"""

from __future__ import annotations

import threading
from collections.abc import Collection
from typing import Any

import numpy as np
import torch

_TOKENIZERS: dict[tuple[int, int, tuple[int, ...]], tuple[Any, Any]] = {}  # key -> (hf tokenizer, LLTokenizer)
_TOKENIZERS_LOCK = threading.Lock()


class GrammarError(ValueError):
    """A grammar (a JSON schema, a tool's parameters) that cannot be compiled: the message says why."""


class ConstraintViolation(RuntimeError):
    """A token the grammar does not allow was fed to a constraint (a bug: masks prevent it)."""


def grammar_tokenizer(tokenizer: Any, vocab_size: int, stop_ids: Collection[int]) -> Any:
    """The llguidance tokenizer of a Hugging Face ``tokenizer`` for logits of ``vocab_size``, whose
    end tokens are ``stop_ids`` (built once per tokenizer; thread-safe)."""
    import llguidance.hf

    eos = tuple(sorted(stop_ids)) or (tokenizer.eos_token_id,)
    key = (id(tokenizer), vocab_size, eos)
    with _TOKENIZERS_LOCK:
        cached = _TOKENIZERS.get(key)
        if cached is None or cached[0] is not tokenizer:  # an id reused by a new object
            cached = (tokenizer, llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(eos)))
            _TOKENIZERS[key] = cached
        return cached[1]


def check_grammar(grammar: str, lltokenizer: Any) -> None:
    """Raise :class:`GrammarError` (with llguidance's message) unless ``grammar`` compiles."""
    import llguidance

    try:
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lltokenizer)
    except Exception as exc:  # documented not to raise for bad grammars; a schema it cannot even read
        raise GrammarError(_first_line(str(exc))) from None
    if is_error:
        raise GrammarError(_first_line(messages[0] if messages else "invalid grammar"))


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0][:500] if message.strip() else "invalid grammar"


class Constraint:
    """One stream's grammar state (see the module docstring).

    ``grammar``: llguidance grammar text (Lark, see :mod:`memllm.constrain.grammars`). Raises
    :class:`GrammarError` if it does not compile. Invariant: the tokens given to :meth:`advance`
    are exactly the sampled output tokens in order (stop ids excluded); :meth:`mask` is called on
    the logits before each of them.
    """

    def __init__(self, grammar: str, lltokenizer: Any) -> None:
        import llguidance

        self._matcher = llguidance.LLMatcher(lltokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise GrammarError(_first_line(self._matcher.get_error()))
        self.vocab_size: int = lltokenizer.vocab_size
        self.eos_ids: frozenset[int] = frozenset(lltokenizer.eos_tokens)
        self._words = np.zeros((self.vocab_size + 31) // 32, dtype=np.int32)

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more (the answer must end here)."""
        return self._matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        """The output so far is a complete sentence of the grammar (it may end here)."""
        return self._matcher.is_accepting()

    def allowed(self) -> np.ndarray:
        """(V,) bool: the tokens the grammar allows next (stop ids included where it may end)."""
        if self._matcher.is_error():
            raise ConstraintViolation(self._matcher.get_error())
        self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        bits = np.unpackbits(self._words.view(np.uint8), bitorder="little")  # (32 * words,) in token order
        return bits[: self.vocab_size].astype(bool)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (V,) float -> a copy with every token the grammar forbids next at ``-inf``.
        Logits past the grammar's vocabulary (padding rows of the embedding) are forbidden too."""
        allowed = torch.from_numpy(self.allowed())
        out = torch.full_like(logits, float("-inf"))
        n = min(logits.numel(), allowed.numel())
        out[:n] = torch.where(allowed[:n], logits[:n], out[:n])
        return out

    def advance(self, token: int) -> None:
        """Feed the sampled ``token``; raises :class:`ConstraintViolation` if the grammar forbids it."""
        if not self._matcher.consume_token(int(token)):
            raise ConstraintViolation(f"token {token} is not allowed here: {self._matcher.get_error()}")
