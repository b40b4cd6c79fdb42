"""Converting the bundled checkpoint: processes (or threads) starting together convert it once."""

from __future__ import annotations

import threading
import time

from memllm import loading


def test_concurrent_first_loads_convert_once(tmp_path, monkeypatch):
    calls: list[str] = []

    def slow_convert(gguf, folder):
        calls.append(threading.current_thread().name)
        time.sleep(0.3)  # long enough for the other thread to arrive while this one converts
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        return folder

    monkeypatch.setattr(loading, "convert_gguf", slow_convert)
    folder = tmp_path / "models" / "m"
    results: list = []
    threads = [
        threading.Thread(target=lambda: results.append(loading._converted(tmp_path / "m.gguf", folder)), name=f"t{i}")
        for i in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [folder, folder]
    assert (folder / "config.json").is_file()
