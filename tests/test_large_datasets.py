"""Precomputed embeddings distilled as a user does it: a folder in clip-retrieval's layout through the command line
and ``pipe(embeddings=...)``, a dataset with embedding columns, with the 768-d checkpoint laid out as
``sd2-community/stable-diffusion-2-1-unclip-small``; the sharded prototype stage end to end, on one process and two.
"""

import os
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pytest

from helpers import cli, folder_bytes
from hf_pds import PDSPipeline
from hf_pds.testing import planted_pairs, write_clip_retrieval

N_PAIRS, CONCEPTS, SHARD = 600, 6, 250
FAST = {"num_inference_steps": 1, "output_size": 32}


@pytest.fixture(scope="module")
def small(checkpoints):
    return checkpoints.stable_diffusion_2_1_unclip_small


@pytest.fixture(scope="module")
def pipe(small):
    return PDSPipeline.from_pretrained(small.unclip, clip_model_name_or_path=small.clip)


@pytest.fixture(scope="module")
def planted():
    images, texts, concept = planted_pairs(N_PAIRS, 768, CONCEPTS, seed=3)
    captions = [f"a photo of concept {c}, pair {row}" for row, c in enumerate(concept)]
    return images, texts, captions


@pytest.fixture(scope="module")
def folder(planted, tmp_path_factory):
    """600 pairs in three float16 shards (250, 250, 100 rows), as clip-retrieval writes them."""
    return write_clip_retrieval(tmp_path_factory.mktemp("laion") / "embeddings", *planted, shard_size=SHARD)


def distill_embeddings(folder, small, output, *extra):
    return [
        "distill", "--embeddings", str(folder), "--pipeline", str(small.unclip), "--clip-model", str(small.clip),
        "--budget", "4", "--output", str(output), "--num-inference-steps", "1", "--output-size", "32", *extra,
    ]  # fmt: skip


def test_a_clip_retrieval_folder_is_distilled_in_python_and_its_card_says_where_the_embeddings_came_from(
    pipe, folder, planted, tmp_path
):
    out = pipe(embeddings=folder, budget=CONCEPTS, output_dir=tmp_path / "pds", **FAST)
    captions = planted[2]
    assert len(out.dataset) == CONCEPTS
    # Each caption is the metadata's row that the prototype retrieved, by its global index across shards.
    assert out.dataset["caption"] == [captions[index] for index in out.dataset["source_caption_index"]]
    assert out.settings["source_captions"] == N_PAIRS and out.settings["prototype_stage"] == "in-memory"
    # The planted concepts are found: each prototype's caption names another one.
    assert len({caption.split(",")[0] for caption in out.dataset["caption"]}) == CONCEPTS
    card = (tmp_path / "pds" / "README.md").read_text()
    assert "clip-retrieval" in card and "`embeddings`" in card and "600 pairs in 3 shards" in card
    assert str(folder.parent) not in card  # a local folder by its last part only
    assert datasets.load_dataset(str(tmp_path / "pds"), split="train").num_rows == CONCEPTS


def test_the_sharded_stage_matches_as_many_pairs_as_the_in_memory_one(pipe, folder):
    runs = {
        stage: pipe(embeddings=folder, budget=CONCEPTS, prototype_stage=stage, **FAST).prototypes
        for stage in ("in-memory", "sharded")
    }
    in_memory, sharded = (int(runs[stage].support.sum()) for stage in ("in-memory", "sharded"))
    assert abs(sharded - in_memory) <= 0.02 * in_memory
    assert runs["sharded"].settings["engine"] == "sharded"


def test_a_dataset_with_embedding_columns_is_distilled_without_images(pipe, planted):
    images, texts, captions = planted
    rows = datasets.Dataset.from_dict({"caption": captions, "clip_image": images.tolist(), "clip_text": texts.tolist()})
    out = pipe(rows, budget=CONCEPTS, image_embedding_column="clip_image", text_embedding_column="clip_text", **FAST)
    assert out.dataset["caption"] == [captions[index] for index in out.dataset["source_caption_index"]]
    assert out.settings["source_images"] == N_PAIRS


def test_unit_vectors_are_refused_unless_a_norm_is_given_and_then_the_image_prototypes_take_it(pipe, planted, tmp_path):
    images, texts, captions = planted
    unit = [rows / np.linalg.norm(rows, axis=1, keepdims=True) for rows in (images, texts)]
    folder = write_clip_retrieval(tmp_path / "unit", *unit, captions, shard_size=SHARD)
    with pytest.raises(ValueError, match=r"L2-normalised.*embedding_norm"):
        pipe(embeddings=folder, budget=CONCEPTS, **FAST)
    once, twice = (
        pipe(embeddings=folder, budget=CONCEPTS, embedding_norm=norm, **FAST).prototypes for norm in (1.0, 2.0)
    )
    np.testing.assert_allclose(twice.image_prototypes, 2 * once.image_prototypes, rtol=1e-6)
    decoder_norm = pipe.decoder.embedding_norm(pipe.components)
    rescaled = pipe(embeddings=folder, budget=CONCEPTS, embedding_norm="decoder", **FAST)
    assert rescaled.settings["embedding_norm"] == pytest.approx(decoder_norm)
    raw = write_clip_retrieval(tmp_path / "raw", images, texts, captions, shard_size=SHARD)
    with pytest.raises(ValueError, match="these are raw"):  # raw input is never rescaled
        pipe(embeddings=raw, budget=3, embedding_norm=2.0, **FAST)


