import numpy as np
import PIL.Image

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
