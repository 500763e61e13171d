"""Decoders as parts: the paper's checkpoint at its current address, and each decoder family used as the README shows.

The checkpoints are tiny folders laid out as the real ones (``hf_pds.testing.save_checkpoint_like``), put in an
offline Hub cache under their real ids, so that the README's examples run as they are written.
"""

import hashlib
import sys

import datasets
import numpy as np
import pytest

from helpers import count_clip_calls, crash_encoding_after, folder_bytes, hub_cache, mixed_dataset, readme_block
from hf_pds import PDSPipeline
from hf_pds.cli import main
from hf_pds.testing import tiny_pds_components

STEPS = {"num_inference_steps": 2}


def run_python(code: str, cwd, cache):
    import os
    import subprocess

    environment = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=environment, capture_output=True, text=True)


def source_folder(tmp_path, n_images=8):
    folder = tmp_path / "flickr30k"
    folder.mkdir()
    mixed_dataset(n_images).to_parquet(folder / "train.parquet")
    return folder


def stored_png(dataset, row: int) -> bytes:
    return dataset.cast_column("image", datasets.Image(decode=False))[row]["image"]["bytes"]


# 1. The paper's checkpoint at its current address.


@pytest.fixture(scope="module")
def mirror_only_cache(checkpoints, tmp_path_factory):
    """A Hub cache that holds the sd2-community mirror of -small and its CLIP model, and nothing of stabilityai."""
    small = checkpoints.by_name["stable-diffusion-2-1-unclip-small"]
    return hub_cache(tmp_path_factory.mktemp("mirror-only"), {small.hub_id: small.unclip, small.clip_id: small.clip})


def test_a_withdrawn_id_loads_the_mirror_with_a_notice_and_the_card_names_the_mirror(
    checkpoints, mirror_only_cache, tmp_path
):
    small = checkpoints.by_name["stable-diffusion-2-1-unclip-small"]
    code = (
        "from hf_pds import PDSPipeline\n"
        "from helpers import mixed_dataset\n"
        "pipe = PDSPipeline.from_pretrained('stabilityai/stable-diffusion-2-1-unclip-small')\n"
        "out = pipe(mixed_dataset(6), budget=2, num_inference_steps=2, output_dir='out')\n"
        "print('RESULT', out.provenance['decoder_checkpoint'], out.provenance['decoder_revision'])\n"
    )
    result = run_python(f"import sys; sys.path.insert(0, {str(sys.path[0])!r})\n" + code, tmp_path, mirror_only_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    notices = [line for line in result.stderr.splitlines() if "withdrawn" in line]
    assert notices == [
        "stabilityai/stable-diffusion-2-1-unclip-small was withdrawn from the Hub in November 2025 and is not in your "
        "Hub cache: loading its community mirror sd2-community/stable-diffusion-2-1-unclip-small."
    ]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))
    assert line.split()[1:] == [small.hub_id, small.revision]
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"`{small.hub_id}` (revision `{small.revision}`)" in card


def test_a_withdrawn_id_in_the_users_hub_cache_is_used_as_it_is(checkpoints, tmp_path, caplog):
    small = checkpoints.by_name["stable-diffusion-2-1-unclip-small"]
    cache = hub_cache(tmp_path / "hub", {"stabilityai/stable-diffusion-2-1-unclip-small": small.unclip})
    pipe = PDSPipeline.from_pretrained(
        "stabilityai/stable-diffusion-2-1-unclip-small", clip_model_name_or_path=str(small.clip), cache_dir=cache
    )
    assert pipe.name_or_path == "stabilityai/stable-diffusion-2-1-unclip-small"
    assert "withdrawn" not in caplog.text
    out = pipe(mixed_dataset(6), budget=2, **STEPS)
    assert (
        out.provenance["decoder_revision"] == hashlib.sha1(b"stabilityai/stable-diffusion-2-1-unclip-small").hexdigest()
    )


