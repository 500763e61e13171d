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


EMBED_ON_EACH_PROCESS = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from helpers import mixed_dataset
from hf_pds.cache import EmbeddingCache
from hf_pds.distributed import process_state
from hf_pds.embedding import ClipTowers, embed
from hf_pds.pairs import read_pairs
from hf_pds.testing import tiny_pds_components

parts = tiny_pds_components(seed=0)
towers = ClipTowers(
    parts["image_encoder"], parts["feature_extractor"], parts["clip_text_encoder"], parts["clip_tokenizer"]
)
calls = []
parts["image_encoder"].register_forward_hook(lambda module, args, output: calls.append(len(output[0])))
state = process_state()
dataset = mixed_dataset(5)
cache = EmbeddingCache(sys.argv[2])
embeddings = embed(dataset, read_pairs(dataset), "image", "caption", towers, "cpu", batch_size=2, shard_size=2,
                   cache=cache, progress=False, state=state)
print(f"process {state.process_index} embedded {sum(calls)} images of {embeddings.store.n_images}", flush=True)
"""


def test_two_processes_write_disjoint_shards_of_one_store(tmp_path):
    from helpers import REPO, mixed_dataset
    from hf_pds.embedding import ClipTowers, embed
    from hf_pds.pairs import read_pairs
    from hf_pds.shards import open_store
    from hf_pds.testing import tiny_pds_components

    script = tmp_path / "embed.py"
    script.write_text(EMBED_ON_EACH_PROCESS)
    temporary = tmp_path / "torchrun-tmp"
    temporary.mkdir()
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(temporary)}
    double = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(script), str(REPO / "tests"), str(tmp_path / "cache"),
        ],
        capture_output=True, text=True, timeout=600, env=environment,
    )  # fmt: skip
    assert double.returncode == 0, double.stdout + double.stderr
    # 5 images in 3 shards of 2: process 0 embeds shards 0 and 1, process 1 shard 2; each gets the whole store.
    assert "process 0 embedded 4 images of 5" in double.stdout and "process 1 embedded 1 images of 5" in double.stdout
    (entry,) = (tmp_path / "cache").iterdir()
    two = open_store(entry).arrays()
    parts = tiny_pds_components(seed=0)
    towers = ClipTowers(
        parts["image_encoder"], parts["feature_extractor"], parts["clip_text_encoder"], parts["clip_tokenizer"]
    )
    dataset = mixed_dataset(5)
    with embed(dataset, read_pairs(dataset), "image", "caption", towers, "cpu", batch_size=2, shard_size=2) as one:
        for name in ("image_embeds", "text_embeds", "caption_image", "rows"):
            assert (getattr(one, name) == getattr(two, name)).all(), name  # the same bits as one process