def test_embeddings_of_another_width_are_refused_naming_both_widths(pipe, planted, tmp_path):
    images, texts, captions = planted
    folder = write_clip_retrieval(tmp_path / "vit-h", images[:, :512], texts[:, :512], captions, shard_size=SHARD)
    with pytest.raises(ValueError, match=r"512.*768|768.*512"):
        pipe(embeddings=folder, budget=3, output_dir=tmp_path / "out", **FAST)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["vit-h"]  # refused before any work: nothing written


def test_a_nan_row_is_named_by_its_shard_and_row(pipe, planted, tmp_path):
    images, texts, captions = planted
    images = images.copy()
    images[SHARD + 7, 3] = np.nan  # row 7 of the second shard
    folder = write_clip_retrieval(tmp_path / "nan", images, texts, captions, shard_size=SHARD)
    for stage in ("in-memory", "sharded"):
        with pytest.raises(ValueError, match=r"img_emb_1\.npy.*rows: \[7\]"):
            pipe(embeddings=folder, budget=3, prototype_stage=stage, **FAST)


def test_a_dataset_and_embeddings_together_are_refused(pipe, folder, planted):
    rows = datasets.Dataset.from_dict({"caption": planted[2][:4]})
    with pytest.raises(ValueError, match="not both"):
        pipe(rows, budget=3, embeddings=folder, **FAST)
    with pytest.raises(ValueError, match="Nothing to distill"):
        pipe(budget=3, **FAST)


def test_the_command_line_distills_a_clip_retrieval_folder(folder, small, tmp_path):
    run = cli(*distill_embeddings(folder, small, tmp_path / "out"))
    printed = run.communicate(timeout=300)[0]
    assert run.returncode == 0, printed
    assert "Distilled 600 pairs" in printed
    assert datasets.load_dataset(str(tmp_path / "out"), split="train").num_rows == 4


def test_the_command_line_names_a_shard_whose_rows_do_not_align_before_any_work(folder, small, tmp_path):
    broken = tmp_path / "broken"
    write_clip_retrieval(broken, *(np.zeros((10, 768)),) * 2, ["a"] * 10, shard_size=10)
    np.save(broken / "text_emb" / "text_emb_0.npy", np.ones((9, 768), dtype=np.float16))
    run = cli(*distill_embeddings(broken, small, tmp_path / "out"))
    printed = run.communicate(timeout=300)[0]
    assert run.returncode == 2, printed
    assert "text_emb_0.npy" in printed and "9" in printed and "10" in printed
    assert len(printed.strip().splitlines()) == 1  # one line, no traceback
    assert not (tmp_path / "out").exists()


def test_two_processes_give_the_same_distilled_set_as_one_on_the_sharded_stage(folder, small, tmp_path):
    arguments = distill_embeddings(folder, small, tmp_path / "one", "--prototype-stage", "sharded")
    single = cli(*arguments)
    assert single.wait(timeout=300) == 0, single.communicate()[0]
    temporary = tmp_path / "torchrun-tmp"
    temporary.mkdir()
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(temporary)}
    arguments = distill_embeddings(folder, small, tmp_path / "two", "--prototype-stage", "sharded")
    double = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hf_pds.cli",
         *arguments],
        capture_output=True, text=True, timeout=600, env=environment,
    )  # fmt: skip
    assert double.returncode == 0, double.stdout + double.stderr
    assert folder_bytes(tmp_path / "two") == folder_bytes(tmp_path / "one")

    # Two machines without a shared file system: each holds only the shards its process reads (process 0 shards 0
    # and 1, process 1 shard 2, of 3), under the same name.
    nodes = [tmp_path / f"node{rank}" / "embeddings" for rank in (0, 1)]
    held = {0: (0, 1), 1: (2,)}
    for rank, node in enumerate(nodes):
        shutil.copytree(folder, node)
        for path in node.rglob("*_[0-9]*.*"):
            if int(path.stem.rsplit("_", 1)[1]) not in held[rank]:
                path.unlink()
    spread = torchrun_per_rank(nodes, small, tmp_path / "spread", environment)
    assert spread.returncode == 0, spread.stdout + spread.stderr
    assert folder_bytes(tmp_path / "spread") == folder_bytes(tmp_path / "one")

    # A machine that lacks a shard its process reads is named, by every process, before any work.
    shutil.rmtree(nodes[1])
    shutil.copytree(nodes[0], nodes[1])  # node 1 holds shards 0 and 1, not shard 2, which its process reads ...
    shutil.rmtree(nodes[0])
    shutil.copytree(folder, nodes[0])  # ... and node 0 holds all three
    refused = torchrun_per_rank(nodes, small, tmp_path / "refused", environment)
    assert refused.returncode != 0
    assert "Process 1 of 2 reads shards 2 to 2" in refused.stdout + refused.stderr
    assert not (tmp_path / "refused" / "data").exists()


def torchrun_per_rank(nodes, small, output, environment) -> subprocess.CompletedProcess:
    """``hf-pds distill`` on 2 processes, process ``r`` reading ``nodes[r]`` (as a machine reads its own disk)."""
    arguments = distill_embeddings("$NODE", small, output, "--prototype-stage", "sharded")
    script = f'NODE={nodes[0].parent.parent}/node$RANK/embeddings; exec "$0" -m hf_pds.cli ' + " ".join(
        f'"{argument}"' for argument in arguments
    )
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
         "bash", "-c", script, sys.executable],
        capture_output=True, text=True, timeout=600, env=environment,
    )  # fmt: skip
