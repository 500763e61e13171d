"""``PDSPipeline``: distill an image-caption dataset into a few synthetic pairs (PDS, ICLR 2026)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from typing import TYPE_CHECKING

import torch
from datasets import IterableDataset
from diffusers import AutoencoderKL, DiffusionPipeline, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
from diffusers.schedulers import KarrasDiffusionSchedulers
from tqdm.auto import tqdm
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from .cache import EmbeddingCache, cache_key, towers_description, weights_fingerprint
from .distilled import PDSPipelineOutput, build_distilled_dataset
from .distributed import barrier, broadcast, gather_dicts, process_state
from .embedding import check_columns, collect_captions, embed_dataset, embed_stream
from .prototypes import check_budget, extract_prototypes, resolve_kmeans_backend
from .run_state import RunState
from .synthesis import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_NOISE_LEVEL,
    DEFAULT_NUM_INFERENCE_STEPS,
    DEFAULT_OUTPUT_SIZE,
    check_generation_settings,
    prototype_seed,
    synthesize,
)

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = "stabilityai/stable-diffusion-2-1-unclip-small"

# The CLIP model whose text tower matches each unCLIP image encoder, keyed by the vision tower's
# (hidden_size, projection_dim, patch_size).
KNOWN_CLIP_MODELS = {
    (1024, 768, 14): "openai/clip-vit-large-patch14",  # stable-diffusion-2-1-unclip-small
    (1280, 1024, 14): "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",  # stable-diffusion-2-1-unclip
}

_UNCLIP_COMPONENTS = (
    "feature_extractor",
    "image_encoder",
    "image_normalizer",
    "image_noising_scheduler",
    "tokenizer",
    "text_encoder",
    "unet",
    "scheduler",
    "vae",
)


class PDSPipeline(DiffusionPipeline):
    r"""
    Prototype-guided data synthesis: turn an image-caption dataset into ``budget`` synthetic pairs.

    PDS is learning-free. It embeds every image and caption with CLIP, drops the least aligned pairs,
    clusters the image and the text embeddings separately, matches image to text clusters by overlap,
    averages each matched cluster pair into an image and a text prototype, and decodes each image
    prototype with unCLIP, prompted by the training caption closest to its text prototype.

    The unCLIP image encoder embeds the images for clustering, so that prototypes live in the space the
    decoder is conditioned on; ``clip_text_encoder`` is the text tower of the same CLIP model.

    Args:
        feature_extractor ([`~transformers.CLIPImageProcessor`]): pre-processing of the CLIP image encoder.
        image_encoder ([`~transformers.CLIPVisionModelWithProjection`]): CLIP image tower (unCLIP's).
        image_normalizer ([`StableUnCLIPImageNormalizer`]): unCLIP's image-embedding normaliser.
        image_noising_scheduler ([`KarrasDiffusionSchedulers`]): noise schedule of the image embedding.
        tokenizer ([`~transformers.CLIPTokenizer`]): tokenizer of unCLIP's prompt encoder.
        text_encoder ([`~transformers.CLIPTextModel`]): unCLIP's prompt encoder (cross-attention).
        unet ([`UNet2DConditionModel`]): unCLIP's denoiser.
        scheduler ([`KarrasDiffusionSchedulers`]): the denoising scheduler.
        vae ([`AutoencoderKL`]): decodes latents to images.
        clip_tokenizer ([`~transformers.CLIPTokenizer`]): tokenizer of ``clip_text_encoder``.
        clip_text_encoder ([`~transformers.CLIPTextModelWithProjection`]): CLIP text tower with projection
            matching ``image_encoder``; embeds the captions.
    """

    model_cpu_offload_seq = "image_encoder->clip_text_encoder->text_encoder->unet->vae"
    _exclude_from_cpu_offload = ["image_normalizer"]
    # A plain unCLIP checkpoint has no CLIP text tower: from_pretrained loads the matching one.
    _optional_components = ["clip_tokenizer", "clip_text_encoder"]

    def __init__(
        self,
        feature_extractor: CLIPImageProcessor,
        image_encoder: CLIPVisionModelWithProjection,
        image_normalizer: StableUnCLIPImageNormalizer,
        image_noising_scheduler: KarrasDiffusionSchedulers,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextModel,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        vae: AutoencoderKL,
        clip_tokenizer: CLIPTokenizer | None = None,
        clip_text_encoder: CLIPTextModelWithProjection | None = None,
    ):
        super().__init__()
        self.register_modules(
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            image_normalizer=image_normalizer,
            image_noising_scheduler=image_noising_scheduler,
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            unet=unet,
            scheduler=scheduler,
            vae=vae,
            clip_tokenizer=clip_tokenizer,
            clip_text_encoder=clip_text_encoder,
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        clip_model_name_or_path: str | os.PathLike | None = None,
        **kwargs,
    ) -> PDSPipeline:
        r"""
        Load a PDS pipeline from a saved ``PDSPipeline`` folder or from a stable unCLIP checkpoint.

        Args:
            pretrained_model_name_or_path: Hub id or local folder. A plain unCLIP checkpoint such as
                ``stabilityai/stable-diffusion-2-1-unclip-small`` works: its CLIP text tower is loaded from
                ``clip_model_name_or_path``.
            clip_model_name_or_path: CLIP model whose ``CLIPTextModelWithProjection`` and tokenizer embed the
                captions, used when the checkpoint has none. Defaults to the CLIP model of the checkpoint's image
                encoder (``openai/clip-vit-large-patch14`` for the ``-small`` checkpoint).
            **kwargs: passed to [`DiffusionPipeline.from_pretrained`] (``dtype``, ``revision``, ...); ``dtype``,
                ``cache_dir``, ``local_files_only`` and ``token`` also apply to the CLIP text tower.
        """
        pipeline = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if pipeline.clip_text_encoder is None or pipeline.clip_tokenizer is None:
            name = clip_model_name_or_path or matching_clip_model(pipeline.image_encoder.config)
            loading = {key: kwargs[key] for key in ("cache_dir", "local_files_only", "token") if key in kwargs}
            dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
            clip_text_encoder = CLIPTextModelWithProjection.from_pretrained(name, dtype=dtype, **loading)
            clip_tokenizer = CLIPTokenizer.from_pretrained(name, **loading)
            pipeline.register_modules(clip_text_encoder=clip_text_encoder, clip_tokenizer=clip_tokenizer)
        pipeline.check_components()
        return pipeline

    def check_components(self) -> None:
        """Raise ``ValueError`` unless the CLIP towers and the decoder share one embedding space."""
        if self.clip_text_encoder is None or self.clip_tokenizer is None:
            raise ValueError("PDSPipeline needs clip_text_encoder and clip_tokenizer to embed the captions.")
        image_dim = self.image_encoder.config.projection_dim
        text_dim = self.clip_text_encoder.config.projection_dim
        if image_dim != text_dim:
            raise ValueError(
                f"clip_text_encoder projects to {text_dim} dimensions but image_encoder to {image_dim}: "
                "they must be the two towers of one CLIP model."
            )
        normalizer_dim = self.image_normalizer.mean.shape[-1]
        if normalizer_dim != image_dim:
            raise ValueError(
                f"image_normalizer expects {normalizer_dim}-d image embeddings but image_encoder makes {image_dim}-d."
            )

    def unclip_pipeline(self) -> StableUnCLIPImg2ImgPipeline:
        """A ``StableUnCLIPImg2ImgPipeline`` sharing this pipeline's unCLIP components (no copy)."""
        unclip = StableUnCLIPImg2ImgPipeline(**{name: getattr(self, name) for name in _UNCLIP_COMPONENTS})
        unclip.set_progress_bar_config(disable=True)
        return unclip

    @torch.no_grad()
    def __call__(
        self,
        dataset: datasets.Dataset,
        budget: int,
        image_column: str = "image",
        caption_column: str = "caption",
        *,
        prune_ratio: float = 0.2,
        normalize: bool = False,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        noise_level: int = DEFAULT_NOISE_LEVEL,
        negative_prompt: str | None = DEFAULT_NEGATIVE_PROMPT,
        generator: torch.Generator | None = None,
        seed: int = 42,
        output_size: int | None = DEFAULT_OUTPUT_SIZE,
        batch_size: int = 8,
        embedding_batch_size: int = 64,
        skip_invalid_rows: bool = False,
        kmeans_backend: str | None = "auto",
        output_dir: str | os.PathLike | None = None,
        overwrite: bool = False,
        fresh: bool = False,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        provenance: dict | None = None,
        return_dict: bool = True,
    ) -> PDSPipelineOutput | tuple:
        r"""
        Distill ``dataset`` into ``budget`` synthetic image-caption pairs.

        Args:
            dataset (`datasets.Dataset` or `datasets.IterableDataset`): one row per image; the caption column
                holds a string or a list of strings (several captions per image, as Flickr30k and COCO). A stream
                is read once, one batch of images at a time; its rows are checked as they arrive and the budget
                once it is read.
            budget (`int`): number of distilled pairs (k-means K).
            image_column (`str`, defaults to `"image"`): column of images (``datasets.Image`` or paths).
            caption_column (`str`, defaults to `"caption"`): column of captions.
            prune_ratio (`float`, defaults to 0.2): fraction of pairs with the lowest image-text cosine dropped
                before clustering.
            normalize (`bool`, defaults to `False`): cluster L2-normalised embeddings (prototypes stay raw means).
            num_inference_steps (`int`, defaults to 100): denoising steps of unCLIP.
            guidance_scale (`float`, defaults to 5.0): classifier-free guidance scale; <= 1 turns it off.
            noise_level (`int`, defaults to 10): noise added to the image prototype before conditioning.
            negative_prompt (`str`, defaults to `"text, watermark"`): negative prompt of every image.
            generator (`torch.Generator`, *optional*): draws the run seed when given (instead of ``seed``).
            seed (`int`, defaults to 42): run seed: k-means ``random_state`` and the source of each prototype's
                own generation seed.
            output_size (`int`, defaults to 224): side of the square output images (LANCZOS); None keeps the
                decoder's size.
            batch_size (`int`, defaults to 8): prototypes decoded at once on an accelerator (one at a time on a CPU,
                where images are then bit-identical for any batch size).
            embedding_batch_size (`int`, defaults to 64): images or captions per CLIP forward pass.
            skip_invalid_rows (`bool`, defaults to `False`): leave out rows with a missing image or an empty
                caption (with a warning) instead of raising.
            kmeans_backend (`str`, defaults to `"auto"`): `"sklearn"` (the reference's MiniBatchKMeans call),
                `"fast"` (the same MiniBatchKMeans with a faster k-means++ seeding), `"faiss"` (Lloyd iterations;
                `pip install hf-pds[faiss]`), or `"auto"`: faiss when installed, else fast. The choice is logged
                and written into the card.
            output_dir (`str`, *optional*): also save the distilled set there, as a Hub-layout folder, and make the
                run resumable: images are kept as they are made in a work folder beside it, and the same call after
                an interruption (even SIGKILL) makes only the missing ones. The folder appears when complete.
            overwrite (`bool`, defaults to `False`): replace an existing `output_dir`.
            fresh (`bool`, defaults to `False`): discard an interrupted run into `output_dir` instead of resuming it
                (resuming with other arguments is refused).
            cache_dir (`str`, *optional*): embedding cache folder; defaults to `$HF_PDS_CACHE` or
                `~/.cache/huggingface/hf_pds/embeddings`. Distilling the same dataset again (another budget, other
                generation settings) then runs no CLIP forward pass.
            use_cache (`bool`, defaults to `True`): read and write the embedding cache (map-style datasets only).
            provenance (`dict`, *optional*): entries that override the card's provenance, e.g.
                `{"source_dataset": "org/name"}`.
            return_dict (`bool`, defaults to `True`): return a [`PDSPipelineOutput`] instead of a tuple.

        Returns:
            [`PDSPipelineOutput`] with the distilled ``dataset`` and its ``prototypes``, or the tuple
            ``(dataset, prototypes)``.
        """
        # 1. Check inputs, before any model runs (a stream's rows are checked as they arrive).
        self.check_components()
        check_generation_settings(
            num_inference_steps,
            guidance_scale,
            noise_level,
            self.image_noising_scheduler.config.num_train_timesteps,
            output_size,
            batch_size,
        )
        check_columns(dataset, image_column, caption_column)
        table = (
            None
            if isinstance(dataset, IterableDataset)
            else collect_captions(dataset, image_column, caption_column, skip_invalid_rows)
        )
        kmeans_backend = resolve_kmeans_backend(kmeans_backend)
        check_budget(budget, table and len(table.captions), prune_ratio, n_images=table and len(table.rows))
        if generator is not None:
            seed = int(torch.randint(0, 2**32 - 1, (1,), generator=generator, device=generator.device))
        state = process_state()
        settings = {
            "budget": budget,
            "prune_ratio": prune_ratio,
            "normalize": normalize,
            "seed": seed,
            "kmeans_backend": kmeans_backend,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "noise_level": noise_level,
            "negative_prompt": negative_prompt,
            "output_size": output_size,
            "batch_size": batch_size,
        }
        run = None
        if output_dir is not None:
            run = self._start_run(output_dir, dataset, settings, image_column, caption_column, overwrite, fresh, state)
        resumed = run.load_prototypes() if run is not None else None
        logger.info("Distilling on %d process(es); k-means backend: %s.", state.num_processes, kmeans_backend)

        if resumed is None:
            # 2. Embed every image once and every caption with CLIP (or read them from the cache).
            started = time.perf_counter()
            cache = EmbeddingCache(cache_dir) if use_cache and table is not None else None
            embeddings = self._embed(
                dataset, table, image_column, caption_column, skip_invalid_rows, embedding_batch_size, cache, state
            )
            if table is None:  # a stream's size is known only now
                check_budget(budget, len(embeddings.captions), prune_ratio, n_images=len(embeddings.rows))
            logger.info(
                "Embeddings of %d images and %d captions ready in %.1f s.",
                len(embeddings.image_embeds),
                len(embeddings.text_embeds),
                time.perf_counter() - started,
            )

            # 3. Prune, cluster, match: the prototypes, computed once and shared.
            started = time.perf_counter()
            prototypes = None
            if state.is_main_process:
                prototypes = extract_prototypes(
                    embeddings.image_embeds,
                    embeddings.text_embeds,
                    embeddings.caption_image,
                    budget=budget,
                    prune_ratio=prune_ratio,
                    normalize=normalize,
                    seed=seed,
                    kmeans_backend=kmeans_backend,
                )
            prototypes = broadcast(prototypes, state)
            prompts = [embeddings.captions[index] for index in prototypes.caption_index]
            sizes = {
                "source_images": len(embeddings.image_embeds),
                "source_captions": len(embeddings.text_embeds),
                "skipped_rows": len(embeddings.skipped_rows),
            }
            if run is not None and state.is_main_process:
                run.save_prototypes(prototypes, prompts, sizes)
            logger.info("Extracted %d prototypes in %.1f s.", len(prototypes), time.perf_counter() - started)
        else:
            prototypes, prompts, sizes = resumed
            logger.info(
                "Resuming %s: its %d prototypes and %d finished images are kept.",
                run.folder,
                len(prototypes),
                run.images.count(),
            )

        # 4. Decode each image prototype, prompted by its retrieved caption, with its own seed.
        started = time.perf_counter()
        seeds = [prototype_seed(seed, index) for index in range(len(prototypes))]
        bar_config = {
            "desc": "Generating images",
            **self._progress_bar_config,
            **({} if self._shows_progress(state) else {"disable": True}),
        }
        with tqdm(total=len(prototypes), **bar_config) as bar:
            made = synthesize(
                self.unclip_pipeline(),
                prototypes.image_prototypes,
                prompts,
                seeds,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                noise_level=noise_level,
                negative_prompt=negative_prompt,
                output_size=output_size,
                batch_size=batch_size,
                store=run.images if run is not None else None,
                state=state,
                progress=bar,
            )
        images = gather_dicts(made, state)
        logger.info("Generated %d images in %.1f s.", len(images), time.perf_counter() - started)
        self.maybe_free_model_hooks()

        # 5. The distilled set; with output_dir, its folder, written by the main process.
        distilled = build_distilled_dataset([images[index] for index in range(len(prototypes))], prototypes, prompts)
        output = PDSPipelineOutput(
            dataset=distilled,
            prototypes=prototypes,
            settings={**settings, **sizes},
            provenance={**self.provenance(dataset), **(provenance or {})},
        )
        if run is not None:
            if state.is_main_process:
                output.save(run.output_dir, overwrite=overwrite)
                run.finish()
            barrier(state)
        if not return_dict:
            return distilled, prototypes
        return output

    def _start_run(self, output_dir, dataset, settings, image_column, caption_column, overwrite, fresh, state):
        """The run state of ``output_dir``: started, or resumed when an interrupted run left one."""
        run = RunState(output_dir)
        if run.output_dir.exists() and not overwrite:
            raise FileExistsError(
                f"{run.output_dir} already exists; pass overwrite=True (CLI: --overwrite) to replace it."
            )
        arguments = {
            **settings,
            "dataset": getattr(dataset, "_fingerprint", None),
            "image_column": image_column,
            "caption_column": caption_column,
            "models": self.weights_fingerprint(),
        }
        if state.is_main_process:
            run.start(arguments, fresh=fresh)
        barrier(state)
        if not state.is_main_process:
            run.start(arguments)
        return run

    def _embed(self, dataset, table, image_column, caption_column, skip_invalid_rows, batch_size, cache, state):
        """Step 2: embeddings from the cache, or computed (shared between processes) and cached."""
        towers = (self.image_encoder, self.feature_extractor, self.clip_text_encoder, self.clip_tokenizer)
        progress = self._shows_progress(state)
        device = self._execution_device
        if table is None:
            # A stream is read once, by the main process.
            embeddings = None
            if state.is_main_process:
                embeddings = embed_stream(
                    dataset,
                    image_column,
                    caption_column,
                    *towers,
                    device,
                    batch_size=batch_size,
                    skip_invalid_rows=skip_invalid_rows,
                    progress=progress,
                )
            return broadcast(embeddings, state)
        if cache is not None:
            description = {
                "dataset": dataset._fingerprint,
                "image_column": image_column,
                "caption_column": caption_column,
                "skip_invalid_rows": skip_invalid_rows,
                "towers": towers_description(*towers),
            }
            key = cache_key(description)
            cached = broadcast(cache.load(key) if state.is_main_process else None, state)
            if cached is not None:
                return cached
        embeddings = embed_dataset(
            dataset, table, image_column, *towers, device, batch_size=batch_size, progress=progress, state=state
        )
        if cache is not None and state.is_main_process:
            cache.save(key, embeddings, description)
        return embeddings

    def _shows_progress(self, state) -> bool:
        """Progress bars: as configured, and from the main process only."""
        return not self._progress_bar_config.get("disable", False) and state.is_main_process

    def weights_fingerprint(self) -> str:
        """A hash of every model component's class, config and a sample of its weights."""
        digest = hashlib.sha256()
        for name, component in sorted(self.components.items()):
            if isinstance(component, torch.nn.Module):
                digest.update(f"{name}{type(component).__name__}".encode())
                digest.update(weights_fingerprint(component).encode())
        return digest.hexdigest()

    def provenance(self, dataset: datasets.Dataset) -> dict:
        """Where a distilled set comes from: the source dataset and the models, with revisions when known."""
        from . import __version__

        unet_path = getattr(self.unet.config, "_name_or_path", "") or ""
        clip_config = self.clip_text_encoder.config
        return {
            "source_dataset": dataset.info.dataset_name or None,
            "source_config": dataset.info.config_name or None,
            "source_split": str(dataset.split) if dataset.split is not None else None,
            "source_fingerprint": getattr(dataset, "_fingerprint", None) or "unknown (streamed)",
            "source_license": dataset.info.license or None,
            "unclip_checkpoint": self.name_or_path or "unknown",
            "unclip_revision": snapshot_revision(unet_path),
            "clip_model": clip_config.name_or_path or "unknown",
            "clip_revision": getattr(clip_config, "_commit_hash", None) or snapshot_revision(clip_config.name_or_path),
            "hf_pds_version": __version__,
        }


def snapshot_revision(path: str | None) -> str | None:
    """The commit of a Hub cache snapshot path (``.../snapshots/<commit>/...``), if it is one."""
    match = re.search(r"snapshots/([0-9a-f]{40})", path or "")
    return match.group(1) if match else None


def matching_clip_model(vision_config) -> str:
    """The CLIP model whose text tower matches an unCLIP image encoder, from its config."""
    key = (vision_config.hidden_size, vision_config.projection_dim, vision_config.patch_size)
    if key not in KNOWN_CLIP_MODELS:
        raise ValueError(
            "This checkpoint has no CLIP text tower and its image encoder "
            f"(hidden_size={key[0]}, projection_dim={key[1]}, patch_size={key[2]}) is not one hf-pds knows: "
            "pass clip_model_name_or_path=<the CLIP model of the image encoder>."
        )
    return KNOWN_CLIP_MODELS[key]
