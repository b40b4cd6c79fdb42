"""Streaming a reply's text: ``TextStream`` (incremental ``DecodeStream``) against decoding every id
again on each token, on the bundled tokenizer. Prints both times and whether the texts agree.

    MEMLLM_EVAL_DATA=../shared/data .venv/bin/python docs/probes/textstream_decode.py [--tokens 3000]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from memllm.testing import real_model
from memllm.textstream import TextStream


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=3000)
    args = parser.parse_args()
    tok = real_model().tokenizer
    book = Path(os.environ.get("MEMLLM_EVAL_DATA", "../shared/data")) / "gutenberg" / "moby_dick.txt"
    tail = " héllo wörld ✓ 日本語 🙂"
    ids = tok.encode(book.read_text()[:20000], add_special_tokens=False)[: args.tokens]
    ids += tok.encode(tail, add_special_tokens=False)

    t0 = time.perf_counter()
    stream = TextStream(tok)
    streamed = "".join(stream.push(i) for i in ids) + stream.finish()
    incremental = time.perf_counter() - t0

    t0 = time.perf_counter()
    for n in range(1, len(ids) + 1):
        tok.decode(ids[:n], skip_special_tokens=True)
    whole = time.perf_counter() - t0

    same = streamed == tok.decode(ids, skip_special_tokens=True)
    print(f"{len(ids)} tokens: TextStream {incremental:.3f} s, decode all ids per token {whole:.3f} s")
    print(f"same text: {same}")


if __name__ == "__main__":
    main()
