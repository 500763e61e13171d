import io
import json
import logging

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from helpers import FAST
from hf_pds import PDSPipeline, PDSPipelineOutput, Prototypes
from hf_pds.distilled import COLUMNS
from hf_pds.pipeline_pds import check_generation_settings, snapshot_revision
from hf_pds.testing import tiny_pds_components


@pytest.fixture(scope="module")
def distilled(pipe, dataset):
    return pipe(dataset, budget=4, batch_size=4, **FAST)


def decode(png: bytes) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(png)))


def pixels(dataset):
    return [np.asarray(image) for image in dataset["image"]]


def assert_same_images(first, second):
    assert len(first) == len(second)
    for a, b in zip(pixels(first), pixels(second), strict=True):
        np.testing.assert_array_equal(a, b)


def test_distill_returns_budget_rows_with_the_design_columns(distilled, dataset):
    assert isinstance(distilled, PDSPipelineOutput)
    assert isinstance(distilled.prototypes, Prototypes)
    out = distilled.dataset
    assert out.num_rows == 4
    assert tuple(out.column_names) == COLUMNS
    assert isinstance(out.features["image"], datasets.Image)
    assert all(image.size == (40, 40) and image.mode == "RGB" for image in out["image"])
    source_captions = [caption for captions in dataset["caption"] for caption in captions]
    for row in out:
        assert row["caption"] == source_captions[row["source_caption_index"]]
        assert len(row["text_embedding"]) == len(row["image_embedding"]) == 32
    np.testing.assert_allclose(np.asarray(out["image_embedding"]), distilled.prototypes.image_prototypes)
    assert list(out["similarity"]) == sorted(out["similarity"], reverse=True)
    assert sum(out["support"]) <= len(source_captions)


def test_same_seed_gives_identical_images_and_prototypes(pipe, dataset, distilled):
    again = pipe(dataset, budget=4, batch_size=4, **FAST)
    assert_same_images(distilled.dataset, again.dataset)
    np.testing.assert_array_equal(distilled.prototypes.image_prototypes, again.prototypes.image_prototypes)
    other_seed = pipe(dataset, budget=4, batch_size=4, seed=7, **FAST)
    assert not all(
        np.array_equal(a, b) for a, b in zip(pixels(distilled.dataset), pixels(other_seed.dataset), strict=True)
    )


def test_images_do_not_depend_on_batch_size(pipe, dataset, distilled):
    one_by_one = pipe(dataset, budget=4, batch_size=1, **FAST)
    assert_same_images(distilled.dataset, one_by_one.dataset)


def test_image_of_a_prototype_does_not_depend_on_the_others(pipe):
    """Decoding prototypes 2 and 3 alone gives the images they get among four."""
    from hf_pds.synthesis import prototype_seed, synthesize

    rng = np.random.default_rng(0)
    embeds = rng.normal(size=(4, 32)).astype(np.float32)
    prompts = ["a dog", "a cat", "a bird", "a boat"]
    seeds = [prototype_seed(42, index) for index in range(4)]
    decoder, settings = pipe.make_decoder(num_inference_steps=2), {"output_size": None, "batch_size": 4}
    all_four = synthesize(decoder, embeds, prompts, seeds, **settings)
    last_two = synthesize(decoder, embeds[2:], prompts[2:], seeds[2:], **settings)
    assert sorted(all_four) == [(0, 0), (1, 0), (2, 0), (3, 0)] and sorted(last_two) == [(0, 0), (1, 0)]
    scored = [(image.png, image.fidelity) for image in (all_four[2, 0], all_four[3, 0], last_two[0, 0], last_two[1, 0])]
    assert scored[:2] == scored[2:]  # the same PNG bytes and fidelity