def test_a_checkpoint_that_cannot_be_found_is_one_line_that_names_the_mirrors(tmp_path, capsys):
    arguments = ["distill", "--dataset", str(source_folder(tmp_path)), "--output", str(tmp_path / "out")]
    assert main([*arguments, "--pipeline", "my-org/no-such-checkpoint", "--budget", "2", "--device", "cpu"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "no-such-checkpoint" in line]
    assert len(lines) == 1, lines  # one line; before it, only the dataset's progress bars
    error = lines[0]
    assert error.startswith("hf-pds distill: error: cannot find the checkpoint my-org/no-such-checkpoint")
    assert "sd2-community/stable-diffusion-2-1-unclip-small and sd2-community/stable-diffusion-2-1-unclip" in error
    assert "stack" not in error and not (tmp_path / "out").exists()


def test_the_default_checkpoint_is_the_mirror_everywhere_a_user_reads_it(capsys):
    from hf_pds.cli import main
    from hf_pds.defaults import DEFAULT_CHECKPOINT

    assert DEFAULT_CHECKPOINT == "sd2-community/stable-diffusion-2-1-unclip-small"
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {DEFAULT_CHECKPOINT};" in help_text
    assert f'PDSPipeline.from_pretrained("{DEFAULT_CHECKPOINT}"' in readme_block("Real use")


# 2. Decoders as parts.


def test_the_unclip_decoder_makes_the_images_of_the_papers_diffusers_call(pipe, dataset):
    """The images of a whole run are those of StableUnCLIPImg2ImgPipeline called as hf-pds called it before decoders
    were parts (one prototype per call, the paper's settings, the prototype's seed), byte for byte."""
    import torch
    from diffusers import StableUnCLIPImg2ImgPipeline

    from hf_pds.pairs import encode_png
    from hf_pds.synthesis import prototype_seed, resize

    out = pipe(dataset, budget=3, num_inference_steps=2, output_size=40, use_cache=False)
    assert out.settings["decoder"] == "unclip" and out.provenance["decoder"] == "unclip"
    names = ("feature_extractor", "image_encoder", "image_normalizer", "image_noising_scheduler", "tokenizer")
    names += ("text_encoder", "unet", "scheduler", "vae")
    unclip = StableUnCLIPImg2ImgPipeline(**{name: getattr(pipe, name) for name in names})
    unclip.set_progress_bar_config(disable=True)
    for row in range(3):
        image = unclip(
            prompt=[out.dataset[row]["caption"]],
            negative_prompt=["text, watermark"],
            image_embeds=torch.as_tensor(out.prototypes.image_prototypes[row : row + 1]),
            num_inference_steps=2,
            guidance_scale=5.0,
            noise_level=10,
            generator=[torch.Generator("cpu").manual_seed(prototype_seed(42, row))],
            output_type="pil",
        ).images[0]
        assert stored_png(out.dataset, row) == encode_png(resize(image, 40))


def test_the_readme_select_example_runs_as_written(checkpoints, tmp_path):
    code = readme_block("Decoders").replace('"my-org/flickr30k"', repr(str(source_folder(tmp_path, 10))))
    code = code.replace("budget=500)", "budget=3)")
    code += (
        "\nreloaded = load_dataset('flickr30k-select-500', split='train')"
        "\nprint('RESULT', out.settings['decoder'], out.provenance['image_encoder'], reloaded.num_rows)\n"
    )
    result = run_python(code, tmp_path, checkpoints.cache)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))
    assert line.split()[1:] == ["select", "openai/clip-vit-large-patch14", "3"]
    card = (tmp_path / "flickr30k-select-500" / "README.md").read_text()
    assert "the real source image nearest its image prototype" in card and "| `decoder` | `select` |" in card


@pytest.fixture(scope="module")
def select_pipe(checkpoints):
    small = checkpoints.by_name["stable-diffusion-2-1-unclip-small"]
    return PDSPipeline.from_pretrained("select", clip_model_name_or_path=str(small.clip))


def test_select_images_are_the_source_images_nearest_the_prototypes(select_pipe):
    from hf_pds.pairs import to_rgb
    from hf_pds.synthesis import resize

    source = mixed_dataset(10)
    out = select_pipe(source, budget=3, output_size=40, use_cache=False)
    assert select_pipe.unet is None and out.settings["decoder"] == "select"
    assert "num_inference_steps" not in out.settings and out.provenance["decoder_checkpoint"] is None
    # The first prototype's image is the source image nearest it (no earlier prototype can have taken it).
    image_embeds = np.asarray(
        select_pipe.image_encoder(
            select_pipe.feature_extractor(
                images=[to_rgb(image) for image in source["image"]], return_tensors="pt"
            ).pixel_values
        ).image_embeds.detach()
    )
    nearest = [
        int(np.argmin(((image_embeds - prototype) ** 2).sum(axis=1))) for prototype in out.prototypes.image_prototypes
    ]
    expected = np.asarray(resize(to_rgb(source[nearest[0]]["image"]), 40))
    np.testing.assert_array_equal(np.asarray(out.dataset[0]["image"]), expected)


