"""Files that hf-pds writes, and the Hub: atomic writes, output folders it may replace, Hub-layout dataset
folders (Parquet shards, ``configs``, ``dataset_info``), pushing one, and loading a source dataset.

Everything hf-pds writes goes through here. A file is written beside its target and renamed into place; a folder
is built in a staging folder beside its target and moved into place when complete, so an interruption never
leaves a half-written output. An output folder carries :data:`OUTPUT_MARK` in its Markdown file: hf-pds replaces
a folder (``overwrite=True``) only when it is empty, or carries the mark and holds nothing but files hf-pds writes
(:data:`OUTPUT_FILES`, Parquet shards in ``data/``); never the current folder, one of its parents, or a folder the
run reads from. A disk that fills up is reported as :class:`~hf_pds.errors.NoSpaceError`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import NoSpaceError

if TYPE_CHECKING:
    import datasets

# Hidden in rendered Markdown; tells a folder written by hf-pds from any other.
OUTPUT_MARK = "<!-- Written by hf-pds. `overwrite=True` (CLI: --overwrite) may replace this folder. -->"
# Inside a staging folder while it is being written: who writes it, so that leftovers of a dead run are cleaned.
_STAGING_OWNER = ".hf-pds-staging.json"
DEFAULT_MAX_SHARD_BYTES = 500 * 2**20
# Every file hf-pds writes at the top of an output folder: a distilled set's card and figures (card.py) and an
# evaluation's report (evaluation/report.py). With Parquet shards in data/, that is all that ``overwrite=True``
# replaces: a folder that holds anything else is refused, so that no file of the user's is ever deleted.
OUTPUT_FILES = frozenset(
    {"README.md", "preview.png", "stats.png", "fidelity.png", "results.md", "results.json", "recall_vs_budget.png"}
)
DATA_FOLDER = "data"
_SHARD = re.compile(r"[\w.-]+-\d{5}-of-\d{5}\.parquet")  # as write_parquet_shards names them
# How many entries of the user's a refusal names.
_SHOWN_ENTRIES = 5
# errno values of a full disk (EDQUOT: a quota that is used up).
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


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
    except OSError as error:
        if error.errno in _NO_SPACE and not isinstance(error, NoSpaceError):
            raise no_space_error(path, len(data)) from error
        raise
    finally:
        partial.unlink(missing_ok=True)


def _disk(path: Path) -> Path:
    """The mount point of the file system that holds ``path`` (or would hold it: its nearest existing parent)."""
    path = _existing_parent(path.resolve())
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def no_space_error(path: str | os.PathLike, needed: int | None = None) -> NoSpaceError:
    """The one-line error of a disk too full to write ``path``: which disk, how much is needed (``needed`` bytes)
    and how much is free."""
    path = Path(path)
    disk = _disk(path)
    free = f"{shutil.disk_usage(disk).free / 1e6:.0f} MB free"
    amounts = f"about {max(1, round(needed / 1e6))} MB needed, {free}" if needed is not None else free
    return NoSpaceError(f"No space left on {disk} to write {path} ({amounts}).")


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


def foreign_entries(folder: str | os.PathLike) -> list[str]:
    """The entries of an existing folder that hf-pds did not write, sorted (a folder's name ends with ``/``): all of
    them in a folder without :data:`OUTPUT_MARK`, else any but :data:`OUTPUT_FILES` and the shards in ``data/``."""
    folder = Path(folder)
    entries = sorted(folder.iterdir())
    if not is_hf_pds_output(folder):
        return [_entry_name(entry, folder) for entry in entries]
    foreign = []
    for entry in entries:
        if entry.name == DATA_FOLDER and entry.is_dir() and not entry.is_symlink():
            foreign += [
                _entry_name(shard, folder)
                for shard in sorted(entry.iterdir())
                if not (_SHARD.fullmatch(shard.name) and shard.is_file() and not shard.is_symlink())
            ]
        elif entry.name not in OUTPUT_FILES or not entry.is_file() or entry.is_symlink():
            foreign.append(_entry_name(entry, folder))
    return foreign


def _entry_name(path: Path, folder: Path) -> str:
    name = path.relative_to(folder).as_posix()
    return f"{name}/" if path.is_dir() and not path.is_symlink() else name


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(folder: Path) -> None:
    """Raise unless a file can be made where ``folder`` goes: a probe file is created in its nearest existing parent
    and removed, so that a read-only or full disk is told before any work, not after it."""
    parent = _existing_parent(folder.parent)
    if not parent.is_dir():
        raise ValueError(f"{parent} is a file, so the output folder {folder} cannot be made. Choose another one.")
    try:
        handle, probe = tempfile.mkstemp(prefix=".hf-pds-probe-", dir=parent)
        try:
            os.write(handle, b"\0")  # a full disk makes the empty file but refuses its first byte
        finally:
            os.close(handle)
            os.unlink(probe)
    except OSError as error:
        if error.errno in _NO_SPACE:
            raise no_space_error(folder) from error
        raise PermissionError(
            f"{parent} cannot be written ({error.strerror or error}), so the output folder {folder} cannot be made "
            "there. Choose another output folder."
        ) from error


def check_output_folder(
    folder: str | os.PathLike, overwrite: bool, protected: Iterable[str | os.PathLike | None] = ()
) -> Path:
    """The absolute path of an output folder that may be written; raises before anything is written otherwise.

    ``overwrite=True`` replaces an empty folder, or an hf-pds output that holds nothing else (see
    :func:`foreign_entries`). A git clone of a published set is refused like any folder with other files: the way
    to update the set is to push a new folder.

    Raises:
        ValueError: ``folder`` is empty (``''``), or inside a folder in ``protected`` (what the run reads: an output
            there would change it), or its parent is a file.
        FileExistsError: ``folder`` exists and ``overwrite`` is False; or it is not a folder; or it holds files
            that hf-pds did not write; or it is the current folder, one of its parents, the home folder, or a
            folder in ``protected`` or one of their parents.
        PermissionError: nothing can be written where ``folder`` goes (a read-only folder or file system).
        NoSpaceError: the disk where ``folder`` goes is full.
    """
    if not os.fspath(folder).strip():  # Path("") is the current folder
        raise ValueError("The output folder is '' (empty): name the folder to write.")
    folder = Path(folder).expanduser().resolve()
    read = [Path(path).expanduser().resolve() for path in protected if path is not None]
    for path in (Path.cwd(), Path.home(), *read):
        if folder == path or folder in path.parents:
            raise FileExistsError(
                f"{folder} is {'' if folder == path else 'a parent of '}{path}, which this run uses or runs in: "
                "hf-pds will not replace it. Choose another output folder."
            )
    for path in read:
        if path in folder.parents:
            raise ValueError(
                f"The output folder {folder} is inside {path}, which this run reads: writing there would change "
                "what it reads (a dataset folder would load the distilled shards as its own). Choose an output "
                "folder outside it."
            )
    if folder.exists() or folder.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{folder} already exists; pass overwrite=True to replace it.")
        if not folder.is_dir():
            raise FileExistsError(f"{folder} exists and is not a folder: hf-pds will not replace it.")
        foreign = foreign_entries(folder)
        if foreign:
            raise FileExistsError(_foreign_message(folder, foreign))
    _check_writable(folder)
    return folder


def _foreign_message(folder: Path, foreign: list[str]) -> str:
    shown = ", ".join(foreign[:_SHOWN_ENTRIES])
    if len(foreign) > _SHOWN_ENTRIES:
        shown += f" and {len(foreign) - _SHOWN_ENTRIES} more"
    message = (
        f"{folder} holds files that hf-pds did not write ({shown}): overwrite replaces only an empty folder or one "
        "that holds nothing but hf-pds's own output, and never deletes another file. Choose another output folder, "
        "or move those away."
    )
    if ".git/" in foreign or ".git" in foreign:
        message += (
            " It is a git clone: to update the set it holds, save into a new folder, upload that with "
            "`hf-pds push NEW_FOLDER REPO_ID` (in Python: push_to_hub), which replaces the data shards in the repo, "
            "then `git pull` in the clone."
        )
    return message


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
    try:
        (folder / _STAGING_OWNER).write_text(json.dumps(owner), encoding="utf-8")
    except BaseException:
        # Without its owner file no later save would know the folder as hf-pds's: remove it now (a full disk).
        shutil.rmtree(folder, ignore_errors=True)
        raise
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
    try:
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output should not be
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

    Raises:
        NoSpaceError: the disk filled up; nothing was written, and the message says how much is needed.
    """
    folder = check_output_folder(folder, overwrite, protected)
    try:
        with staged_folder(folder) as staging:
            (staging / DATA_FOLDER).mkdir()
            shards = {
                split: write_parquet_shards(data, staging / DATA_FOLDER, split, max_shard_bytes)
                for split, data in splits.items()
            }
            readme = with_output_mark(with_dataset_info(card, splits, shards))
            (staging / "README.md").write_text(readme, encoding="utf-8")
            for relative_path, content in (extra_files or {}).items():
                target = staging / relative_path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
    except OSError as error:
        if error.errno not in _NO_SPACE or isinstance(error, NoSpaceError):
            raise
        needed = sum(map(_estimated_bytes, splits.values())) + sum(map(len, (extra_files or {}).values()))
        raise no_space_error(folder, needed) from error
    return folder


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` when it is a valid Hub repo id (``name`` or ``namespace/name``); checked here, before any network
    call, so that a typo never reaches the Hub.

    Raises:
        ValueError: it is not; the message names it and what a repo id looks like.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if not isinstance(repo_id, str):
            raise HFValidationError(f"got a {type(repo_id).__name__}")
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"{repo_id!r} is not a Hub repo id: expected 'name' or 'namespace/name', each made of letters, digits, "
            f"'-', '_' and '.' (huggingface_hub says: {error})"
        ) from None
    return repo_id


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
        ValueError: ``repo_id`` is not a Hub repo id, or ``folder`` is not a Hub-layout dataset folder.
        PermissionError: no token.
        ConnectionError: offline, or the Hub cannot be reached, refuses the token or fails the upload.
    """
    from huggingface_hub import HfApi, constants, get_token

    check_repo_id(repo_id)
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