def test_batched_decoding_matches_one_by_one_up_to_rounding(pipe):
    """The batched path of accelerators: one generator per image, so only kernel rounding differs."""
    from hf_pds.synthesis import prototype_seed, synthesize

    rng = np.random.default_rng(1)
    embeds = rng.normal(size=(5, 32)).astype(np.float32)
    prompts = ["a dog", "a cat", "a bird", "a boat", "a tree"]
    seeds = [prototype_seed(0, index) for index in range(5)]
    decoder = pipe.make_decoder(num_inference_steps=2, negative_prompt="text, watermark")
    settings = {"output_size": None}
    batched = synthesize(decoder, embeds, prompts, seeds, batch_size=3, batch_invariant=False, **settings)
    single = synthesize(decoder, embeds, prompts, seeds, batch_size=3, batch_invariant=True, **settings)
    assert len(batched) == 5 and sorted(batched) == sorted(single)
    for key in batched:
        assert np.abs(decode(batched[key].png).astype(int) - decode(single[key].png).astype(int)).max() <= 1
    batched_again = synthesize(decoder, embeds, prompts, seeds, batch_size=3, batch_invariant=False, **settings)
    for key in batched:
        np.testing.assert_array_equal(decode(batched[key].png), decode(batched_again[key].png))


def test_generator_draws_the_run_seed(pipe, dataset):
    first = pipe(dataset, budget=3, generator=torch.Generator().manual_seed(5), **FAST)
    second = pipe(dataset, budget=3, generator=torch.Generator().manual_seed(5), **FAST)
    assert first.settings["seed"] == second.settings["seed"]
    assert_same_images(first.dataset, second.dataset)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"budget": 0}, ValueError, "budget must be at least 1"),
        ({"budget": 21}, ValueError, "budget=21 is larger than the 20 pairs left after pruning 5 of 25"),
        ({"budget": 11}, ValueError, "budget=11 is larger than the 10 distinct images"),
        ({"budget": 3, "image_column": "picture"}, ValueError, "image_column='picture' is not a column"),
        ({"budget": 3, "noise_level": 5000}, ValueError, "noise_level must be an integer in"),
        (
            {"budget": 3, "dataset": [{"image": None, "caption": "x"}]},
            TypeError,
            "must be a datasets.Dataset",
        ),
    ],
)
def test_bad_inputs_fail_before_any_model_runs(pipe, dataset, kwargs, error, message):
    calls = []
    hook = pipe.image_encoder.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        arguments = {"dataset": dataset, **FAST, **kwargs}
        with pytest.raises(error, match=message):
            pipe(**arguments)
    finally:
        hook.remove()
    assert calls == []


def test_the_budget_counts_identical_images_once(pipe, dataset, tmp_path):
    calls = []
    hook = pipe.image_encoder.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        # Twice the same 10 images (their bytes): 20 rows, 10 distinct images.
        twice = datasets.concatenate_datasets([dataset, dataset])
        with pytest.raises(ValueError, match=r"budget=11 is larger than the 10 distinct images \(held by 20 rows"):
            pipe(twice, budget=11, **FAST)
        # Paths: rows 6, 7, 10 and 11 point at the files of rows 0, 1, 4 and 5; rows 8 and 9 at copies of 2 and 3.
        files = []
        for index in range(6):
            files.append(tmp_path / f"{index}.png")
            PIL.Image.new("RGB", (16, 16), (40 * index, 0, 0)).save(files[-1])
        for index in (2, 3):
            (tmp_path / f"copy-{index}.png").write_bytes(files[index].read_bytes())
        paths = [*files, files[0], files[1], tmp_path / "copy-2.png", tmp_path / "copy-3.png", files[4], files[5]]
        rows = datasets.Dataset.from_dict(
            {"image": [str(path) for path in paths], "caption": [["a red square", "a square"]] * 12}
        )
        for budget in (7, 12, 13):
            with pytest.raises(ValueError, match=f"budget={budget} is larger than the 6 distinct images \\(held by 12"):
                pipe(rows, budget=budget, prune_ratio=0.0, **FAST)
    finally:
        hook.remove()
    assert calls == []


def test_rows_with_missing_captions_raise_or_are_skipped(pipe, dataset):
    columns = {name: list(dataset[name]) for name in dataset.column_names}
    columns["caption"][6] = None
    broken = datasets.Dataset.from_dict(columns, features=dataset.features)
    with pytest.raises(ValueError, match="Row 6: column 'caption' is None"):
        pipe(broken, budget=3, **FAST)
    out = pipe(broken, budget=3, skip_invalid_rows=True, **FAST)
    assert out.dataset.num_rows == 3 and out.settings["skipped_rows"] == 1
    assert out.settings["source_images"] == 9


