"""Several processes (torchrun on CPU, gloo) share the work and give the same distilled set as one."""

import os
import subprocess
import sys

from helpers import cli, distill_arguments, folder_bytes


def on_two_processes(saved_inputs, output, *arguments):
    """``hf-pds distill`` under ``torchrun --nproc_per_node 2`` (gloo on CPU); returns its output."""
    temporary = output.parent / "torchrun-tmp"  # torchrun leaves its log folders in the temporary directory
    temporary.mkdir()
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(temporary)}
    double = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "hf_pds.cli", *distill_arguments(saved_inputs, output, *arguments),
        ],
        capture_output=True, text=True, timeout=600, env=environment,
    )  # fmt: skip
    assert double.returncode == 0, double.stdout + double.stderr
    return double.stdout + double.stderr


def on_one_process(saved_inputs, output, *arguments):
    single = cli(*distill_arguments(saved_inputs, output, *arguments))
    single_output = single.communicate(timeout=300)[0]
    assert single.returncode == 0, single_output


def test_two_processes_give_the_same_distilled_set_as_one(saved_inputs, tmp_path):
    arguments = ("--budget", "5", "--num-inference-steps", "2", "--batch-size", "2")
    on_one_process(saved_inputs, tmp_path / "one", *arguments)
    output = on_two_processes(saved_inputs, tmp_path / "two", *arguments)
    assert output.count("processes: 2") == 1
    assert "terminate called" not in output
    assert folder_bytes(tmp_path / "two") == folder_bytes(tmp_path / "one")
    card = (tmp_path / "two" / "README.md").read_text()
    assert "| `kmeans_backend` | `faiss` |" in card  # the backend "auto" chose is named in the card


def test_best_of_three_on_two_processes_gives_the_same_distilled_set_as_one(saved_inputs, tmp_path):
    arguments = ("--budget", "3", "--candidates", "3", "--num-inference-steps", "2", "--batch-size", "2")
    on_one_process(saved_inputs, tmp_path / "one", *arguments)
    on_two_processes(saved_inputs, tmp_path / "two", *arguments)
    assert folder_bytes(tmp_path / "two") == folder_bytes(tmp_path / "one")
    assert "| `candidates` | `3` |" in (tmp_path / "two" / "README.md").read_text()