def test_select_resumes_after_a_crash_and_keeps_the_best_of_n(select_pipe, tmp_path, monkeypatch):
    source = mixed_dataset(10)
    arguments = {"budget": 3, "candidates": 2, "output_size": 40}
    whole = select_pipe(source, output_dir=tmp_path / "whole", **arguments)
    rows = [np.asarray(image).tobytes() for image in whole.dataset["image"]]
    assert len(set(rows)) == 3  # distinct real images
    crash_encoding_after(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="went down"):
        select_pipe(source, output_dir=tmp_path / "resumed", **arguments)
    monkeypatch.undo()
    assert len(list((tmp_path / ".resumed.pds-run" / "images").glob("*.png"))) == 3
    select_pipe(source, output_dir=tmp_path / "resumed", **arguments)
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(tmp_path / "whole")
    # Best of two: the kept candidate is the more faithful one.
    one = select_pipe(source, budget=3, output_size=40)
    assert np.all(np.asarray(whole.dataset["fidelity"]) >= np.asarray(one.dataset["fidelity"]) - 1e-6)


def test_select_refuses_generation_settings_and_too_large_a_selection(select_pipe):
    with pytest.raises(ValueError, match="The select decoder has no setting num_inference_steps"):
        select_pipe(mixed_dataset(6), budget=2, num_inference_steps=2)
    with pytest.raises(ValueError, match="budget=3 x candidates=3 is more than the 6 distinct images"):
        select_pipe(mixed_dataset(6), budget=3, candidates=3)


def test_a_select_pipeline_saves_and_loads_back(select_pipe, tmp_path):
    select_pipe.save_pretrained(tmp_path / "select")
    reloaded = PDSPipeline.from_pretrained(tmp_path / "select")
    assert reloaded.config.decoder == "select" and reloaded.unet is None
    source = mixed_dataset(8)
    first, again = select_pipe(source, budget=2, use_cache=False), reloaded(source, budget=2, use_cache=False)
    assert [stored_png(first.dataset, row) for row in range(2)] == [stored_png(again.dataset, row) for row in range(2)]


def test_the_command_line_distills_with_select(checkpoints, tmp_path):
    small = checkpoints.by_name["stable-diffusion-2-1-unclip-small"]
    arguments = ["distill", "--dataset", str(source_folder(tmp_path)), "--pipeline", "select"]
    arguments += ["--clip-model", str(small.clip), "--budget", "2", "--output", str(tmp_path / "out")]
    assert main([*arguments, "--device", "cpu"]) == 0
    assert datasets.load_dataset(str(tmp_path / "out"), split="train").num_rows == 2


def test_decoders_that_read_the_same_towers_share_the_embedding_cache(dataset, tmp_path):
    components = tiny_pds_components(seed=0)
    unclip = PDSPipeline(**components)
    towers = ("image_encoder", "feature_extractor", "clip_text_encoder", "clip_tokenizer")
    select = PDSPipeline(**{name: components[name] for name in towers}, decoder="select")
    assert (unclip.config.decoder, select.config.decoder) == ("unclip", "select")
    unclip(dataset, budget=2, cache_dir=tmp_path, **STEPS)
    calls, hooks = count_clip_calls(select)
    select(dataset, budget=2, cache_dir=tmp_path)
    for hook in hooks:
        hook.remove()
    assert calls == []  # the embeddings came from the cache the unclip run wrote


def test_switching_from_unclip_small_to_flux_runs_no_clip_pass(dataset, tmp_path):
    from hf_pds.testing import save_checkpoint_like

    # Both fixtures hold the same CLIP ViT-L/14, as the real decoders do, each in its own folder and layout.
    unclip = PDSPipeline.from_pretrained(
        **save_checkpoint_like(tmp_path / "unclip", "stable-diffusion-2-1-unclip-small")
    )
    flux = PDSPipeline.from_pretrained(**save_checkpoint_like(tmp_path / "flux", "flux-ip-adapter"))
    assert (unclip.config.decoder, flux.config.decoder) == ("unclip", "flux_ip_adapter")
    unclip(dataset, budget=2, cache_dir=tmp_path / "cache", **STEPS)
    calls, hooks = count_clip_calls(flux)
    try:
        flux(dataset, budget=2, cache_dir=tmp_path / "cache", **STEPS)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == []  # the embeddings came from the cache the unclip run wrote


