"""Benchmark of synthesis (batched unCLIP decoding) and of CLIP embedding throughput.

Speed depends on shapes, not on weights, so the models are built from configs with random weights:
``--size tiny`` uses hf-pds's test components (32x32 images, for a CPU), ``--size real`` the published
architectures of stable-diffusion-2-1-unclip-small (UNet at 96x96 latents, i.e. 768 px; SD 2 VAE;
OpenCLIP ViT-H text tower for the prompts; CLIP ViT-L/14 image and text towers), for a GPU. Two ways of
decoding the same prototypes with the same settings are timed in the same run:

- reference: one prototype per unCLIP call, as the reference code does;
- hf-pds: ``hf_pds.synthesis.synthesize`` with ``batch_size`` prototypes per call.

    python benchmarks/synthesis.py                                                  # tiny, CPU
    python benchmarks/synthesis.py --size real --device cuda --dtype float16 --images 32 --steps 20
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import PIL.Image
import torch


def reference_loop(unclip, embeds, prompts, steps, generator):
    """The reference: one call per prototype, noise drawn from one shared generator."""
    for index in range(len(prompts)):
        unclip(
            prompt=prompts[index],
            negative_prompt="text, watermark",
            image_embeds=embeds[index : index + 1],
            num_inference_steps=steps,
            guidance_scale=5.0,
            noise_level=10,
            generator=generator,
        )


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--images", type=int, default=16, help="prototypes to decode (default: 16)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    parser.add_argument("--batch-size", type=int, default=8, help="hf-pds batch size (default: 8)")
    parser.add_argument("--embed", type=int, default=256, help="images and captions to embed (default: 256)")
    args = parser.parse_args()
    print(f"# python benchmarks/synthesis.py {' '.join(sys.argv[1:])}")

    from hf_pds import PDSPipeline
    from hf_pds.embedding import embed_images, embed_texts
    from hf_pds.synthesis import prototype_seed, synthesize
    from hf_pds.testing import real_size_pds_components, tiny_pds_components

    dtype = getattr(torch, args.dtype)
    components = real_size_pds_components() if args.size == "real" else tiny_pds_components()
    pipe = PDSPipeline(**components).to(args.device)
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    decoder = pipe.make_decoder(num_inference_steps=args.steps)
    unclip = decoder.pipeline
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device: {device_name}, torch threads: {torch.get_num_threads()}, size: {args.size}, dtype: {args.dtype}")

    width = pipe.image_encoder.config.projection_dim
    rng = np.random.default_rng(0)
    embeds = rng.normal(size=(args.images, width)).astype(np.float32)
    prompts = [f"a photo of a thing number {index} on a table" for index in range(args.images)]
    seeds = [prototype_seed(42, index) for index in range(args.images)]
    settings = {"output_size": 224}

    # Warm-up (kernel selection, allocator), then the two ways, same prototypes, same settings.
    synthesize(decoder, embeds[:2], prompts[:2], seeds[:2], batch_size=2, batch_invariant=False, **settings)
    synchronize(args.device)
    started = time.perf_counter()
    reference_loop(
        unclip,
        torch.as_tensor(embeds, dtype=dtype, device=args.device),
        prompts,
        args.steps,
        torch.Generator("cpu").manual_seed(42),
    )
    synchronize(args.device)
    reference = args.images / (time.perf_counter() - started)
    started = time.perf_counter()
    synthesize(decoder, embeds, prompts, seeds, batch_size=args.batch_size, batch_invariant=False, **settings)
    synchronize(args.device)
    batched = args.images / (time.perf_counter() - started)

    size = pipe.feature_extractor.crop_size["height"]
    pictures = [PIL.Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(args.embed)]
    towers = pipe.towers
    batches = [towers.pixels(pictures[start : start + 64]) for start in range(0, len(pictures), 64)]
    embed_images(batches[:1], towers, args.device, total=None, progress=False)
    synchronize(args.device)
    started = time.perf_counter()
    embed_images(batches, towers, args.device, total=None, progress=False)
    synchronize(args.device)
    images_per_second = args.embed / (time.perf_counter() - started)
    captions = [
        [prompts[index % len(prompts)] for index in range(start, start + 256)] for start in range(0, args.embed, 256)
    ]
    started = time.perf_counter()
    embed_texts(captions, towers, args.device, progress=False)
    synchronize(args.device)
    captions_per_second = sum(map(len, captions)) / (time.perf_counter() - started)

    print("| what | throughput |")
    print("|---|---|")
    print(f"| synthesis, reference (1 per call), {args.steps} steps | {reference:.2f} images/s |")
    print(f"| synthesis, hf-pds (batch {args.batch_size}), {args.steps} steps | {batched:.2f} images/s |")
    print(f"| synthesis speed-up | {batched / reference:.2f}x |")
    print(f"| CLIP image embedding | {images_per_second:.1f} images/s |")
    print(f"| CLIP text embedding | {captions_per_second:.1f} captions/s |")


if __name__ == "__main__":
    main()
