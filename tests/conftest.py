import os
import tempfile

# Before any Hugging Face import: a stray download must fail at once, and caches stay out of $HOME.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="hf-pds-test-datasets-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_PDS_CACHE"] = tempfile.mkdtemp(prefix="hf-pds-test-embeddings-")


import pytest


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
