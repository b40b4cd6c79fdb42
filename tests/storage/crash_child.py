"""Child process of the crash tests: writes to a knowledge base until a crash point stops it.

usage: crash_child.py URL SCHEMA|- DATA_DIR KB_ID ingest|ingest:FIRST:COUNT|compact
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from storage_helpers import ingest_doc, store_for

from memllm_storage.owners import Owner


async def main(url: str, schema: str | None, data_dir: str, kb_id: int, scenario: str) -> None:
    store = store_for(url, schema, Path(data_dir))
    try:
        if scenario == "ingest":
            for doc_no in range(3):
                await ingest_doc(store, kb_id, doc_no)
        elif scenario.startswith("ingest:"):  # ingest:FIRST:COUNT (no crash point: concurrency test)
            first, count = map(int, scenario.split(":")[1:])
            for doc_no in range(first, first + count):
                await ingest_doc(store, kb_id, doc_no)
        elif scenario == "compact":
            ids = [await ingest_doc(store, kb_id, doc_no) for doc_no in range(3)]
            async with store.writer(Owner.kb(kb_id)) as w:
                await w.delete_document(ids[1])
            await store.compact(Owner.kb(kb_id))
        else:
            raise SystemExit(f"unknown scenario {scenario}")
    finally:
        await store.close()
    print("DONE", flush=True)


if __name__ == "__main__":
    url, schema, data_dir, kb_id, scenario = sys.argv[1:6]
    asyncio.run(main(url, None if schema == "-" else schema, data_dir, int(kb_id), scenario))
