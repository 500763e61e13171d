import numpy as np
import PIL.Image
import pytest

from hf_pds.pipeline_pds import check_generation_settings
from hf_pds.synthesis import prototype_seed, resize


def test_prototype_seeds_depend_on_run_seed_and_index_only():
    seeds = [prototype_seed(42, index) for index in range(1000)]
    assert len(set(seeds)) == 1000
    assert seeds == [prototype_seed(42, index) for index in range(1000)]
    assert prototype_seed(43, 0) != prototype_seed(42, 0)
    assert all(0 <= seed < 2**63 for seed in seeds)  # a valid torch.Generator seed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_inference_steps": 0}, "num_inference_steps must be a positive integer"),
        ({"guidance_scale": -1.0}, "guidance_scale must be >= 0"),
        ({"noise_level": 1000}, r"noise_level must be an integer in \[0, 1000\)"),
        ({"noise_level": -1}, "noise_level must be an integer"),
        ({"output_size": 0}, "output_size must be a positive integer or None"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
    ],
)
def test_bad_generation_settings_are_named(kwargs, message):
    settings = {
        "num_inference_steps": 100,
        "guidance_scale": 5.0,
        "noise_level": 10,
        "max_noise_level": 1000,
        "output_size": 224,
        "batch_size": 8,
    }
    settings.update(kwargs)
    with pytest.raises(ValueError, match=message):
        check_generation_settings(**settings)


def test_resize_is_lanczos_to_a_square():
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8))
    resized = resize(image, 20)
    assert resized.size == (20, 20)
    assert np.array_equal(np.asarray(resized), np.asarray(image.resize((20, 20), PIL.Image.LANCZOS)))
    assert resize(image, None) is image
