"""Named crash points for crash-safety tests.

``crash_point(name)`` does nothing unless ``MEMLLM_CRASHPOINT`` equals ``name``. Then, by
``MEMLLM_CRASHPOINT_ACTION``:

* ``pause`` (default): print ``CRASHPOINT <name>`` on stdout (flushed) and sleep, so a parent
  process can SIGKILL this one at exactly that point;
* ``kill``: SIGKILL this process at once.

``MEMLLM_CRASHPOINT_SKIP=n`` lets the first ``n`` hits of the point pass.

Points: ``payload.before_append``, ``payload.mid_record`` (half a record written and synced),
``writer.before_commit`` (payloads synced, rows flushed, not committed), ``writer.after_commit``
(committed, indexes not updated), ``index.mid_save`` (temporary index file half written),
``index.before_replace`` (temporary file complete, not renamed), ``compaction.after_copy`` (new
payload file written, rows not updated), ``compaction.after_commit`` (rows point to the new file,
the old one not deleted).
"""

from __future__ import annotations

import os
import signal
import sys
import time

ENV = "MEMLLM_CRASHPOINT"
_hits: dict[str, int] = {}


def armed(name: str) -> bool:
    """Count a hit of ``name``; True when this hit must stop the process (then call :func:`stop`)."""
    if os.environ.get(ENV) != name:
        return False
    hits = _hits.get(name, 0)
    _hits[name] = hits + 1
    return hits >= int(os.environ.get(ENV + "_SKIP", "0"))


def crash_point(name: str) -> None:
    if armed(name):
        stop(name)


def stop(name: str) -> None:
    """Stop here: SIGKILL ourselves, or announce and wait for the parent's SIGKILL."""
    if os.environ.get(ENV + "_ACTION", "pause") == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdout.write(f"CRASHPOINT {name}\n")
    sys.stdout.flush()
    while True:  # the parent kills us here
        time.sleep(60)
