import os
import tempfile

# Before any Hugging Face import: a stray download must fail at once, and caches stay out of $HOME.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="hf-pds-test-datasets-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_PDS_CACHE"] = tempfile.mkdtemp(prefix="hf-pds-test-embeddings-")
