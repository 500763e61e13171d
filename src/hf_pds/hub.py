"""Files that hf-pds writes, and the Hub: atomic writes, output folders it may replace, Hub-layout dataset
folders (Parquet shards, ``configs``, ``dataset_info``), pushing one, and loading a source dataset.

Everything hf-pds writes goes through here. A file is written beside its target and renamed into place; a folder
is built in a staging folder beside its target and moved into place when complete, so an interruption never
leaves a half-written output. An output folder carries :data:`OUTPUT_MARK` in its Markdown file: hf-pds replaces
a folder (``overwrite=True``) only when it is empty or carries the mark, and never the current folder, one of its
parents, or a folder the run reads from.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets

# Hidden in rendered Markdown; tells a folder written by hf-pds from any other.
OUTPUT_MARK = "<!-- Written by hf-pds. `overwrite=True` (CLI: --overwrite) may replace this folder. -->"
# Inside a staging folder while it is being written: who writes it, so that leftovers of a dead run are cleaned.
_STAGING_OWNER = ".hf-pds-staging.json"
DEFAULT_MAX_SHARD_BYTES = 500 * 2**20


def hf_pds_version() -> str:
    """The installed version of hf-pds (from its package metadata, whose one source is pyproject.toml)."""
    from importlib import metadata

    try:
        return metadata.version("hf-pds")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it: readers see the old file or the new one."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def is_hf_pds_output(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` was written by hf-pds: one of its top-level Markdown files carries :data:`OUTPUT_MARK`."""
    for card in Path(folder).glob("*.md"):
        try:
            if OUTPUT_MARK in card.read_text(encoding="utf-8", errors="replace"):
                return True
        except OSError:
            continue
    return False


def with_output_mark(markdown: str) -> str:
    """``markdown`` ending with :data:`OUTPUT_MARK` (once)."""
    return markdown if OUTPUT_MARK in markdown else markdown.rstrip("\n") + "\n\n" + OUTPUT_MARK + "\n"


def check_output_folder(
    folder: str | os.PathLike, overwrite: bool, protected: Iterable[str | os.PathLike | None] = ()
) -> Path:
    """The absolute path of an output folder that may be written; raises before anything is written otherwise.

    Raises:
        FileExistsError: ``folder`` exists and ``overwrite`` is False; or it is not a folder; or it holds files
            that hf-pds did not write; or it is the current folder, one of its parents, the home folder, or a
            folder in ``protected`` (what the run reads) or one of their parents.
    """
    folder = Path(folder).expanduser().resolve()
    if not folder.exists() and not folder.is_symlink():
        return folder
    if not overwrite:
        raise FileExistsError(f"{folder} already exists; pass overwrite=True to replace it.")
    if not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder: hf-pds will not replace it.")
    guarded = [Path.cwd(), Path.home(), *(Path(path) for path in protected if path is not None)]
    for path in guarded:
        path = path.expanduser().resolve()
        if folder == path or folder in path.parents:
            raise FileExistsError(
                f"{folder} is {'' if folder == path else 'a parent of '}{path}, which this run uses or runs in: "
                "hf-pds will not replace it. Choose another output folder."
            )
    if any(folder.iterdir()) and not is_hf_pds_output(folder):
        raise FileExistsError(
            f"{folder} holds files that hf-pds did not write: hf-pds replaces only empty folders and its own "
            "outputs. Choose another output folder, or move the files away."
        )
    return folder


