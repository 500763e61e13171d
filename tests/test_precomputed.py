"""Precomputed embeddings: clip-retrieval's folders and a dataset's embedding columns, read as shards."""

import logging
import os
import re
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import REPO
from hf_pds import precomputed
from hf_pds.precomputed import check_precomputed, embeddings_of_dataset, open_clip_retrieval
from hf_pds.shards import PairShard
from hf_pds.testing import write_clip_retrieval

DIM, TEXT_DIM, N = 8, 6, 30


def planted(n=N, seed=0, scale=5.0):
    rng = np.random.default_rng(seed)
    images = rng.normal(scale=scale, size=(n, DIM)).astype(np.float32)
    texts = rng.normal(scale=scale, size=(n, TEXT_DIM)).astype(np.float32)
    return images, texts, [f"caption of pair {row}" for row in range(n)]


def unit(rows):
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture
def folder(tmp_path):
    """30 pairs in shards of 7 (the last one of 2), float16."""
    return write_clip_retrieval(tmp_path / "laion-part", *planted(), shard_size=7)


def concatenated(source):
    shards = [shard.load() for shard in source.shards]
    return np.concatenate([s.image_embeds for s in shards]), np.concatenate([s.text_embeds for s in shards])


def test_a_clip_retrieval_folder_opens_as_memory_mapped_shards(folder):
    images, texts, captions = planted()
    source = open_clip_retrieval(folder)
    assert (source.n_pairs, source.image_dim, source.text_dim, source.dtype) == (N, DIM, TEXT_DIM, "float16")
    assert [(s.index, s.n_images, s.n_pairs) for s in source.shards] == [(i, n, n) for i, n in enumerate([7] * 4 + [2])]
    shard = source.shards[1].load()
    assert isinstance(shard, PairShard) and shard.caption_image is None
    assert isinstance(shard.image_embeds, np.memmap) and isinstance(shard.text_embeds, np.memmap)
    loaded_images, loaded_texts = concatenated(source)
    np.testing.assert_array_equal(loaded_images, images.astype(np.float16))
    np.testing.assert_array_equal(loaded_texts, texts.astype(np.float16))
    assert source.captions(range(N)) == captions
    assert source.description() == {
        "kind": "clip-retrieval",
        "path": "laion-part",
        "pairs": N,
        "shards": 5,
        "dim": DIM,
        "text_dim": TEXT_DIM,
        "dtype": "float16",
    }


def test_shards_follow_their_number_not_the_name_order(tmp_path):
    images, texts, captions = planted(n=12)
    source = open_clip_retrieval(write_clip_retrieval(tmp_path, images, texts, captions, shard_size=1, dtype="float32"))
    assert [re.search(r"img_emb_(\d+)", shard.name).group(1) for shard in source.shards] == [str(i) for i in range(12)]
    np.testing.assert_array_equal(concatenated(source)[0], images)
    assert source.caption(10) == "caption of pair 10" and source.caption(2) == "caption of pair 2"


def test_captions_are_read_by_global_pair_up_to_the_last_row_asked_for(folder, monkeypatch):
    _, _, captions = planted()
    for shard in range(5):  # several row groups per file, read two rows at a time
        path = folder / "metadata" / f"metadata_{shard}.parquet"
        pq.write_table(pq.read_table(path), path, row_group_size=3)
    monkeypatch.setattr(precomputed, "CAPTION_BATCH", 2)
    source = open_clip_retrieval(folder)
    asked = [29, 0, 15, 15, 8, 20, 13]
    assert source.captions(asked) == [captions[pair] for pair in asked]

    decoded = []
    iter_batches = pq.ParquetFile.iter_batches

    def counting(self, *args, **kwargs):
        for batch in iter_batches(self, *args, **kwargs):
            decoded.append(len(batch))
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    assert source.caption(14) == captions[14]  # shard 2's first row: one batch of its first row group
    assert decoded == [2]
    with pytest.raises(ValueError, match="pair 30 is out of range: there are 30 pairs"):
        source.caption(30)
    with pytest.raises(ValueError, match="pairs must be a sequence of integers"):
        source.captions([1.5])


