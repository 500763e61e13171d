"""The user's real path: checkpoints laid out as the real ones (tiny weights), used as the README shows.

The README's Python and command-line examples run as they are written, Hub ids included, against a Hub cache
that holds the checkpoint folders under their real ids: only the dataset id, the device, the budget and the
number of steps are swapped for what a CPU test affords. No test prepares a pipeline in a way a user would not.
"""

import os
import shlex
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch

from helpers import mixed_dataset, readme_block
from hf_pds import PDSPipeline
from hf_pds.cli import main
from hf_pds.testing import CHECKPOINT_LAYOUTS, tiny_pds_components

STEPS = {"num_inference_steps": 2}


def source_folder(tmp_path):
    """A local dataset folder (one Parquet file per split), as a user's own dataset."""
    folder = tmp_path / "flickr30k"
    folder.mkdir()
    mixed_dataset(8).to_parquet(folder / "train.parquet")
    return folder


def run(command, cwd, cache):
    environment = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)


def swapped(code: str, replacements: dict) -> str:
    for old, new in replacements.items():
        assert old in code, f"the README no longer says {old!r}: update this test with it"
        code = code.replace(old, new)
    return code


def pixels(dataset):
    return [np.asarray(image) for image in dataset["image"]]


def test_the_readme_real_use_runs_as_written(checkpoints, tmp_path):
    code = swapped(
        readme_block("Real use"),
        {
            '.to("cuda")': '.to("cpu")',
            '"my-org/flickr30k"': repr(str(source_folder(tmp_path))),
            "budget=500,": "budget=3, num_inference_steps=2,",
        },
    )
    code += (
        "\nreloaded = load_dataset('flickr30k-pds-500', split='train')"
        "\nprint('RESULT', len(out.dataset), out.prototypes.image_prototypes.shape[1], pipe.unet.dtype,"
        " out.provenance['decoder_revision'], reloaded.num_rows)\n"
    )
    result = run([sys.executable, "-c", code], tmp_path, checkpoints.cache)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))
    small = checkpoints.by_name["stable-diffusion-2-1-unclip-small"]
    assert line.split()[1:] == ["3", "768", "torch.float16", small.revision, "3"]


def test_the_readme_command_line_runs_as_written(checkpoints, tmp_path):
    distill, help_line = readme_block("Real use", index=1).strip().splitlines()
    distill = swapped(
        distill,
        {"my-org/flickr30k": str(source_folder(tmp_path)), "--budget 500": "--budget 3 --num-inference-steps 2"},
    )
    command = [sys.executable, "-m", "hf_pds.cli", *shlex.split(distill)[1:]]
    result = run(command, tmp_path, checkpoints.cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert datasets.load_dataset(str(tmp_path / "flickr30k-pds-500"), split="train").num_rows == 3
    helped = run(
        [sys.executable, "-m", "hf_pds.cli", *shlex.split(help_line.split("#")[0])[1:]], tmp_path, checkpoints.cache
    )
    assert helped.returncode == 0
    text = " ".join(helped.stdout.split())
    assert (
        "(default: the paper's 0.2;" in text
        and "(default: 42)" in text
        and "(default: 224)" in text
        and "(default: 8)" in text
    )


@pytest.mark.parametrize("name", list(CHECKPOINT_LAYOUTS))
def test_a_plain_checkpoint_gets_the_clip_tower_of_its_image_encoder(checkpoints, name):
    checkpoint = checkpoints.by_name[name]
    pipe = PDSPipeline.from_pretrained(checkpoint.hub_id, cache_dir=checkpoints.cache)
    assert pipe.clip_text_encoder.config.name_or_path == checkpoint.clip_id
    assert type(pipe.scheduler).__name__ == "PNDMScheduler" and pipe.scheduler.config.prediction_type == "v_prediction"
    out = pipe(mixed_dataset(6), budget=2, **STEPS)
    width = CHECKPOINT_LAYOUTS[name]["projection"]
    assert np.asarray(out.dataset["image_embedding"]).shape == (2, width)
    assert np.asarray(out.dataset["text_embedding"]).shape == (2, width)
    assert out.provenance["decoder_checkpoint"] == checkpoint.hub_id
    assert out.provenance["decoder_revision"] == checkpoint.revision


@pytest.mark.filterwarnings("ignore:`torch_dtype` is deprecated:FutureWarning")
@pytest.mark.parametrize("keyword", ["dtype", "torch_dtype"])
def test_dtype_and_torch_dtype_reach_every_model(checkpoints, keyword):
    small = checkpoints.by_name["stable-diffusion-2-1-unclip-small"]
    pipe = PDSPipeline.from_pretrained(
        small.unclip, clip_model_name_or_path=str(small.clip), **{keyword: torch.bfloat16}
    )
    models = {name: module for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
    assert "clip_text_encoder" in models
    assert {name: module.dtype for name, module in models.items() if name != "image_normalizer"} == {
        name: torch.bfloat16 for name in models if name != "image_normalizer"
    }


def test_a_pipeline_built_by_hand_from_its_components_runs(tmp_path):
    pipe = PDSPipeline(**tiny_pds_components(seed=0))
    out = pipe(mixed_dataset(6), budget=2, output_size=32, **STEPS)
    assert out.dataset.num_rows == 2


def test_save_pretrained_then_from_pretrained_gives_the_same_images(checkpoints, tmp_path):
    small = checkpoints.by_name["stable-diffusion-2-1-unclip-small"]
    pipe = PDSPipeline.from_pretrained(small.unclip, clip_model_name_or_path=str(small.clip))
    dataset = mixed_dataset(6)
    first = pipe(dataset, budget=2, **STEPS)
    pipe.save_pretrained(tmp_path / "pds")
    again = PDSPipeline.from_pretrained(tmp_path / "pds")(dataset, budget=2, **STEPS)
    for a, b in zip(pixels(first.dataset), pixels(again.dataset), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_command_line_distills_with_a_checkpoint_folder_and_a_clip_folder(checkpoints, tmp_path):
    small = checkpoints.by_name["stable-diffusion-2-1-unclip-small"]
    arguments = ["distill", "--dataset", str(source_folder(tmp_path)), "--pipeline", str(small.unclip)]
    arguments += ["--clip-model", str(small.clip), "--budget", "2", "--num-inference-steps", "2"]
    assert main([*arguments, "--output", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert datasets.load_dataset(str(tmp_path / "out"), split="train").num_rows == 2
