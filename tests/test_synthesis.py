import numpy as np
import PIL.Image
import pytest

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