def test_save_pretrained_round_trip_gives_identical_outputs(pipe, dataset, distilled, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "PDSPipeline"
    assert index["clip_text_encoder"] == ["transformers", "CLIPTextModelWithProjection"]
    reloaded = PDSPipeline.from_pretrained(tmp_path / "pipe")
    assert_same_images(distilled.dataset, reloaded(dataset, budget=4, batch_size=4, **FAST).dataset)


def test_plain_unclip_checkpoint_gets_its_clip_text_tower(tmp_path, dataset):
    from diffusers import StableUnCLIPImg2ImgPipeline

    components = tiny_pds_components(seed=0)
    clip_tokenizer, clip_text_encoder = components.pop("clip_tokenizer"), components.pop("clip_text_encoder")
    StableUnCLIPImg2ImgPipeline(**components).save_pretrained(tmp_path / "unclip")
    clip_text_encoder.save_pretrained(tmp_path / "clip")
    clip_tokenizer.save_pretrained(tmp_path / "clip")

    with pytest.raises(ValueError, match="pass clip_model_name_or_path"):
        PDSPipeline.from_pretrained(tmp_path / "unclip")
    loaded = PDSPipeline.from_pretrained(tmp_path / "unclip", clip_model_name_or_path=str(tmp_path / "clip"))
    torch.testing.assert_close(
        loaded.clip_text_encoder.text_projection.weight, clip_text_encoder.text_projection.weight
    )
    assert loaded(dataset, budget=2, **FAST).dataset.num_rows == 2


def test_mismatched_clip_towers_are_refused():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    components = tiny_pds_components(seed=0)
    config = components["clip_text_encoder"].config.to_dict()
    config["projection_dim"] = 16
    components["clip_text_encoder"] = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    with pytest.raises(ValueError, match="projects to 16 dimensions but image_encoder to 32"):
        PDSPipeline(**components).check_components()


def test_cpu_offload_sequence_covers_every_model(pipe):
    models = {name for name, component in pipe.components.items() if isinstance(component, torch.nn.Module)}
    offloaded = set(pipe.model_cpu_offload_seq.split("->")) | set(pipe._exclude_from_cpu_offload)
    assert models <= offloaded  # the sequence also names the models of the other decoders


def test_the_checkpoints_clip_model_is_found_from_the_image_encoder_config():
    from transformers import CLIPVisionConfig

    from hf_pds.pipeline_pds import matching_clip_model

    vit_l14 = CLIPVisionConfig(hidden_size=1024, num_attention_heads=16, projection_dim=768, patch_size=14)
    vit_h14 = CLIPVisionConfig(hidden_size=1280, num_attention_heads=16, projection_dim=1024, patch_size=14)
    assert matching_clip_model(vit_l14) == "openai/clip-vit-large-patch14"
    assert matching_clip_model(vit_h14) == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def test_importing_the_package_and_the_prototype_engine_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, hf_pds; from hf_pds import extract_prototypes; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_a_stream_gives_the_same_distilled_set(pipe, dataset, distilled, tmp_path):
    dataset.to_parquet(tmp_path / "source.parquet")
    stream = datasets.load_dataset(
        "parquet", data_files=str(tmp_path / "source.parquet"), split="train", streaming=True
    )
    assert isinstance(stream, datasets.IterableDataset)
    streamed = pipe(stream, budget=4, batch_size=4, **FAST)
    assert_same_images(distilled.dataset, streamed.dataset)
    assert list(streamed.dataset["caption"]) == list(distilled.dataset["caption"])
    np.testing.assert_array_equal(streamed.prototypes.text_prototypes, distilled.prototypes.text_prototypes)


def test_a_stream_is_read_one_batch_at_a_time(pipe, dataset):
    produced = []

    def rows():
        for index, row in enumerate(dataset):
            produced.append(index)
            yield row

    stream = datasets.IterableDataset.from_generator(rows, features=dataset.features)
    read_when_embedding = []
    hook = pipe.image_encoder.register_forward_pre_hook(lambda module, args: read_when_embedding.append(len(produced)))
    try:
        pipe(stream, budget=2, embedding_batch_size=3, **FAST)
    finally:
        hook.remove()
    # Images are embedded as soon as a batch of 3 has arrived, not after the whole stream was read.
    assert read_when_embedding[:4] == [3, 6, 9, 10]


def test_a_stream_names_its_bad_row_or_skips_it(pipe, dataset):
    columns = {name: list(dataset[name]) for name in dataset.column_names}
    columns["image"][5] = None
    broken = datasets.Dataset.from_dict(columns, features=dataset.features).to_iterable_dataset()
    with pytest.raises(ValueError, match="Row 5: column 'image' has no image"):
        pipe(broken, budget=3, **FAST)
    out = pipe(broken, budget=3, skip_invalid_rows=True, **FAST)
    assert out.settings["skipped_rows"] == 1 and out.settings["source_images"] == 9
    with pytest.raises(ValueError, match="budget=10 is larger than the 9 distinct images"):
        pipe(broken, budget=10, skip_invalid_rows=True, **FAST)
    with pytest.raises(ValueError, match="caption_column='text' is not a column"):
        pipe(broken, budget=3, caption_column="text", **FAST)


def count_clip_forwards(pipe):
    calls = []
    hooks = [
        tower.register_forward_pre_hook(lambda module, args: calls.append(1))
        for tower in (pipe.image_encoder, pipe.clip_text_encoder)
    ]
    return calls, hooks


def broken_image_cell(kind: str, tmp_path):
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (30, 20), (10, 200, 10)).save(buffer, format="JPEG")
    return {
        "corrupt bytes": {"bytes": b"\x89PNG but not really", "path": None},
        "truncated file": {"bytes": buffer.getvalue()[:-150], "path": None},
        "missing path": {"bytes": None, "path": str(tmp_path / "nowhere.jpg")},
    }[kind]


