"""Our importable packages carry names no other distribution uses, so memllm installs beside
Hugging Face's ``kernels`` (a dependency of transformers >= 5.25), PyPI's ``storage`` and any other ``api``."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUR_PACKAGES = {"memllm", "memllm_api", "memllm_kernels", "memllm_storage"}


def test_hugging_face_kernels_and_ours_import_side_by_side():
    import kernels

    import memllm_kernels
    import memllm_storage

    hub = importlib.metadata.distribution("kernels")  # Hugging Face's kernel hub, installed beside us
    assert Path(kernels.__file__).resolve().is_relative_to(Path(hub.locate_file("")).resolve())
    assert hasattr(kernels, "get_kernel") and not hasattr(kernels, "attention_with_lse")
    assert hasattr(memllm_kernels, "attention_with_lse")
    assert Path(memllm_kernels.__file__).resolve().is_relative_to(ROOT / "kernels")
    assert Path(memllm_storage.__file__).resolve().is_relative_to(ROOT / "storage")


def test_transformers_sees_the_hub_not_ours():
    import kernels
    from transformers.utils import import_utils

    assert import_utils.is_kernels_available() is True
    assert not hasattr(kernels, "memory_attention")


@pytest.mark.slow
def test_the_wheel_holds_only_our_own_top_level_packages(tmp_path):
    """Built as pip would build it: its top-level names are exactly ours (no ``kernels``, ``storage``)."""
    import shutil

    src = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("memllm", "api", "kernels", "storage"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path / "wheel"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), "."]
    subprocess.run(cmd, cwd=src, check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("memllm-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == OUR_PACKAGES
    assert any(n.startswith("memllm_storage/migrations/versions/") for n in names)
    assert "memllm_storage/migrations/script.py.mako" in names


def test_our_packages_come_from_this_distribution():
    dist = importlib.metadata.distribution("memllm")
    assert dist.metadata["Name"] == "memllm"
    requires = " ".join(dist.requires or [])
    assert "transformers>=4.57" in requires and "<5.25" not in requires


def test_settings_read_from_environment(tmp_path):
    from memllm.settings import Settings

    s = Settings.from_env({"MEMLLM_DATA_DIR": str(tmp_path), "MEMLLM_MEMORY_TOP_K": "7", "MEMLLM_DTYPE": "float32"})
    assert s.data_dir == tmp_path and s.memory.top_k == 7 and s.dtype == "float32"
    assert s.resolved_database_url.endswith(str(tmp_path / "memllm.db"))
    with pytest.raises(ValueError, match="MEMLLM_MEMORY_TOP_K"):
        Settings.from_env({"MEMLLM_MEMORY_TOP_K": "lots"})
