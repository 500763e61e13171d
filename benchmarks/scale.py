"""Benchmark of hf-pds at scale: ``hf-pds distill --embeddings DIR`` on planted shards of up to 16M pairs.

The data: planted-structure pairs (``hf_pds.testing.planted_pairs``: d=768, 2,000 concepts, 10% of the captions
from another concept, raw-scale norms around 20), written once in clip-retrieval's layout (float16, 1M pairs per
shard, as LAION's embedding files) under ``--data``. The set of N pairs is the first N/1M shards of one 16M set,
linked into a folder of its own (the 0.15M set is one shard of its own). Disk: 3.1 GB per million pairs.

Each run is one whole ``hf-pds distill --embeddings`` process (or ``torchrun --nproc_per_node 2`` of it), under
``/usr/bin/time -v``: its peak RSS is the maximum resident set of the process (of the larger process under
torchrun), memory-mapped pages included. It decodes with a checkpoint laid out as
``sd2-community/stable-diffusion-2-1-unclip-small`` (768-d, one-layer random models, one denoising step, 32 px):
the decoder's cost is small and the same at every N. Printed per run:

- prototype s: the prototype stage (steps 2-6; "Extracted ... prototypes in ... s" in the log);
- pairs/s: N over the prototype stage's seconds;
- whole s, peak RSS: the whole process (loading, checks, prototypes, decoding, saving);
- matched: the matched overlap, the sum of ``support`` (pairs in the matched intersections), read from the output.

``--stages`` picks the prototype stage: ``sharded`` (passes over the shards) and ``in-memory`` (today's path: every
embedding in memory, faiss), the latter only where it fits (at most 1M pairs on 24 GiB).

    python benchmarks/scale.py                                            # all sizes, budgets 500 and 1000
    python benchmarks/scale.py --sizes 0.15M,1M --stages sharded,in-memory --budgets 500
    python benchmarks/scale.py --sizes 1M --processes 1,2 --budgets 500   # 1 vs 2 processes (torchrun, gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 768
CONCEPTS = 2_000
SHARD = 1_000_000
SIZES = {"0.15M": 150_000, "1M": 1_000_000, "4M": 4_000_000, "16M": 16_000_000}
# Where today's in-memory path fits on this 24 GiB machine.
IN_MEMORY_LIMIT = 1_000_000


def planted_folder(data: Path, n_pairs: int) -> Path:
    """The clip-retrieval folder of the first ``n_pairs`` planted pairs, written (or linked) under ``data``."""
    from hf_pds.testing import planted_pairs, write_clip_retrieval_shard

    name = f"pairs-{n_pairs}"
    folder = data / name
    if (folder / "done").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    if n_pairs % SHARD:  # a set of its own, smaller than a shard
        shards = [(0, n_pairs, folder)]
    else:
        every = data / "shards"
        shards = [(index, SHARD, every) for index in range(n_pairs // SHARD)]
    for index, rows, target in shards:
        if not (target / "metadata" / f"metadata_{index}.parquet").is_file():
            started = time.perf_counter()
            images, texts, concept = planted_pairs(rows, DIM, CONCEPTS, seed=0, shard=index)
            captions = [f"a photo of concept {c} (pair {index * SHARD + row})" for row, c in enumerate(concept)]
            write_clip_retrieval_shard(target, index, images.astype(np.float16), texts.astype(np.float16), captions)
            del images, texts
            print(f"  planted shard {index} ({rows} pairs) in {time.perf_counter() - started:.0f} s", flush=True)
        if target != folder:
            for kind, suffix in (("img_emb", "npy"), ("text_emb", "npy"), ("metadata", "parquet")):
                (folder / kind).mkdir(parents=True, exist_ok=True)
                link = folder / kind / f"{kind}_{index}.{suffix}"
                link.symlink_to(target / kind / f"{kind}_{index}.{suffix}")
    (folder / "done").write_text("")
    return folder


def decoder_folder(data: Path) -> dict:
    """A checkpoint laid out as stable unCLIP 2.1 -small (768-d), tiny random weights: written once."""
    from hf_pds.testing import save_checkpoint_like

    folder = data / "unclip-small"
    if not (folder / "done").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        arguments = save_checkpoint_like(folder)
        (folder / "done").write_text(json.dumps(arguments))
    return json.loads((folder / "done").read_text())


def run(embeddings: Path, checkpoint: dict, budget: int, stage: str, processes: int, work: Path) -> dict:
    """One ``hf-pds distill --embeddings`` process; its figures."""
    output = work / f"out-{budget}-{stage}-{processes}"
    command = [
        "distill", "--embeddings", str(embeddings), "--budget", str(budget), "--prototype-stage", stage,
        "--pipeline", checkpoint["pretrained_model_name_or_path"],
        "--clip-model", checkpoint["clip_model_name_or_path"],
        "--num-inference-steps", "1", "--output-size", "32", "--batch-size", "64", "--output", str(output),
        "--no-cache",
    ]  # fmt: skip
    if processes == 1:
        launcher = [sys.executable, "-m", "hf_pds.cli"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        launcher += ["-m", "hf_pds.cli"]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(work)}
    started = time.perf_counter()
    result = subprocess.run(
        ["/usr/bin/time", "-v", *launcher, *command], capture_output=True, text=True, env=environment
    )
    wall = time.perf_counter() - started
    log = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"hf-pds distill failed ({result.returncode}):\n{log[-4000:]}")
    prototypes = float(re.search(r"Extracted \d+ prototypes in ([\d.]+) s", log).group(1))
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", log).group(1))
    import datasets

    distilled = datasets.load_dataset("parquet", data_files=str(output / "data" / "*.parquet"), split="train")
    matched = int(np.sum(distilled["support"]))
    shutil.rmtree(output)
    return {"prototype_s": prototypes, "whole_s": wall, "peak_rss_mib": peak_kib / 1024, "matched": matched}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated sizes among " + ", ".join(SIZES))
    parser.add_argument("--budgets", default="500,1000")
    parser.add_argument("--stages", default="sharded,in-memory", help="sharded, in-memory (where it fits)")
    parser.add_argument("--processes", default="1", help="comma-separated process counts, e.g. 1,2")
    parser.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "hf-pds-scale"), help="planted data")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    args = parser.parse_args()

    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    print(f"python {' '.join(sys.argv)}", flush=True)
    checkpoint = decoder_folder(data)
    rows = []
    header = "| pairs | budget | stage | processes | prototype s | pairs/s | whole s | peak RSS (MiB) | matched |"
    print(header + "\n|---|---|---|---|---|---|---|---|---|", flush=True)
    for size in args.sizes.split(","):
        n_pairs = SIZES[size]
        embeddings = planted_folder(data, n_pairs)
        for budget in map(int, args.budgets.split(",")):
            for stage in args.stages.split(","):
                if stage == "in-memory" and n_pairs > IN_MEMORY_LIMIT:
                    continue
                for processes in map(int, args.processes.split(",")):
                    with tempfile.TemporaryDirectory(dir=data) as work:
                        figures = run(embeddings, checkpoint, budget, stage, processes, Path(work))
                    row = {"pairs": n_pairs, "budget": budget, "stage": stage, "processes": processes, **figures}
                    rows.append(row)
                    print(
                        f"| {size} | {budget} | {stage} | {processes} | {figures['prototype_s']:.1f} | "
                        f"{n_pairs / figures['prototype_s']:,.0f} | {figures['whole_s']:.1f} | "
                        f"{figures['peak_rss_mib']:,.0f} | {figures['matched']:,} |",
                        flush=True,
                    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