def with_image_cell(dataset, row, cell):
    cells = list(dataset.cast_column("image", datasets.Image(decode=False))["image"])
    cells[row] = cell
    return datasets.Dataset.from_dict({"image": cells, "caption": list(dataset["caption"])}, features=dataset.features)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("corrupt bytes", "holds data that is not a readable image"),
        ("truncated file", "holds a truncated image file"),
        ("missing path", "nowhere.jpg, which does not exist"),
    ],
)
def test_an_undecodable_image_is_named_before_any_model_runs(pipe, dataset, tmp_path, kind, reason, caplog):
    broken = with_image_cell(dataset, 7, broken_image_cell(kind, tmp_path))
    calls, hooks = count_clip_forwards(pipe)
    try:
        with pytest.raises(ValueError, match=rf"Row 7: column 'image' .*{reason}"):
            pipe(broken, budget=3, output_dir=tmp_path / "out", **FAST)
        assert calls == []
        with caplog.at_level(logging.WARNING):
            out = pipe(broken, budget=3, skip_invalid_rows=True, output_dir=tmp_path / "out", **FAST)
    finally:
        for hook in hooks:
            hook.remove()
    assert out.settings["skipped_rows"] == 1 and out.settings["source_images"] == 9
    assert "row 7, column 'image'" in caplog.text and reason in caplog.text