def test_a_null_caption_is_an_empty_string_with_a_warning(folder, caplog):
    path = folder / "metadata" / "metadata_1.parquet"
    table = pq.read_table(path)
    pq.write_table(table.set_column(1, "caption", pa.array([None, *table["caption"].to_pylist()[1:]])), path)
    with caplog.at_level(logging.WARNING, logger="hf_pds.precomputed"):
        assert open_clip_retrieval(folder).captions([7, 8]) == ["", "caption of pair 8"]
    assert "caption of pair 7 (row 0 of shard 1" in caplog.text


def replace(folder, name, change):
    """Rewrite ``img_emb/<name>`` or ``text_emb/<name>`` as ``change(its array)``."""
    path = folder / ("img_emb" if name.startswith("img") else "text_emb") / name
    np.save(path, change(np.load(path)))


def write_metadata(folder, shard, **columns):
    pq.write_table(pa.table(columns), folder / "metadata" / f"metadata_{shard}.parquet")


BAD_FOLDERS = {
    "no folder": (lambda f: shutil.rmtree(f), "The embeddings folder .*laion-part does not exist"),
    "a file": (
        lambda f: (shutil.rmtree(f), f.write_text("x")),
        "laion-part is a file, expected a folder in clip-retrieval's layout",
    ),
    "no img_emb": (lambda f: shutil.rmtree(f / "img_emb"), r"has no img_emb/ folder: expected clip-retrieval's"),
    "no metadata": (lambda f: shutil.rmtree(f / "metadata"), r"has no metadata/ folder"),
    "empty img_emb": (
        lambda f: [path.unlink() for path in (f / "img_emb").iterdir()],
        r"img_emb holds no img_emb_\{i\}.npy file",
    ),
    "no partner": (
        lambda f: (f / "text_emb" / "text_emb_1.npy").unlink(),
        r"Shard 1 has img_emb/img_emb_1.npy, metadata/metadata_1.parquet but no partner text_emb/text_emb_1.npy",
    ),
    "numbers not aligned": (
        lambda f: (f / "metadata" / "metadata_4.parquet").rename(f / "metadata" / "metadata_5.parquet"),
        r"Shard 4 has img_emb/img_emb_4.npy, text_emb/text_emb_4.npy but no partner metadata/metadata_4.parquet",
    ),
    "one number twice": (
        lambda f: shutil.copy(f / "img_emb" / "img_emb_1.npy", f / "img_emb" / "img_emb_01.npy"),
        r"img_emb/img_emb_01.npy and img_emb/img_emb_1.npy both are shard 1 of img_emb/",
    ),
    "text rows differ": (
        lambda f: replace(f, "text_emb_2.npy", lambda a: a[:-1]),
        r"Shard 2: img_emb/img_emb_2.npy has 7 rows, text_emb/text_emb_2.npy 6, metadata/metadata_2.parquet 7: "
        r"the rows must align",
    ),
    "metadata rows differ": (
        lambda f: write_metadata(f, 3, caption=["a", "b"]),
        r"Shard 3: img_emb/img_emb_3.npy has 7 rows, text_emb/text_emb_3.npy 7, metadata/metadata_3.parquet 2",
    ),
    "widths differ": (
        lambda f: replace(f, "img_emb_2.npy", lambda a: np.concatenate([a, a], axis=1)),
        r"img_emb/img_emb_2.npy is 16-d, img_emb/img_emb_0.npy 8-d: every shard must have one width",
    ),
    "text widths differ": (
        lambda f: replace(f, "text_emb_4.npy", lambda a: a[:, :5]),
        r"text_emb/text_emb_4.npy is 5-d, text_emb/text_emb_0.npy 6-d",
    ),
    "float64": (
        lambda f: replace(f, "img_emb_1.npy", lambda a: a.astype(np.float64)),
        r"img_emb/img_emb_1.npy holds float64, expected float16 or float32",
    ),
    "integers": (
        lambda f: replace(f, "text_emb_0.npy", lambda a: a.astype(np.int32)),
        r"text_emb/text_emb_0.npy holds int32, expected float16 or float32",
    ),
    "two dtypes": (
        lambda f: replace(f, "text_emb_1.npy", lambda a: a.astype(np.float32)),
        r"text_emb/text_emb_1.npy holds float32, img_emb/img_emb_0.npy float16: every file must hold one dtype",
    ),
    "1-d": (
        lambda f: replace(f, "img_emb_3.npy", lambda a: a[:, 0]),
        r"img_emb/img_emb_3.npy holds an array of shape \(7,\), expected a 2-d array \[rows, dim\]",
    ),
    "empty": (
        lambda f: replace(f, "img_emb_3.npy", lambda a: a[:0]),
        r"img_emb/img_emb_3.npy is empty \(shape \(0, 8\)\)",
    ),
    "truncated": (
        lambda f: os.truncate(
            f / "text_emb" / "text_emb_2.npy", os.path.getsize(f / "text_emb" / "text_emb_2.npy") - 1
        ),
        r"text_emb/text_emb_2.npy is truncated: its header says \(7, 6\) float16, \d+ bytes, the file has \d+",
    ),
    "not npy": (
        lambda f: (f / "img_emb" / "img_emb_2.npy").write_bytes(b"not an array"),
        r"img_emb/img_emb_2.npy is not a .npy array file hf-pds reads",
    ),
    "fortran order": (
        lambda f: replace(f, "img_emb_2.npy", np.asfortranarray),
        r"img_emb/img_emb_2.npy is in Fortran \(column\) order",
    ),
    "no caption column": (
        lambda f: write_metadata(f, 1, url=["u"] * 7, text=["t"] * 7),
        r"metadata/metadata_1.parquet has no column 'caption' \(its columns: url, text\): pass the one",
    ),
    "numbers as captions": (
        lambda f: write_metadata(f, 1, caption=list(range(7))),
        r"Column 'caption' of metadata/metadata_1.parquet holds int64, expected strings",
    ),
    "not parquet": (
        lambda f: (f / "metadata" / "metadata_0.parquet").write_bytes(b"not parquet"),
        r"metadata/metadata_0.parquet is not a parquet file hf-pds reads",
    ),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_a_bad_folder_is_refused_when_it_opens_with_what_is_wrong(folder, case):
    spoil, message = BAD_FOLDERS[case]
    spoil(folder)
    with pytest.raises(ValueError, match=message):
        open_clip_retrieval(folder)


def test_another_caption_column_can_be_named(folder):
    for shard, start in enumerate(range(0, N, 7)):
        write_metadata(folder, shard, text=[f"other {row}" for row in range(start, min(start + 7, N))])
    assert open_clip_retrieval(folder, caption_column="text").caption(9) == "other 9"


def test_check_precomputed_names_the_decoder_width_and_non_finite_rows_of_the_first_shard(folder):
    source = open_clip_retrieval(folder)
    check_precomputed(source, DIM)
    with pytest.raises(ValueError, match=r"are 8-d, the decoder reads 768-d \(its image encoder's projection width\)"):
        check_precomputed(source, 768)
    with pytest.raises(ValueError, match="image_dim must be a positive integer, got 0"):
        check_precomputed(source, 0)
    with pytest.raises(ValueError, match="source must be a PrecomputedEmbeddings"):
        check_precomputed(str(folder), DIM)
    for name, row in (("text_emb_0.npy", 3), ("img_emb_0.npy", 5)):
        replace(folder, name, lambda a, row=row: np.where(np.arange(len(a))[:, None] == row, np.inf, a))
        modality = "Text" if name.startswith("text") else "Image"
        with pytest.raises(ValueError, match=rf"{modality} row {row} of shard 0 \(img_emb/img_emb_0.npy, .*NaN or inf"):
            check_precomputed(open_clip_retrieval(folder), DIM)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_l2_normalised_images_are_detected_and_the_norms_measured(tmp_path, dtype):
    images, texts, captions = planted(n=40)
    raw = open_clip_retrieval(write_clip_retrieval(tmp_path / "raw", images, texts, captions, 6, dtype))
    assert not raw.unit_norm()
    measured = raw.norms()  # 7 shards, all rows sampled
    assert measured["rows"] == 40
    assert measured["image"] == pytest.approx(np.linalg.norm(images, axis=1).mean(), rel=1e-3)
    assert measured["text"] == pytest.approx(np.linalg.norm(texts, axis=1).mean(), rel=1e-3)
    normalised = open_clip_retrieval(write_clip_retrieval(tmp_path / "unit", unit(images), texts, captions, 6, dtype))
    assert normalised.unit_norm() and normalised.norms()["image"] == pytest.approx(1, abs=1e-3)
    almost = unit(images)
    almost[37] *= 1.05  # one row off in the last shard
    assert not open_clip_retrieval(write_clip_retrieval(tmp_path / "one-off", almost, texts, captions, 6)).unit_norm()


def test_the_identity_tells_changed_files_and_not_a_moved_folder(folder, tmp_path):
    identity = open_clip_retrieval(folder).identity()
    assert identity["kind"] == "clip-retrieval" and identity["caption_column"] == "caption"
    assert open_clip_retrieval(shutil.copytree(folder, tmp_path / "moved")).identity() == identity
    path = folder / "text_emb" / "text_emb_3.npy"
    stat = path.stat()
    replace(folder, "text_emb_3.npy", lambda a: a[::-1])  # same size, new content
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert open_clip_retrieval(folder).identity() != identity


# --- a dataset's embedding columns ---


def columns_dataset(n=N, spoil=None):
    """``n`` planted pairs in embedding columns of Python floats (``spoil``: row and cell put in place of an image
    embedding)."""
    images, texts, captions = planted(n)
    cells = images.tolist()
    if spoil is not None:
        cells[spoil[0]] = spoil[1]
    data = {"image_embedding": cells, "text_embedding": texts.tolist(), "caption": captions, "id": list(range(n))}
    return datasets.Dataset.from_dict(data)


def of_dataset(dataset, **kwargs):
    return embeddings_of_dataset(dataset, "image_embedding", "text_embedding", **kwargs)


def test_a_dataset_with_embedding_columns_gives_shards_of_rows():
    images, texts, captions = planted()
    source = of_dataset(columns_dataset(), shard_size=8)  # Python floats: float64 cells, read as float32
    assert (source.n_pairs, source.image_dim, source.text_dim, source.dtype) == (N, DIM, TEXT_DIM, "float32")
    assert [(s.n_images, s.n_pairs) for s in source.shards] == [(8, 8)] * 3 + [(6, 6)]
    assert source.shards[1].name == "rows 8-15 of the dataset"
    loaded_images, loaded_texts = concatenated(source)
    assert loaded_images.dtype == np.float32
    np.testing.assert_array_equal(loaded_images, images)
    np.testing.assert_array_equal(loaded_texts, texts)
    assert source.captions([29, 3, 8]) == [captions[29], captions[3], captions[8]]
    assert not source.unit_norm() and source.norms()["rows"] == N
    assert source.description()["kind"] == "dataset" and source.description()["shards"] == 4
    assert source.identity() != of_dataset(columns_dataset().select(range(1, N)), shard_size=8).identity()


def test_a_selected_dataset_reads_its_own_rows():
    images, _, captions = planted()
    order = np.random.default_rng(1).permutation(N)[:20]
    source = of_dataset(columns_dataset().select(order), shard_size=6)
    np.testing.assert_array_equal(concatenated(source)[0], images[order])
    assert source.captions([0, 19]) == [captions[order[0]], captions[order[19]]]


def test_a_parquet_file_with_float16_fixed_size_embeddings_loads_without_conversion(tmp_path):
    images, texts, captions = planted()
    table = pa.table(
        {
            "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(images.astype(np.float16).ravel()), DIM),
            "text_embedding": pa.array(list(texts.astype(np.float16)), type=pa.list_(pa.float16())),
            "caption": captions,
        }
    )
    pq.write_table(table, tmp_path / "part.parquet")
    dataset = datasets.load_dataset("parquet", data_files=str(tmp_path / "part.parquet"), split="train")
    source = of_dataset(dataset, shard_size=16)
    assert source.dtype == "float16" and len(source.shards) == 2
    loaded_images, loaded_texts = concatenated(source)
    np.testing.assert_array_equal(loaded_images, images.astype(np.float16))
    np.testing.assert_array_equal(loaded_texts, texts.astype(np.float16))
    assert source.caption(17) == captions[17]


def spoiled(row, cell):
    return columns_dataset(spoil=(row, cell))


BAD_DATASETS = {
    "not a dataset": (
        lambda: columns_dataset().to_dict(),
        {},
        r"dataset must be a datasets.Dataset \(read by row\), got dict",
    ),
    "missing column": (
        lambda: columns_dataset().remove_columns("text_embedding"),
        {},
        r"no column 'text_embedding' \(text_embedding_column\); its columns: image_embedding, caption, id",
    ),
    "missing caption": (
        lambda: columns_dataset(),
        {"caption_column": "text"},
        r"no column 'text' \(caption_column\)",
    ),
    "no rows": (lambda: columns_dataset().select([]), {}, "The dataset has no rows"),
    "shard size": (lambda: columns_dataset(), {"shard_size": 0}, "shard_size must be a positive integer, got 0"),
    "ragged": (
        lambda: spoiled(12, [0.5] * 7),
        {},
        r"Row 12 of column 'image_embedding' has 7 values, row 0 has 8: every embedding must have one width",
    ),
    "ragged in a later shard": (lambda: spoiled(25, [0.5] * 9), {"shard_size": 10}, "Row 25 of column"),
    "null cell": (lambda: spoiled(4, None), {}, r"Row 4 of column 'image_embedding' is null"),
    "null value": (
        lambda: spoiled(21, [0.5] * 7 + [None]),
        {"shard_size": 10},
        r"Row 21 of column 'image_embedding' holds a null value",
    ),
    "empty list": (lambda: spoiled(0, []), {}, r"Row 0 of column 'image_embedding' is an empty list"),
    "strings": (
        lambda: columns_dataset().map(lambda row: {"text_embedding": str(row["text_embedding"])}),
        {},
        r"Column 'text_embedding' holds string, expected lists of floats",
    ),
    "integers": (
        lambda: datasets.Dataset.from_dict(
            {"image_embedding": [[1] * DIM] * 3, "text_embedding": [[0.5] * TEXT_DIM] * 3, "caption": ["a", "b", "c"]}
        ),
        {},
        r"Column 'image_embedding' holds list<item: int64>, expected lists of floats",
    ),
    "list captions": (
        lambda: columns_dataset().map(lambda row: {"caption": [row["caption"]]}),
        {},
        r"Column 'caption' \(caption_column\) holds list<item: string>, expected one string per row",
    ),
    "two dtypes": (
        lambda: columns_dataset().cast_column("text_embedding", datasets.Sequence(datasets.Value("float16"))),
        {},
        r"Column 'image_embedding' holds float32, column 'text_embedding' float16",
    ),
}


@pytest.mark.parametrize("case", BAD_DATASETS)
def test_a_bad_dataset_is_refused_naming_the_column_and_row(case):
    make, arguments, message = BAD_DATASETS[case]
    with pytest.raises(ValueError, match=message):
        of_dataset(make(), **arguments)


def test_the_module_imports_without_torch_or_datasets():
    code = "import sys, hf_pds.precomputed; sys.exit(bool({'torch', 'datasets'} & set(sys.modules)))"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
