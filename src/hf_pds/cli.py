"""Command line: ``hf-pds distill``, ``hf-pds push`` and ``hf-pds evaluate``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .synthesis import DEFAULT_GUIDANCE_SCALE, DEFAULT_NEGATIVE_PROMPT, DEFAULT_NOISE_LEVEL

DEMO_OUTPUT = "pds-digits-demo"
# The embedded demo decodes with tiny random weights: fewer steps keep it under a minute on a laptop.
DEMO_SETTINGS = {"budget": 10, "num_inference_steps": 25}
DEFAULT_SETTINGS = {"budget": 100, "num_inference_steps": 100}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-pds", description="Multimodal dataset distillation with PDS.")
    commands = parser.add_subparsers(dest="command", required=True)
    distill = commands.add_parser(
        "distill",
        help="distill an image-caption dataset into a few synthetic pairs",
        description=(
            "Distill an image-caption dataset into BUDGET synthetic pairs and save them as a Hub-layout folder. "
            "With no --dataset, distills scikit-learn's bundled digits with a tiny randomly initialised "
            "pipeline: no network, a demonstration of the mechanics, not of image quality."
        ),
    )
    source = distill.add_argument_group("source")
    source.add_argument("--dataset", help="Hub dataset id or local folder (default: the embedded digits demo)")
    source.add_argument("--split", default="train", help="split to distill (default: train)")
    source.add_argument("--image-column", default="image", help="column of images (default: image)")
    source.add_argument("--caption-column", default="caption", help="column of captions (default: caption)")
    source.add_argument(
        "--skip-invalid-rows", action="store_true", help="leave out rows with no image or an empty caption"
    )
    source.add_argument(
        "--streaming", action="store_true", help="read the dataset as a stream, one batch of images at a time"
    )
    method = distill.add_argument_group("method")
    method.add_argument("--budget", type=int, help="number of distilled pairs (default: 100; demo: 10)")
    method.add_argument("--prune-ratio", type=float, default=0.2, help="fraction of pairs pruned (default: 0.2)")
    method.add_argument("--normalize", action="store_true", help="cluster L2-normalised embeddings")
    method.add_argument("--seed", type=int, default=42, help="run seed (default: 42)")
    method.add_argument(
        "--kmeans-backend",
        choices=("auto", "sklearn", "fast", "faiss"),
        default="auto",
        help="k-means: sklearn (the reference's MiniBatchKMeans call), fast (the same, seeded faster), faiss "
        "(Lloyd); auto (the default): faiss when installed, else fast",
    )
    generation = distill.add_argument_group("generation")
    generation.add_argument(
        "--pipeline",
        help="PDSPipeline folder or unCLIP checkpoint (default: stabilityai/stable-diffusion-2-1-unclip-small; "
        "demo: tiny random pipeline)",
    )
    generation.add_argument("--clip-model", help="CLIP model of the text tower when the checkpoint has none")
    generation.add_argument("--num-inference-steps", type=int, help="denoising steps (default: 100; demo: 25)")
    generation.add_argument(
        "--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE, help="guidance scale (default: 5)"
    )
    generation.add_argument(
        "--noise-level",
        type=int,
        default=DEFAULT_NOISE_LEVEL,
        help="image-embedding noise level (default: 10)",
    )
    generation.add_argument("--negative-prompt", default=DEFAULT_NEGATIVE_PROMPT, help="negative prompt")
    generation.add_argument("--output-size", type=int, default=224, help="side of the output images (default: 224)")
    generation.add_argument("--batch-size", type=int, default=8, help="prototypes decoded at once (default: 8)")
    runtime = distill.add_argument_group("runtime")
    runtime.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    runtime.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        help="model dtype (default: float16 on cuda, else float32)",
    )
    runtime.add_argument(
        "--output",
        help=f"output folder (default: {DEMO_OUTPUT} for the demo). A run that stops is resumed by the same "
        "command: finished images are kept in .OUTPUT.pds-run beside it until the folder is written",
    )
    runtime.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    runtime.add_argument(
        "--fresh", action="store_true", help="discard an interrupted run into --output instead of resuming it"
    )
    runtime.add_argument(
        "--cache-dir",
        help="embedding cache (default: $HF_PDS_CACHE or ~/.cache/huggingface/hf_pds/embeddings)",
    )
    runtime.add_argument("--no-cache", action="store_true", help="neither read nor write the embedding cache")

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

    add_evaluate_parser(commands)
    return parser


def load_source_dataset(name: str, split: str, streaming: bool = False):
    """A split of a Hub dataset or of a local folder (Hub layout, data files, or ``save_to_disk``)."""
    import datasets

    path = Path(name)
    if streaming:
        return datasets.load_dataset(name, split=split, streaming=True)
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{name} has no split {split!r}; its splits are {list(loaded)}.")
            return loaded[split]
        return loaded
    return datasets.load_dataset(name, split=split)


def _distill(args: argparse.Namespace) -> Path:
    import torch

    from .distributed import process_state

    demo = args.dataset is None
    defaults = DEMO_SETTINGS if demo else DEFAULT_SETTINGS
    budget = args.budget if args.budget is not None else defaults["budget"]
    steps = args.num_inference_steps if args.num_inference_steps is not None else defaults["num_inference_steps"]
    if args.output is None and not demo:
        raise ValueError("--output is required with --dataset.")
    output = Path(args.output or DEMO_OUTPUT)
    if output.exists() and not args.overwrite:
        raise FileExistsError(f"{output} already exists; pass --overwrite to replace it.")
    state = process_state()
    say = print if state.is_main_process else (lambda *_: None)
    if state.num_processes > 1:
        say(f"processes: {state.num_processes}")
    device = args.device or (str(state.device) if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("float16" if device.startswith("cuda") else "float32"))

    if demo:
        from .testing import digits_dataset

        say("No --dataset given: distilling the embedded digits demo (1797 scans, 3 captions each).")
        dataset = digits_dataset()
        provenance = {"source_dataset": "scikit-learn digits (embedded demo)", "source_license": "bsd-3-clause"}
    else:
        dataset = load_source_dataset(args.dataset, args.split, args.streaming)
        provenance = {"source_dataset": args.dataset, "source_split": args.split}

    from .pipeline_pds import DEFAULT_CHECKPOINT, PDSPipeline

    if demo and args.pipeline is None:
        from .testing import tiny_pds_pipeline

        say("Using the tiny pipeline with random weights: the images show the mechanics, not quality.")
        provenance["notes"] = [
            "Made by the offline demo with tiny, randomly initialised models: the images are noise. "
            "They show the mechanics of PDS, not its quality."
        ]
        pipeline = tiny_pds_pipeline()
        if dtype != torch.float32:
            pipeline = pipeline.to(dtype=dtype)
    else:
        pipeline = PDSPipeline.from_pretrained(
            args.pipeline or DEFAULT_CHECKPOINT, clip_model_name_or_path=args.clip_model, dtype=dtype
        )
    pipeline = pipeline.to(device)
    pipeline.set_progress_bar_config(disable=False)

    started = time.perf_counter()
    result = pipeline(
        dataset,
        budget=budget,
        image_column=args.image_column,
        caption_column=args.caption_column,
        prune_ratio=args.prune_ratio,
        normalize=args.normalize,
        num_inference_steps=steps,
        guidance_scale=args.guidance_scale,
        noise_level=args.noise_level,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        output_size=args.output_size,
        batch_size=args.batch_size,
        skip_invalid_rows=args.skip_invalid_rows,
        kmeans_backend=args.kmeans_backend,
        output_dir=output,
        overwrite=args.overwrite,
        fresh=args.fresh,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        provenance=provenance,
    )
    say(
        f"Distilled {result.settings['source_captions']} pairs ({result.settings['source_images']} images) into "
        f"{len(result.dataset)} synthetic pairs in {time.perf_counter() - started:.1f} s."
    )
    folder = output.resolve()
    say(f"Saved to {folder}  (load it with datasets.load_dataset({str(folder)!r}))")
    return folder


def _push(args: argparse.Namespace) -> str:
    from .distilled import push_folder

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
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("hf_pds").setLevel(logging.INFO)  # the stages' one-line summaries
    try:
        if args.command == "distill":
            _distill(args)
        elif args.command == "push":
            _push(args)
        elif args.command == "evaluate":
            from .evaluation.cli import run_evaluate

            return run_evaluate(args)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError, ConnectionError, PermissionError) as error:
        print(f"hf-pds {args.command}: error: {error}", file=sys.stderr)
        return 2
    finally:
        _end_process_group()
    return 0


def _end_process_group() -> None:
    """Leave a torchrun / accelerate process group cleanly: gloo aborts at exit otherwise."""
    if "torch" not in sys.modules:  # nothing was distributed (e.g. hf-pds push)
        return
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