def _owner_alive(owner: dict) -> bool:
    """Whether the process that wrote a staging folder may still be running (unknown hosts count as alive)."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


def _new_staging(target: Path, suffix: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent))
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "target": str(target)}
    (folder / _STAGING_OWNER).write_text(json.dumps(owner), encoding="utf-8")
    return folder


def clean_leftovers(target: Path) -> list[Path]:
    """Remove the staging folders (``.NAME.*.partial``, ``.NAME.*.old``) that an interrupted write into ``target``
    left beside it, when the process that wrote them is gone. Returns what was removed."""
    removed = []
    for pattern in (f".{target.name}.*.partial", f".{target.name}.*.old"):
        for leftover in target.parent.glob(pattern):
            try:
                owner = json.loads((leftover / _STAGING_OWNER).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # not hf-pds's, or not readable: leave it alone
            if owner.get("target") == str(target) and not _owner_alive(owner):
                shutil.rmtree(leftover, ignore_errors=True)
                removed.append(leftover)
    return removed


@contextmanager
def staged_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; when the block ends without error, it replaces ``target``.

    Check ``target`` with :func:`check_output_folder` first: this replaces whatever is there. On error the
    staging folder is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    staging = _new_staging(target, ".partial")
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output should not be
    try:
        yield staging
        (staging / _STAGING_OWNER).unlink()
        if target.exists() or target.is_symlink():
            retired = _new_staging(target, ".old")
            target.rename(retired / target.name)
            staging.rename(target)
            shutil.rmtree(retired)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def size_category(n_rows: int) -> str:
    """The Hub's ``size_categories`` bucket of ``n_rows``."""
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n_rows < bound:
            return label
    return "1M<n<10M"


def hub_configs(splits: Sequence[str]) -> list[dict]:
    """The card YAML ``configs`` entry that points ``load_dataset`` at the Parquet shards of each split."""
    return [
        {
            "config_name": "default",
            "data_files": [{"split": split, "path": f"data/{split}-*.parquet"} for split in splits],
        }
    ]


def _estimated_bytes(dataset: datasets.Dataset) -> int:
    """Arrow size plus the size of image files that the Parquet shards will embed."""
    import datasets

    total = dataset.data.nbytes
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            cells = dataset.select_columns([name]).cast_column(name, datasets.Image(decode=False))[name]
            total += sum(os.path.getsize(cell["path"]) for cell in cells if cell and not cell["bytes"] and cell["path"])
    return total


