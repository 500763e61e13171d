"""Tiny, randomly initialised PDS components that need no network: for tests and the offline demo.

Everything here is built from configs (diffusers' own test sizes: 32x32 images, 32-d CLIP space), so a
whole distillation runs on a CPU in seconds. The weights are random: the images show the mechanics of
the method, not its quality.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from .pipeline_pds import PDSPipeline

TINY_EMBED_DIM = 32
TINY_IMAGE_SIZE = 32

_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
# A few merges so that common words become single tokens, as in a real CLIP vocabulary.
_MERGED_WORDS = ("a", "the", "of", "on", "in", "and", "with", "digit", "number", "handwritten", "image")


def _byte_level_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE (GPT-2, CLIP) uses to stand for the 256 bytes."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    remapped = [256 + n for n in range(256 - len(printable))]
    unprintable_iter = iter(remapped)
    return [chr(b) if b in printable else chr(next(unprintable_iter)) for b in range(256)]


def write_tiny_clip_vocabulary(folder: str | Path) -> Path:
    """Write a small CLIP BPE vocabulary (``vocab.json`` + ``merges.txt``) into ``folder``.

    Every byte is in the vocabulary, so any text tokenizes; a handful of common words are merged into
    single tokens.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_level_alphabet()
    tokens = [*alphabet, *(char + "</w>" for char in alphabet)]
    merges = []
    for word in _MERGED_WORDS:
        if len(word) < 2:
            continue
        prefix = word[0]
        for position, char in enumerate(word[1:], start=2):
            piece = char + "</w>" if position == len(word) else char
            merges.append(f"{prefix} {piece}")
            prefix = prefix + piece
            if prefix not in tokens:
                tokens.append(prefix)
    tokens.extend(_SPECIAL_TOKENS)
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n"
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    return folder


def tiny_clip_tokenizer():
    """A ``CLIPTokenizer`` over the tiny local vocabulary (77 positions, as CLIP)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_tiny_clip_vocabulary(folder)
        # Without model_max_length the tokenizer's default (a huge int) breaks padding to max length.
        return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def unclip_scheduler():
    """The denoising scheduler of stable-diffusion-2-1-unclip(-small): DDIM, v-prediction."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_pds_components(seed: int = 0) -> dict:
    """The components of a tiny :class:`PDSPipeline`, with weights drawn from ``torch.manual_seed(seed)``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    tokenizer = tiny_clip_tokenizer()
    vocab_size = len(tokenizer)
    text_config = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=TINY_EMBED_DIM,
        projection_dim=TINY_EMBED_DIM,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
    )

    torch.manual_seed(seed)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=TINY_EMBED_DIM,
            projection_dim=TINY_EMBED_DIM,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=TINY_IMAGE_SIZE,
            intermediate_size=37,
            patch_size=4,
        )
    )
    clip_text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    clip_text_encoder.config.name_or_path = f"hf_pds.testing tiny random CLIP (seed={seed})"
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    unet = UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        attention_head_dim=(2, 4),
        class_embed_type="projection",
        # unCLIP conditions on the image embedding concatenated with its noise-level embedding.
        projection_class_embeddings_input_dim=TINY_EMBED_DIM * 2,
        cross_attention_dim=TINY_EMBED_DIM,
        layers_per_block=1,
        upcast_attention=True,
        use_linear_projection=True,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(32,),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=TINY_IMAGE_SIZE,
    )
    return {
        "feature_extractor": CLIPImageProcessor(
            size={"shortest_edge": TINY_IMAGE_SIZE},
            crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        ),
        "image_encoder": image_encoder,
        "image_normalizer": StableUnCLIPImageNormalizer(embedding_dim=TINY_EMBED_DIM),
        "image_noising_scheduler": DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "unet": unet,
        "scheduler": unclip_scheduler(),
        "vae": vae,
        "clip_tokenizer": tiny_clip_tokenizer(),
        "clip_text_encoder": clip_text_encoder,
    }


def tiny_pds_pipeline(seed: int = 0) -> PDSPipeline:
    """A complete :class:`PDSPipeline` with tiny random weights: no network, seconds on a CPU."""
    pipeline = PDSPipeline(**tiny_pds_components(seed))
    pipeline.register_to_config(_name_or_path=f"hf_pds.testing.tiny_pds_pipeline(seed={seed})")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digits_dataset(n_images: int | None = None):
    """scikit-learn's bundled handwritten digits (1797 real 8x8 scans) as an image-caption dataset.

    Each row has a greyscale ``image`` and three generated ``caption`` strings naming the digit, like
    the several captions per image of Flickr30k and COCO. Needs no network.
    """
    import datasets
    import numpy as np
    import PIL.Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    count = len(digits.target) if n_images is None else min(n_images, len(digits.target))
    # Pixel values are 0..16 on a black background; scale to 0..255 and upsample so CLIP sees strokes.
    pixels = (digits.images[:count] * (255 / 16)).round().astype(np.uint8)
    images = [PIL.Image.fromarray(image).resize((32, 32), PIL.Image.NEAREST) for image in pixels]
    captions = [
        [
            f"a handwritten digit {_DIGIT_WORDS[label]}",
            f"the number {label} written by hand",
            f"a small grayscale image of the digit {_DIGIT_WORDS[label]}",
        ]
        for label in digits.target[:count]
    ]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.List(datasets.Value("string")),
            "label": datasets.ClassLabel(names=list(_DIGIT_WORDS)),
        }
    )
    return datasets.Dataset.from_dict(
        {"image": images, "caption": captions, "label": digits.target[:count].tolist()}, features=features
    )
