"""``legion bench --model-memory``'s reading of /proc: a mapped file's pages show up as that
file's RSS and PSS, and in the process's totals."""

from __future__ import annotations

import mmap
import os

from legion_cli.model_memory import process_memory


def test_a_mapped_files_pages_count_as_its_rss_and_pss(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(4 << 20))
    before = process_memory(os.getpid(), str(path))
    assert before["model_file_rss"] == 0
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        total = sum(m[i] for i in range(0, len(m), mmap.PAGESIZE))  # touch every page
        after = process_memory(os.getpid(), str(path))
    assert total >= 0
    assert 3.9 <= after["model_file_rss"] <= 4.1  # MiB: the 4 MiB file, all of it paged in
    assert 0 < after["model_file_pss"] <= after["model_file_rss"]
    assert after["rss"] >= after["model_file_rss"] and after["pss"] > 0