def write_parquet_shards(
    dataset: datasets.Dataset, data_dir: Path, split: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> list[Path]:
    """Write ``dataset`` as ``data_dir/{split}-0000i-of-0000n.parquet`` shards of at most about
    ``max_shard_bytes``, with image files embedded as bytes (as ``push_to_hub`` does)."""
    from datasets.table import embed_table_storage

    n_shards = max(1, -(-_estimated_bytes(dataset) // max_shard_bytes))
    n_shards = min(n_shards, max(1, len(dataset)))
    paths = []
    for index in range(n_shards):
        shard = dataset.shard(n_shards, index, contiguous=True).with_format("arrow")
        shard = shard.map(embed_table_storage, batched=True, batch_size=1000, keep_in_memory=True)
        path = data_dir / f"{split}-{index:05d}-of-{n_shards:05d}.parquet"
        shard.to_parquet(path)
        paths.append(path)
    return paths


def with_dataset_info(card: str, splits: Mapping[str, datasets.Dataset], shards: Mapping[str, list[Path]]) -> str:
    """``card`` with the YAML ``dataset_info`` that ``push_to_hub`` writes: features, split sizes, bytes.

    Besides informing the Hub, it makes ``load_dataset(folder)`` notice new contents: for a local folder
    whose card has ``configs``, the datasets cache is keyed by the card's YAML, not by the data files.
    """
    import datasets
    from datasets.info import DatasetInfo, DatasetInfosDict
    from huggingface_hub import DatasetCard

    split_dict = datasets.SplitDict()
    for split, data in splits.items():
        split_dict.add(datasets.SplitInfo(name=split, num_bytes=_estimated_bytes(data), num_examples=len(data)))
    info = DatasetInfo(
        features=next(iter(splits.values())).features,
        splits=split_dict,
        download_size=sum(path.stat().st_size for paths in shards.values() for path in paths),
        dataset_size=sum(split.num_bytes for split in split_dict.values()),
    )
    parsed = DatasetCard(card)
    DatasetInfosDict({"default": info}).to_dataset_card_data(parsed.data)
    return str(parsed)


def write_hub_folder(
    folder: str | os.PathLike,
    splits: Mapping[str, datasets.Dataset],
    card: str,
    extra_files: Mapping[str, bytes] | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    protected: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Write a Hub-layout dataset folder: ``README.md`` (``card``, marked as hf-pds's), ``data/{split}-*.parquet``
    and ``extra_files`` (relative path -> content), which ``datasets.load_dataset(folder)`` loads.

    The folder is built beside its target and moved into place when complete (:func:`staged_folder`), and an
    existing folder is replaced only as :func:`check_output_folder` allows.
    """
    folder = check_output_folder(folder, overwrite, protected)
    with staged_folder(folder) as staging:
        (staging / "data").mkdir()
        shards = {
            split: write_parquet_shards(data, staging / "data", split, max_shard_bytes)
            for split, data in splits.items()
        }
        readme = with_output_mark(with_dataset_info(card, splits, shards))
        (staging / "README.md").write_text(readme, encoding="utf-8")
        for relative_path, content in (extra_files or {}).items():
            target = staging / relative_path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
    return folder


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = True,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
) -> str:
    """Upload a Hub-layout folder to the dataset repo ``repo_id``; returns the commit (or PR) URL.

    The repo is created if needed, private unless ``private=False``. The folder is uploaded as it is, card
    included, so its YAML ``configs`` reach the Hub intact; Parquet shards already in the repo under
    ``data/`` are replaced. Without a token or without a connection this fails before uploading anything.
    The token is never printed, logged or written.

    Raises:
        ValueError: ``folder`` is not a Hub-layout dataset folder.
        PermissionError: no token.
        ConnectionError: offline, or the Hub cannot be reached, refuses the token or fails the upload.
    """
    from huggingface_hub import HfApi, constants, get_token

    folder = Path(folder)
    if not (folder / "README.md").is_file() or not list(folder.glob("data/*.parquet")):
        raise ValueError(f"{folder} is not a Hub-layout dataset folder: it needs README.md and data/*.parquet.")
    if constants.HF_HUB_OFFLINE:
        raise ConnectionError("HF_HUB_OFFLINE is set: unset it to push to the Hub.")
    token = token or get_token()
    if not token:
        raise PermissionError("No Hugging Face token: log in with `hf auth login` or set HF_TOKEN to push.")
    api = HfApi(token=token)
    try:
        user = api.whoami()["name"]
    except Exception as error:
        raise ConnectionError(
            f"The Hub cannot be reached or refused the token ({type(error).__name__}: {error}). Nothing was uploaded."
        ) from error
    try:
        repo = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision and not create_pr:
            api.create_branch(repo.repo_id, branch=revision, repo_type="dataset", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=folder,
            repo_type="dataset",
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or f"Upload PDS distilled dataset ({user}, hf-pds)",
            delete_patterns=["data/*.parquet"],
        )
    except Exception as error:
        raise ConnectionError(f"The Hub refused the push to {repo_id} ({type(error).__name__}: {error}).") from error
    return commit.pr_url if create_pr and commit.pr_url else commit.commit_url


def load_source_dataset(name: str | os.PathLike, split: str, streaming: bool = False):
    """A split of a Hub dataset or of a local folder (Hub layout, data files, or ``save_to_disk``).

    Raises:
        ValueError: the dataset or the split cannot be loaded; the message names both and says why. A
            ``save_to_disk`` folder cannot be streamed.
    """
    import datasets

    path = Path(name)
    saved_to_disk = path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())
    if saved_to_disk and streaming:
        raise ValueError(
            f"{name} is a folder written by save_to_disk, which is read from disk, not streamed: drop streaming=True."
        )
    try:
        if saved_to_disk:
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"{name} has no split {split!r}; its splits are {list(loaded)}.")
                return loaded[split]
            return loaded
        return datasets.load_dataset(str(name), split=split, streaming=streaming)
    except ValueError:
        raise
    except Exception as error:  # datasets raises many types for a missing dataset, folder or split
        raise ValueError(f"cannot load split {split!r} of {name}: {type(error).__name__}: {error}") from error
