"""The decoder fixtures load as their real checkpoints do, with plain diffusers and transformers, and generate.

Each writer in hf_pds.testing lays out the Hub repositories of one decoder family with tiny weights; here a user's
own code runs on them: ``from_pretrained`` on the folder, ``load_ip_adapter`` as the adapter's card shows, one
tiny generation. The checks are behaviour: the embedding a decoder reads changes its image, and the CLIP model
written beside each decoder embeds in the space of the decoder's image encoder.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoPipelineForText2Image,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    KandinskyV22Pipeline,
    KandinskyV22PriorPipeline,
    PNDMScheduler,
)
from safetensors import safe_open
from transformers import CLIPModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

from hf_pds.testing import (
    DECODER_REPOS,
    IP_ADAPTER_FILES,
    save_checkpoint_like,
    save_flux_ip_adapter_like,
    save_kandinsky_like,
    save_sd15_ip_adapter_like,
    save_sdxl_ip_adapter_like,
)

STEPS = {"num_inference_steps": 2, "output_type": "np"}


def seeded():
    """The same starting noise for every call, so that two images differ only by what the decoder read."""
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Every decoder fixture, written into one folder as a user's Hub cache would hold the repositories."""
    root = tmp_path_factory.mktemp("decoders")
    return {
        "kandinsky-2-2": save_kandinsky_like(root),
        "sd15-ip-adapter": save_sd15_ip_adapter_like(root),
        "sdxl-ip-adapter": save_sdxl_ip_adapter_like(root),
        "flux-ip-adapter": save_flux_ip_adapter_like(root),
    }


def model_index(folder):
    return json.loads((folder / "model_index.json").read_text())


