import datasets
import numpy as np
import PIL.Image
import pytest

from helpers import crash_encoding_after, folder_bytes
from hf_pds.synthesis import prototype_seed, resize


def test_prototype_seeds_depend_on_run_seed_and_index_only():
    seeds = [prototype_seed(42, index) for index in range(1000)]
    assert len(set(seeds)) == 1000
    assert seeds == [prototype_seed(42, index) for index in range(1000)]
    assert prototype_seed(43, 0) != prototype_seed(42, 0)
    assert all(0 <= seed < 2**63 for seed in seeds)  # a valid torch.Generator seed


def test_resize_is_lanczos_to_a_square():
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8))
    resized = resize(image, 20)
    assert resized.size == (20, 20)
    assert np.array_equal(np.asarray(resized), np.asarray(image.resize((20, 20), PIL.Image.LANCZOS)))
    assert resize(image, None) is image


def pixels(dataset):
    return [np.asarray(image, dtype=int) for image in dataset["image"]]


def test_compile_compiles_the_unets_repeated_blocks_and_keeps_images_deterministic(tmp_path):
    from helpers import FAST, mixed_dataset
    from hf_pds.testing import tiny_pds_pipeline

    pipe, dataset = tiny_pds_pipeline(seed=0), mixed_dataset(8)
    eager = pipe(dataset, budget=3, **FAST)
    compiled = pipe(dataset, budget=3, compile=True, output_dir=tmp_path / "out", **FAST)
    blocks = [module for module in pipe.unet.modules() if type(module).__name__ == "BasicTransformerBlock"]
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)
    again = pipe(dataset, budget=3, compile=True, **FAST)
    for a, b, c in zip(pixels(eager.dataset), pixels(compiled.dataset), pixels(again.dataset), strict=True):
        assert np.abs(a - b).max() <= 2  # compiled kernels round differently
        np.testing.assert_array_equal(b, c)  # but always the same way
    assert (
        compiled.settings["compile"] is True
        and "| `compile` | `True` |" in (tmp_path / "out" / "README.md").read_text()
    )
    back = pipe(dataset, budget=3, **FAST)  # compile=False undoes it
    assert all(block._compiled_call_impl is None for block in blocks)
    for a, b in zip(pixels(eager.dataset), pixels(back.dataset), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_fast_preset_swaps_the_scheduler_and_the_card_records_it(pipe, dataset, tmp_path):
    from helpers import FAST

    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        fast = pipe(dataset, budget=2, scheduler="dpm++", output_size=40, output_dir=tmp_path / "fast")
    finally:
        hook.remove()
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"  # the pipeline's own scheduler is untouched
    assert len(calls) == 2 * 25  # two images, 25 DPM-Solver++ steps each
    settings = fast.settings
    assert (settings["scheduler"], settings["scheduler_preset"], settings["num_inference_steps"]) == (
        "DPMSolverMultistepScheduler",
        "dpm++",
        25,
    )
    card = (tmp_path / "fast" / "README.md").read_text()
    assert "| `scheduler` | `DPMSolverMultistepScheduler` |" in card and "| `num_inference_steps` | `25` |" in card
    paper = pipe(dataset, budget=2, **FAST)
    assert paper.settings["scheduler"] == "PNDMScheduler" and paper.settings["scheduler_preset"] is None
    with pytest.raises(ValueError, match=r"scheduler must be None \(the checkpoint's\) or one of \['dpm\+\+'\]"):
        pipe(dataset, budget=2, scheduler="euler", **FAST)


def decoded(png: bytes) -> np.ndarray:
    import io

    return np.asarray(PIL.Image.open(io.BytesIO(png)))


def test_fidelity_is_the_cosine_of_the_images_clip_embedding_and_its_prototypes(pipe, dataset):
    import torch

    out = pipe(dataset, budget=3, num_inference_steps=2, output_size=None)  # no resize: stored = scored image
    pixels = pipe.feature_extractor(images=list(out.dataset["image"]), return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = pipe.image_encoder(pixels).image_embeds.numpy()

    def cosine(a, b):
        return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    expected_fidelity = cosine(embeds, np.asarray(out.dataset["image_embedding"]))
    expected_alignment = cosine(embeds, np.asarray(out.dataset["text_embedding"]))
    np.testing.assert_allclose(out.dataset["fidelity"], expected_fidelity, atol=1e-5)
    np.testing.assert_allclose(out.dataset["text_alignment"], expected_alignment, atol=1e-5)
    assert not np.allclose(out.dataset["fidelity"], out.dataset["text_alignment"])


def test_one_candidate_gives_the_papers_one_image_per_prototype(pipe):
    """candidates=1 (the default) decodes each prototype once, with the prototype's own seed, as before."""
    import torch

    from hf_pds.synthesis import encode_png, resize, synthesize

    rng = np.random.default_rng(3)
    embeds = rng.normal(size=(3, 32)).astype(np.float32)
    prompts = ["a dog", "a cat", "a bird"]
    seeds = [prototype_seed(7, index) for index in range(3)]
    made = synthesize(pipe.make_decoder(num_inference_steps=2), embeds, prompts, seeds, output_size=40)
    for index in range(3):
        direct = (
            pipe.make_decoder()
            .pipeline(
                prompt=[prompts[index]],
                negative_prompt=["text, watermark"],
                image_embeds=torch.as_tensor(embeds[index : index + 1]),
                num_inference_steps=2,
                guidance_scale=5.0,
                noise_level=10,
                generator=[torch.Generator("cpu").manual_seed(seeds[index])],
            )
            .images[0]
        )
        assert made[index, 0].png == encode_png(resize(direct, 40))


def test_best_of_three_keeps_the_candidate_of_highest_fidelity(pipe, dataset, tmp_path, monkeypatch):
    from hf_pds.synthesis import candidate_seed, synthesize

    out = pipe(dataset, budget=3, candidates=3, output_dir=tmp_path / "whole", num_inference_steps=2, output_size=40)
    assert (
        out.settings["candidates"] == 3 and "| `candidates` | `3` |" in (tmp_path / "whole" / "README.md").read_text()
    )
    prototypes = out.prototypes
    for row in range(3):
        seed = prototype_seed(out.settings["seed"], row)
        made = [
            synthesize(
                pipe.make_decoder(num_inference_steps=2),
                prototypes.image_prototypes[row : row + 1],
                [out.dataset[row]["caption"]],
                [candidate_seed(seed, candidate)],
                text_embeds=prototypes.text_prototypes[row : row + 1],
                output_size=40,
            )[0, 0]
            for candidate in range(3)
        ]
        assert len({image.png for image in made}) == 3  # three different images
        best = max(range(3), key=lambda candidate: (made[candidate].fidelity, -candidate))
        assert out.dataset[row]["fidelity"] == np.float32(made[best].fidelity)
        stored = out.dataset.cast_column("image", datasets.Image(decode=False))[row]["image"]["bytes"]
        assert stored == made[best].png

    # The same bytes on a rerun, and after a crash and a resume.
    again = pipe(dataset, budget=3, candidates=3, output_dir=tmp_path / "again", num_inference_steps=2, output_size=40)
    assert list(again.dataset["fidelity"]) == list(out.dataset["fidelity"])
    crash_encoding_after(monkeypatch, 4)
    with pytest.raises(RuntimeError, match="went down"):
        pipe(dataset, budget=3, candidates=3, output_dir=tmp_path / "resumed", num_inference_steps=2, output_size=40)
    monkeypatch.undo()
    assert len(list((tmp_path / ".resumed.pds-run" / "images").glob("*.png"))) == 4
    pipe(dataset, budget=3, candidates=3, output_dir=tmp_path / "resumed", num_inference_steps=2, output_size=40)
    for name in ("again", "resumed"):
        assert folder_bytes(tmp_path / name) == folder_bytes(tmp_path / "whole"), name


def test_candidates_must_be_a_positive_integer(pipe, dataset):
    with pytest.raises(ValueError, match="candidates must be a positive integer, got 0"):
        pipe(dataset, budget=2, candidates=0, num_inference_steps=2)