def test_a_stream_names_an_undecodable_image_as_it_arrives(pipe, dataset, tmp_path):
    broken = with_image_cell(dataset, 7, broken_image_cell("corrupt bytes", tmp_path)).to_iterable_dataset()
    embedded_before = []
    hook = pipe.image_encoder.register_forward_pre_hook(lambda module, args: embedded_before.append(len(args[0])))
    try:
        with pytest.raises(ValueError, match="Row 7: column 'image' holds data that is not a readable image"):
            pipe(broken, budget=3, embedding_batch_size=3, **FAST)
    finally:
        hook.remove()
    assert embedded_before == [3, 3]  # rows 0-5 were embedded as they came; row 7 stopped the read
    out = pipe(broken, budget=3, skip_invalid_rows=True, **FAST)
    assert out.settings["skipped_rows"] == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*32\), got -1"),
        ({"seed": True}, "seed must be an integer"),
        ({"seed": "3"}, "seed must be an integer"),
        ({"seed": 2**32}, "seed must be an integer"),
        ({"budget": True}, "budget must be an integer, got True"),
        ({"budget": 2.0}, "budget must be an integer"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be >= 0 \\(a finite number\\), got nan"),
        ({"guidance_scale": float("inf")}, "guidance_scale must be"),
        ({"guidance_scale": "5"}, "guidance_scale must be"),
        ({"prune_ratio": "0.2"}, r"prune_ratio must be in \[0, 1\), got '0.2'"),
        ({"prune_ratio": float("nan")}, "prune_ratio must be in"),
        ({"embedding_batch_size": 0}, "embedding_batch_size must be a positive integer, got 0"),
        ({"embedding_batch_size": 2.5}, "embedding_batch_size must be a positive integer"),
        ({"batch_size": True}, "batch_size must be a positive integer, got True"),
        ({"num_inference_steps": 2.0}, "num_inference_steps must be a positive integer"),
        ({"noise_level": True}, "noise_level must be an integer"),
        ({"output_size": 32.0}, "output_size must be a positive integer or None"),
        ({"negative_prompt": 3}, "negative_prompt must be a string or None"),
        ({"normalize": "yes"}, "normalize must be True or False"),
        ({"skip_invalid_rows": 1}, "skip_invalid_rows must be True or False"),
        ({"use_cache": None}, "use_cache must be True or False"),
        ({"output_dir": 3}, "output_dir must be a path"),
        ({"cache_dir": 5}, "cache_dir must be a path"),
        ({"provenance": ["x"]}, "provenance must be a dict or None"),
        ({"generator": 7}, "generator must be a torch.Generator or None"),
        ({"kmeans_backend": "gpu"}, "kmeans_backend must be one of"),
        ({"image_column": 0}, "image_column must be a column name"),
    ],
)
def test_every_argument_is_checked_before_any_model_runs(pipe, dataset, kwargs, message):
    calls, hooks = count_clip_forwards(pipe)
    try:
        with pytest.raises((ValueError, TypeError), match=message):
            pipe(**{"dataset": dataset, "budget": 3, **FAST, **kwargs})
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == []


def test_numpy_integers_are_integers(pipe, dataset, tmp_path):
    out = pipe(
        dataset,
        budget=np.int64(3),
        seed=np.uint32(7),
        num_inference_steps=np.int32(2),
        batch_size=np.int16(2),
        output_size=np.int64(40),
        noise_level=np.int8(10),
        output_dir=tmp_path / "out",
    )
    assert out.dataset.num_rows == 3
    settings = {
        key: out.settings[key] for key in ("budget", "seed", "num_inference_steps", "batch_size", "noise_level")
    }
    assert settings == {"budget": 3, "seed": 7, "num_inference_steps": 2, "batch_size": 2, "noise_level": 10}
    assert all(type(value) is int for value in settings.values())
    assert "| `seed` | `7` |" in (tmp_path / "out" / "README.md").read_text()


def test_degenerate_data_warns_how_many_prototypes_are_fallbacks(pipe, caplog):
    same = datasets.Dataset.from_dict(
        # Six images (identical ones would be refused: more prototypes than distinct images), one caption.
        {"image": [PIL.Image.new("RGB", (8, 8), (9, 9, 9 + row)) for row in range(6)], "caption": ["one caption"] * 6},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )
    with caplog.at_level(logging.WARNING):
        out = pipe(same, budget=3, prune_ratio=0.0, **FAST)
    fallbacks = int((np.asarray(out.dataset["support"]) == 0).sum())
    assert fallbacks >= 1
    assert f"{fallbacks} of 3 prototypes fell back to the k-means centres" in caplog.text


def test_revision_is_read_from_a_hub_cache_path():
    commit = "a" * 40
    assert snapshot_revision(f"/root/.cache/huggingface/hub/models--org--name/snapshots/{commit}/unet") == commit
    assert snapshot_revision("./my-local-folder/unet") is None


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


def test_the_output_says_how_long_each_step_took(pipe, dataset, tmp_path):
    out = pipe(dataset, budget=3, output_dir=tmp_path / "out", **FAST)
    assert set(out.timings) == {"check_inputs", "embedding", "prototypes", "synthesis", "save"}
    assert all(seconds > 0 for seconds in out.timings.values())
    assert "timings" not in (tmp_path / "out" / "README.md").read_text()  # the card stays the same run to run