def files_under(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def embeds(seed, count, width):
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


def same_space(clip_folder, image_encoder):
    """Whether the CLIP model in ``clip_folder`` embeds images exactly as ``image_encoder`` does."""
    clip = CLIPModel.from_pretrained(clip_folder)
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        from_clip = clip.get_image_features(pixel_values=pixels).pooler_output
        from_encoder = image_encoder(pixel_values=pixels).image_embeds
    return torch.allclose(from_clip, from_encoder, atol=1e-5)


def test_the_kandinsky_decoder_turns_image_embeddings_into_images(written):
    decoder = written["kandinsky-2-2"]["decoder"]
    assert decoder.name == DECODER_REPOS["kandinsky-2-2"]["decoder"].split("/")[1]
    index = model_index(decoder)
    assert index["_class_name"] == "KandinskyV22Pipeline"
    assert {key: value for key, value in index.items() if not key.startswith("_")} == {
        "movq": ["diffusers", "VQModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    }

    pipe = KandinskyV22Pipeline.from_pretrained(decoder)
    assert isinstance(pipe.scheduler, DDPMScheduler)
    assert pipe.unet.config.addition_embed_type == "image"
    assert pipe.unet.config.encoder_hid_dim == 1280
    negative = torch.zeros(2, 1280)
    size = {"height": 64, "width": 64, "generator": seeded(), **STEPS}
    first = pipe(image_embeds=embeds(0, 2, 1280), negative_image_embeds=negative, **size)
    size["generator"] = seeded()
    second = pipe(image_embeds=embeds(1, 2, 1280), negative_image_embeds=negative, **size)
    assert first.images.shape == (2, 64, 64, 3)
    assert np.abs(first.images - second.images).max() > 1e-3


def test_the_kandinsky_prior_holds_both_towers_of_the_decoders_clip_space(written):
    folders = written["kandinsky-2-2"]
    prior = folders["prior"]
    assert model_index(prior)["image_processor"] == ["transformers", "CLIPImageProcessor"]
    assert {"image_encoder", "image_processor", "prior", "scheduler", "text_encoder", "tokenizer"} <= {
        key for key in model_index(prior) if not key.startswith("_")
    }

    image_encoder = CLIPVisionModelWithProjection.from_pretrained(prior, subfolder="image_encoder")
    text_encoder = CLIPTextModelWithProjection.from_pretrained(prior, subfolder="text_encoder")
    assert image_encoder.config.projection_dim == text_encoder.config.projection_dim == 1280
    assert same_space(folders["clip"], image_encoder)

    # The prior's own path, text to image embedding, feeds the decoder.
    out = KandinskyV22PriorPipeline.from_pretrained(prior)("a red apple", num_inference_steps=2)
    assert out.image_embeds.shape == out.negative_image_embeds.shape == (1, 1280)
    decoder = KandinskyV22Pipeline.from_pretrained(folders["decoder"])
    image = decoder(image_embeds=out.image_embeds, negative_image_embeds=out.negative_image_embeds, **STEPS)
    assert image.images.shape[0] == 1


def ip_adapter_pipeline(folders, name):
    pipe = AutoPipelineForText2Image.from_pretrained(folders["base"])
    pipe.load_ip_adapter(str(folders["adapter"]), **IP_ADAPTER_FILES[name])
    return pipe


def generate(pipe, positive, **call):
    negative = torch.zeros_like(positive)
    return pipe(
        prompt=["a red apple", "a blue car"],
        ip_adapter_image_embeds=[torch.cat([negative, positive])[:, None]],
        height=32,
        width=32,
        generator=seeded(),
        **STEPS,
        **call,
    ).images


def test_sd15_with_its_ip_adapter_draws_from_image_embeddings(written):
    folders = written["sd15-ip-adapter"]
    assert model_index(folders["base"])["_class_name"] == "StableDiffusionPipeline"
    assert "image_encoder" not in model_index(folders["base"])
    assert files_under(folders["adapter"] / "models") == [
        "image_encoder/config.json",
        "image_encoder/model.safetensors",
        "ip-adapter_sd15.safetensors",
    ]

    pipe = ip_adapter_pipeline(folders, "sd15-ip-adapter")
    assert isinstance(pipe.scheduler, PNDMScheduler)
    assert pipe.image_encoder.config.projection_dim == 1024
    assert same_space(folders["clip"], pipe.image_encoder)

    pipe.set_ip_adapter_scale(0.6)
    first, second = generate(pipe, embeds(0, 2, 1024)), generate(pipe, embeds(1, 2, 1024))
    assert first.shape == (2, 32, 32, 3)
    assert np.abs(first - second).max() > 1e-3
    # At scale 0 the adapter adds nothing: the image no longer depends on the embedding.
    pipe.set_ip_adapter_scale(0.0)
    np.testing.assert_allclose(generate(pipe, embeds(0, 2, 1024)), generate(pipe, embeds(1, 2, 1024)), atol=1e-6)


def test_sdxl_with_its_ip_adapter_draws_from_image_embeddings(written):
    folders = written["sdxl-ip-adapter"]
    assert model_index(folders["base"])["_class_name"] == "StableDiffusionXLPipeline"
    # One h94/IP-Adapter folder holds both adapters, as the real repository does.
    assert folders["adapter"] == written["sd15-ip-adapter"]["adapter"]
    assert files_under(folders["adapter"]) == [
        "models/image_encoder/config.json",
        "models/image_encoder/model.safetensors",
        "models/ip-adapter_sd15.safetensors",
        "sdxl_models/image_encoder/config.json",
        "sdxl_models/image_encoder/model.safetensors",
        "sdxl_models/ip-adapter_sdxl.safetensors",
    ]

    pipe = ip_adapter_pipeline(folders, "sdxl-ip-adapter")
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert pipe.image_encoder.config.projection_dim == 1280
    assert same_space(folders["clip"], pipe.image_encoder)
    # SDXL's second text encoder is the text tower of the adapter's CLIP model.
    ids = pipe.tokenizer_2(["a red apple"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        from_clip = CLIPModel.from_pretrained(folders["clip"]).get_text_features(input_ids=ids).pooler_output
        torch.testing.assert_close(pipe.text_encoder_2(ids).text_embeds, from_clip)

    pipe.set_ip_adapter_scale(0.6)
    first, second = generate(pipe, embeds(0, 2, 1280)), generate(pipe, embeds(1, 2, 1280))
    assert first.shape == (2, 32, 32, 3)
    assert np.abs(first - second).max() > 1e-3


def test_flux_with_the_xlabs_ip_adapter_draws_from_clip_vit_l_embeddings(written, tmp_path):
    folders = written["flux-ip-adapter"]
    assert model_index(folders["base"])["tokenizer_2"] == ["transformers", "T5TokenizerFast"]
    assert files_under(folders["adapter"]) == ["ip_adapter.safetensors"]
    with safe_open(folders["adapter"] / "ip_adapter.safetensors", "pt") as weights:
        names = set(weights.keys())
    assert "ip_adapter_proj_model.proj.weight" in names
    assert "double_blocks.0.processor.ip_adapter_double_stream_k_proj.bias" in names

    pipe = FluxPipeline.from_pretrained(folders["base"])
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    pipe.load_ip_adapter(
        str(folders["adapter"]),
        **IP_ADAPTER_FILES["flux-ip-adapter"],
        image_encoder_pretrained_model_name_or_path=str(folders["image_encoder"]),
    )
    pipe.set_ip_adapter_scale(1.0)
    assert pipe.image_encoder.config.projection_dim == 768

    def draw(positive):
        return pipe(
            prompt=["a red apple", "a blue car"],
            negative_prompt=["", ""],
            true_cfg_scale=4.0,
            ip_adapter_image_embeds=[positive[:, None]],
            negative_ip_adapter_image_embeds=[torch.zeros_like(positive)[:, None]],
            height=32,
            width=32,
            generator=seeded(),
            **STEPS,
        ).images

    first, second = draw(embeds(0, 2, 768)), draw(embeds(1, 2, 768))
    assert first.shape == (2, 32, 32, 3)
    assert np.abs(first - second).max() > 1e-3

    # The paper's space: the same seed gives the very CLIP ViT-L/14 that stable-diffusion-2-1-unclip-small's
    # fixture writes, so the two decoders can share embeddings.
    unclip_clip = Path(save_checkpoint_like(tmp_path, "stable-diffusion-2-1-unclip-small")["clip_model_name_or_path"])
    digest = [
        hashlib.sha1((clip / "model.safetensors").read_bytes()).hexdigest() for clip in (unclip_clip, folders["clip"])
    ]
    assert digest[0] == digest[1]