def test_an_unknown_pipeline_class_is_refused_with_the_known_ones(tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    with pytest.raises(ValueError, match="is a WanPipeline checkpoint, which no hf-pds decoder reads"):
        PDSPipeline.from_pretrained(folder)


# 3. Kandinsky 2.2 and IP-Adapter, on checkpoint-shaped fixtures.

FAMILIES = {  # README block of the "Decoders" section, fixture name, output folder
    "kandinsky": (2, "kandinsky-2-2", "flickr30k-kandinsky-500"),
    "ip_adapter": (3, "sd15-ip-adapter", "flickr30k-ip-adapter-500"),
    "ip_adapter_xl": (4, "sdxl-ip-adapter", "flickr30k-ip-adapter-xl-500"),
    "flux_ip_adapter": (5, "flux-ip-adapter", "flickr30k-flux-500"),
}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """Every family's fixture, written into one folder, and a Hub cache that holds them under their real ids."""
    from hf_pds.testing import DECODER_REPOS, save_checkpoint_like

    root = tmp_path_factory.mktemp("families")
    loads = {decoder: save_checkpoint_like(root, name) for decoder, (_, name, _) in FAMILIES.items()}
    repos = {
        hub_id: root / hub_id.split("/")[1]
        for _, name, _ in FAMILIES.values()
        for hub_id in DECODER_REPOS[name].values()
    }
    return loads, hub_cache(tmp_path_factory.mktemp("families-hub"), repos)


@pytest.mark.parametrize("decoder", list(FAMILIES))
def test_the_readme_example_of_each_decoder_runs_as_written(families, decoder, tmp_path):
    index, _, output = FAMILIES[decoder]
    _, cache = families
    code = readme_block("Decoders", index=index)
    half = "dtype=torch.bfloat16" if decoder == "flux_ip_adapter" else "dtype=torch.float16"
    for old, new in {
        '.to("cuda")': '.to("cpu")',
        half: "dtype=torch.float32",
        '"my-org/flickr30k"': repr(str(source_folder(tmp_path))),
        "budget=500": "budget=2, num_inference_steps=2, output_size=40",
    }.items():
        assert old in code, f"the README no longer says {old!r}"
        code = code.replace(old, new)
    code += (
        f"\nreloaded = load_dataset({output!r}, split='train')"
        "\nprint('RESULT', out.settings['decoder'], out.provenance['embedding_width'], reloaded.num_rows)\n"
    )
    result = run_python(code, tmp_path, cache)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))
    width = {"kandinsky": "1280", "ip_adapter": "1024", "ip_adapter_xl": "1280", "flux_ip_adapter": "768"}[decoder]
    assert line.split()[1:] == [decoder, width, "2"]
    card = (tmp_path / output / "README.md").read_text()
    assert f"| `decoder` | `{decoder}` |" in card


@pytest.mark.parametrize("decoder", list(FAMILIES))
def test_each_decoder_resumes_after_a_crash_and_keeps_the_best_of_n(families, decoder, tmp_path, monkeypatch):
    loads, _ = families
    pipe = PDSPipeline.from_pretrained(**loads[decoder])
    assert pipe.config.decoder == decoder
    source = mixed_dataset(6)
    arguments = {"budget": 2, "candidates": 2, "num_inference_steps": 2, "output_size": 40}
    whole = pipe(source, output_dir=tmp_path / "whole", **arguments)
    crash_encoding_after(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="went down"):
        pipe(source, output_dir=tmp_path / "resumed", **arguments)
    monkeypatch.undo()
    assert len(list((tmp_path / ".resumed.pds-run" / "images").glob("*.png"))) == 2
    pipe(source, output_dir=tmp_path / "resumed", **arguments)
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(tmp_path / "whole")
    # Best of two: the kept image is the candidate of higher fidelity; candidate 0 alone is the one-image run.
    single = pipe(source, **{**arguments, "candidates": 1})
    assert np.all(np.asarray(whole.dataset["fidelity"]) >= np.asarray(single.dataset["fidelity"]))
