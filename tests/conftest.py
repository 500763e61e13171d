import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Before any Hugging Face import: a stray download must fail at once, and caches stay out of $HOME, in a folder of
# this session that pytest_sessionfinish removes (pytest's tmp_path_factory exists only once the session starts,
# after the libraries have read these variables).
SESSION_CACHES = Path(tempfile.mkdtemp(prefix="hf-pds-test-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", str(SESSION_CACHES / "datasets"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_PDS_CACHE"] = str(SESSION_CACHES / "hf_pds")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_CACHES, ignore_errors=True)


@pytest.fixture(scope="module")
def pipe():
    """A tiny PDSPipeline with random weights (seed 0)."""
    from hf_pds.testing import tiny_pds_pipeline

    return tiny_pds_pipeline(seed=0)


@pytest.fixture(scope="module")
def dataset():
    """Ten images of mixed modes and sizes with 2-3 captions each (25 pairs)."""
    from helpers import mixed_dataset

    return mixed_dataset(10)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Both public stable unCLIP checkpoints and their CLIP models, laid out as the real ones with tiny weights:
    ``{name: SimpleNamespace(unclip, clip, hub_id, clip_id, revision)}``, and ``cache``, a Hub cache that holds
    them under their real ids (the ``sd2-community/`` mirrors, where they live since Stability AI withdrew its own),
    so that ``from_pretrained("sd2-community/...")`` resolves offline."""
    import hashlib
    from types import SimpleNamespace

    from helpers import hub_cache
    from hf_pds.testing import CHECKPOINT_LAYOUTS, save_checkpoint_like

    root = tmp_path_factory.mktemp("checkpoints")
    found, repos = {}, {}
    for name, layout in CHECKPOINT_LAYOUTS.items():
        loads = save_checkpoint_like(root / name, name)
        unclip, clip = Path(loads["pretrained_model_name_or_path"]), Path(loads["clip_model_name_or_path"])
        hub_id = f"sd2-community/{name}"
        repos.update({hub_id: unclip, layout["clip_model"]: clip})
        found[name] = SimpleNamespace(
            unclip=unclip,
            clip=clip,
            hub_id=hub_id,
            clip_id=layout["clip_model"],
            revision=hashlib.sha1(hub_id.encode()).hexdigest(),
        )
    return SimpleNamespace(
        cache=hub_cache(root / "hub", repos),
        **{name.replace("-", "_"): entry for name, entry in found.items()},
        by_name=found,
    )


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A distilled set of 5 pairs, made by the tiny pipeline from a Parquet file of 12 images."""
    import datasets

    from helpers import mixed_dataset
    from hf_pds.testing import tiny_pds_pipeline

    path = tmp_path_factory.mktemp("source") / "source.parquet"
    mixed_dataset(12).to_parquet(path)
    source = datasets.load_dataset("parquet", data_files={"train": str(path)}, split="train")
    return tiny_pds_pipeline()(source, budget=5, num_inference_steps=2, output_size=48)


@pytest.fixture(scope="module")
def saved(distilled, tmp_path_factory):
    return distilled.save(tmp_path_factory.mktemp("saved") / "pds-5")


@pytest.fixture(scope="module")
def saved_inputs(tmp_path_factory):
    """A saved tiny pipeline and a Parquet dataset folder of 12 images, as the command line reads them."""
    from helpers import mixed_dataset
    from hf_pds.testing import tiny_pds_pipeline

    folder = tmp_path_factory.mktemp("inputs")
    tiny_pds_pipeline().save_pretrained(folder / "pipe")
    (folder / "source").mkdir()
    mixed_dataset(12).to_parquet(folder / "source" / "train.parquet")
    return folder
