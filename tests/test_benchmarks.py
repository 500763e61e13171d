import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
END_TO_END = re.compile(r"end-to-end: \d+(\.\d+)? s \(\d+(\.\d+)?x the reference\)")


def test_end_to_end_benchmark_runs_tiny_and_ends_with_its_summary_line(tmp_path):
    caches = tmp_path / "caches"
    caches.mkdir()
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_PDS_CACHE": str(tmp_path / "hf-pds"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
    }
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "end_to_end.py"),
        "--size",
        "tiny",
        "--images",
        "60",
        "--budget",
        "6",
        "--subset",
        "2",
        "--steps",
        "3",
        "--cache-dir",
        str(caches),
    ]
    finished = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-4000:]
    lines = finished.stdout.strip().splitlines()
    assert END_TO_END.fullmatch(lines[-1]), lines[-5:]
    assert "run B read its embeddings from the cache: no CLIP text forward pass" in finished.stdout
    # The run's embedding cache is its own, and it is removed at the end.
    assert list(caches.iterdir()) == []
