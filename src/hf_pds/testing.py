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
    """The denoising scheduler of stable-diffusion-2-1-unclip(-small), as its ``scheduler_config.json`` has it:
    PNDM (PLMS steps only), v-prediction, scaled-linear betas 0.00085 to 0.012, "leading" spacing, offset 1."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
        timestep_spacing="leading",
    )


def image_noising_scheduler():
    """The image-embedding noise schedule of stable-diffusion-2-1-unclip(-small): DDPM, squared cosine, 1000 steps."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def _tiny_unet(image_embed_dim: int, cross_attention_dim: int):
    """A two-block unCLIP UNet: conditioned on an image embedding (with its noise-level embedding) and on
    prompt states of width ``cross_attention_dim``."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        attention_head_dim=(2, 4),
        class_embed_type="projection",
        # unCLIP conditions on the image embedding concatenated with its noise-level embedding.
        projection_class_embeddings_input_dim=image_embed_dim * 2,
        cross_attention_dim=cross_attention_dim,
        layers_per_block=1,
        upcast_attention=True,
        use_linear_projection=True,
        norm_num_groups=32,
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(32,),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=TINY_IMAGE_SIZE,
    )


def tiny_pds_components(seed: int = 0) -> dict:
    """The components of a tiny :class:`PDSPipeline`, with weights drawn from ``torch.manual_seed(seed)``."""
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
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
    unet = _tiny_unet(image_embed_dim=TINY_EMBED_DIM, cross_attention_dim=TINY_EMBED_DIM)
    vae = _tiny_vae()
    return {
        "feature_extractor": CLIPImageProcessor(
            size={"shortest_edge": TINY_IMAGE_SIZE},
            crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        ),
        "image_encoder": image_encoder,
        "image_normalizer": StableUnCLIPImageNormalizer(embedding_dim=TINY_EMBED_DIM),
        "image_noising_scheduler": image_noising_scheduler(),
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
    return pipeline


def real_size_pds_components(seed: int = 0) -> dict:
    """The components of stable-diffusion-2-1-unclip-small at their published sizes (DESIGN.md), random weights:
    for speed and memory measurements, which depend on shapes only. A GPU's work: the UNet alone is 2.1 TFLOP per
    sample at 96x96 latents."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    vit_l_text = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
    vit_h_text = {"hidden_size": 1024, "num_hidden_layers": 23, "num_attention_heads": 16, "intermediate_size": 4096}
    return {
        "feature_extractor": CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
        "image_encoder": CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=1024,
                num_hidden_layers=24,
                num_attention_heads=16,
                intermediate_size=4096,
                patch_size=14,
                image_size=224,
                projection_dim=768,
            )
        ),
        "image_normalizer": StableUnCLIPImageNormalizer(embedding_dim=768),
        "image_noising_scheduler": image_noising_scheduler(),
        "tokenizer": tokenizer,
        "text_encoder": CLIPTextModel(CLIPTextConfig(vocab_size=49408, projection_dim=1024, **ids, **vit_h_text)),
        "unet": UNet2DConditionModel(
            sample_size=96,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024,
            use_linear_projection=True,
            class_embed_type="projection",
            projection_class_embeddings_input_dim=1536,
        ),
        "scheduler": unclip_scheduler(),
        "vae": AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            scaling_factor=0.18215,
        ),
        "clip_tokenizer": tiny_clip_tokenizer(),
        "clip_text_encoder": CLIPTextModelWithProjection(
            CLIPTextConfig(vocab_size=49408, projection_dim=768, **ids, **vit_l_text)
        ),
    }


# The two public stable unCLIP checkpoints: the widths of their embedding spaces, and the CLIP model whose
# vision tower is their image encoder (DESIGN.md, "The real checkpoints").
CHECKPOINT_LAYOUTS = {
    "stable-diffusion-2-1-unclip-small": {
        "clip_model": "openai/clip-vit-large-patch14",
        "vision_hidden": 1024,
        "clip_text_hidden": 768,
        "projection": 768,
    },
    "stable-diffusion-2-1-unclip": {
        "clip_model": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        "vision_hidden": 1280,
        "clip_text_hidden": 1024,
        "projection": 1024,
    },
}
# The prompt encoder of both checkpoints is OpenCLIP ViT-H/14's text tower.
UNCLIP_TEXT_HIDDEN = 1024


def save_checkpoint_like(
    folder: str | Path, checkpoint: str = "stable-diffusion-2-1-unclip-small", seed: int = 0
) -> dict:
    """Write a checkpoint laid out exactly as the real one is when diffusers and transformers save it, with tiny
    random weights; returns the keyword arguments of :meth:`PDSPipeline.from_pretrained` that load it.

    For the two unCLIP checkpoints, ``folder/unclip`` is laid out as ``sd2-community/<checkpoint>`` and
    ``folder/clip`` as its CLIP model: ``{"pretrained_model_name_or_path": folder/unclip,
    "clip_model_name_or_path": folder/clip}``.

    ``unclip`` is a ``StableUnCLIPImg2ImgPipeline`` folder: the real components, classes, scheduler configs (PNDM,
    v-prediction; DDPM squared cosine for the image noise) and embedding widths (768-d for ``-small``, 1024-d for
    the other), no CLIP text tower. ``clip`` is a ``CLIPModel`` folder (both towers, tokenizer, image processor)
    whose vision tower is the checkpoint's image encoder, as in the real pair. Every model has one layer.
    """
    from diffusers import StableUnCLIPImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    if checkpoint not in CHECKPOINT_LAYOUTS:
        raise ValueError(f"checkpoint must be one of {sorted(CHECKPOINT_LAYOUTS)}, got {checkpoint!r}.")
    layout = CHECKPOINT_LAYOUTS[checkpoint]
    folder = Path(folder)
    tokenizer = tiny_clip_tokenizer()
    tokens = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer),
    )

    # One layer of 64-wide heads and a tiny MLP; the widths are the real ones.
    def one_layer(hidden: int) -> dict:
        return dict(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=hidden // 64, intermediate_size=64)

    projection = layout["projection"]
    vision = dict(**one_layer(layout["vision_hidden"]), patch_size=14, image_size=224, projection_dim=projection)

    torch.manual_seed(seed)
    clip = CLIPModel(
        CLIPConfig(
            text_config=dict(**one_layer(layout["clip_text_hidden"]), projection_dim=projection, **tokens),
            vision_config=vision,
            projection_dim=projection,
        )
    )
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision))
    image_encoder.load_state_dict(
        {name: value for name, value in clip.state_dict().items() if name.startswith(("vision_model.", "visual_"))}
    )
    components = {
        "feature_extractor": CLIPImageProcessor(),
        "image_encoder": image_encoder,
        "image_normalizer": StableUnCLIPImageNormalizer(embedding_dim=projection),
        "image_noising_scheduler": image_noising_scheduler(),
        "tokenizer": tokenizer,
        "text_encoder": CLIPTextModel(CLIPTextConfig(**one_layer(UNCLIP_TEXT_HIDDEN), **tokens)),
        "unet": _tiny_unet(image_embed_dim=projection, cross_attention_dim=UNCLIP_TEXT_HIDDEN),
        "scheduler": unclip_scheduler(),
        "vae": _tiny_vae(),
    }
    StableUnCLIPImg2ImgPipeline(**components).save_pretrained(folder / "unclip")
    clip.save_pretrained(folder / "clip")
    tokenizer.save_pretrained(folder / "clip")
    CLIPImageProcessor().save_pretrained(folder / "clip")
    return {"pretrained_model_name_or_path": str(folder / "unclip"), "clip_model_name_or_path": str(folder / "clip")}


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
