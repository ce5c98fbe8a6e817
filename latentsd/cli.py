"""The `latentsd` command. Each subcommand parses its arguments and calls one library function.

A user error (bad value, path or file, missing extra, failed hub lookup) is one line on stderr,
`latentsd COMMAND: error: ...`, and exit status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import math
import sys

from .paths import expand


def _generate(args) -> None:
    from .generate import add_lora_and_embeddings, generate_to_file, load_init_images, load_pipeline

    images = load_init_images(args.init_image, args.mask, args.strength)  # read before the model loads
    pipe = load_pipeline(args.model, scheduler=args.scheduler, device=args.device, allow_pickle=args.allow_pickle)
    for token in add_lora_and_embeddings(pipe, args.lora, args.lora_scale, args.embedding, args.embedding_token):
        print(f"loaded embedding {token!r}: use it in the prompt")
    if args.fast:
        from .fast import cache_location

        print(f"--fast: compiling the denoising step at first use (tens of seconds on CPU; kept in "
              f"{cache_location()} for later runs)")
    out = generate_to_file(pipe, args.prompt, args.out, negative_prompt=args.negative_prompt, steps=args.steps,
                           guidance=args.guidance, seed=args.seed, num_images=args.num_images,
                           height=args.height, width=args.width, eta=args.eta,
                           long_prompts=args.long_prompts, prompt_weighting=args.prompt_weighting,
                           fast=args.fast, **images)
    print(f"saved {args.num_images} image(s) for {args.prompt!r} to {out}")


def _export_single_file(args) -> None:
    from .single_file import save_single_file

    out = save_single_file(args.model, args.out, dtype=args.dtype)
    print(f"wrote {args.model} as one {args.dtype} LDM-layout file (A1111 / ComfyUI) to {out}")


def _init_model(args) -> None:
    from .models import build_components
    from .pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline(**build_components(args.config, seed=args.seed).as_dict())
    pipe.save_pretrained(args.out)
    print(f"saved a randomly initialised {args.config!r} model to {args.out}")


def _train(args) -> None:
    from .config import load_config
    from .training.trainer import train

    train(load_config(args.config, args.overrides))


def _train_vae(args) -> None:
    from .training.vae import load_vae_config, train_vae

    train_vae(load_vae_config(args.config, args.overrides))


def _estimate(args) -> None:
    from .config import load_config
    from .training.estimate import run_estimate

    print(run_estimate(load_config(args.config, args.overrides), memory=args.memory, processes=args.processes))


def _demo(args) -> None:
    from .demo import run_demo

    report = run_demo(args.out, steps=args.steps, seed=args.seed)
    print(f"\ndemo finished in {report['wall_seconds']} s; everything is in {args.out}:")
    print(f"  report   {args.out}/report.md (adherence before/after, old and new prompts)")
    print(f"  grids    {args.out}/before.png  {args.out}/after.png")
    print(f"  model    {report['model']}  (latentsd generate \"a red star on the left\" --model {report['model']})")


def _eval_shapes(args) -> None:
    import json

    from .demo import evaluate_shapes_model

    result = evaluate_shapes_model(args.model, args.out, seeds=range(args.seeds), steps=args.steps,
                                   guidance=args.guidance)
    print(json.dumps({g: {k: round(v, 4) for k, v in r.items()} for g, r in result.items()}))


def _make_shapes(args) -> None:
    from .data.shapes import HELD_OUT, all_specs, make_shapes_dataset, write_imagefolder

    specs = all_specs(shapes=args.shapes) if args.shapes else None
    data = make_shapes_dataset(args.n, seed=args.seed, size=args.size, specs=specs,
                               exclude=HELD_OUT if args.hold_out else None)
    out = write_imagefolder(data, args.out)
    print(f"wrote {len(data)} images with captions to {out} (imagefolder + metadata.jsonl)")


def _score_shapes(args) -> None:
    import json

    from .data.shapes import score_path

    result = score_path(args.path)
    records = result.pop("records")
    if args.details:
        for r in records:
            print(json.dumps(r))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


DEBUG_HELP = "show the full traceback of an error instead of one line"


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=expand, help="training YAML, or the name of a shipped one (tiny, sd15_finetune, ...)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. max_steps=100 optim.learning_rate=1e-4 data.dataset=DIR")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentsd", description=__doc__)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="generate images from a prompt with a model folder or hub id")
    p.add_argument("prompt")
    p.add_argument("--model", required=True, type=expand,
                   help="diffusers-layout model folder or hub id, or an SD-1/2 single file (A1111 .safetensors)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load pickled weights: a .ckpt/.pt single file, or a folder's .bin files (read with "
                        "torch.load(weights_only=True)); trusted files only")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=positive_int, default=50, help="denoising steps (default 50)")
    p.add_argument("--guidance", type=finite_float, default=7.5, help="classifier-free guidance scale; 1 disables it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=positive_int, default=1, help="images for the prompt; >1 writes a grid")
    p.add_argument("--height", type=image_side, default=None, help="pixels, a multiple of 8 (default: the model's native size)")
    p.add_argument("--width", type=image_side, default=None, help="pixels, a multiple of 8 (default: the model's native size)")
    p.add_argument("--scheduler", default="model", metavar="NAME",
                   help="sampler: 'model' (the folder's own, default) or an A1111 name, e.g. Euler, 'Euler a', "
                        "'DPM++ 2M Karras', UniPC, Heun, LMS, DDIM, DDPM, PNDM (any case; '_' for spaces works)")
    p.add_argument("--lora", default=None, type=expand, metavar="PATH",
                   help="LoRA weights: a diffusers/PEFT folder or .safetensors, or a kohya/A1111 .safetensors")
    p.add_argument("--lora-scale", type=finite_float, default=1.0, help="LoRA strength (default 1; 0 = no effect)")
    p.add_argument("--embedding", action="append", default=[], type=expand, metavar="PATH",
                   help="textual-inversion embedding (diffusers or A1111 file); repeat for several")
    p.add_argument("--embedding-token", action="append", default=[], metavar="TOKEN",
                   help="the token for each --embedding (default: the file's own; A1111 files: the file name)")
    p.add_argument("--long-prompts", action="store_true",
                   help="encode prompts longer than 77 tokens in 75-token chunks (default: truncate, as diffusers)")
    p.add_argument("--prompt-weighting", action="store_true",
                   help="A1111 weights: (word:1.3), (word) x1.1, [word] /1.1, \\( \\) for literal brackets, BREAK")
    p.add_argument("--init-image", default=None, type=expand, metavar="PATH",
                   help="image-to-image: start from this image (the output takes its size unless --height/--width)")
    p.add_argument("--strength", type=unit_float, default=None, metavar="S",
                   help="with --init-image: how much to change it, 0..1 (default 0.8; 1 with --mask)")
    p.add_argument("--mask", default=None, type=expand, metavar="PATH",
                   help="with --init-image: inpaint where this mask is white (plain or 9-channel inpainting UNets)")
    p.add_argument("--eta", type=finite_float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--fast", action="store_true",
                   help="compile the denoising step (pipe.optimize()): faster steps after a one-time compile "
                        "(tens of seconds on CPU, cached for later runs); images equal the default within ~1e-5")
    p.add_argument("--out", default="out.png", type=expand, help="output PNG (a .json sidecar lists the prompts)")
    p.set_defaults(run=_generate)

    p = sub.add_parser("train", help="train or fine-tune from a YAML config (also: accelerate launch train_scripts/train.py)")
    add_train_args(p)
    p.set_defaults(run=_train)

    p = sub.add_parser("train-vae", help="train a VAE from scratch (for the shapes base model; no pretrained VAE here)")
    add_train_args(p)
    p.set_defaults(run=_train_vae)

    p = sub.add_parser("estimate", help="peak GPU memory and disk of a training config, without loading a model")
    add_train_args(p)
    p.add_argument("--memory", default=None, metavar="SIZE", help="GPU memory to fit, e.g. 24GiB: says whether the "
                                                                  "run fits and which settings would")
    p.add_argument("--processes", type=positive_int, default=1, help="GPUs in DDP (adds gradient buckets)")
    p.set_defaults(run=_estimate)

    p = sub.add_parser("demo", help="offline, minutes on CPU: teach the shipped base model a new shape, score before/after")
    p.add_argument("--out", default="outputs/demo", type=expand, help="output folder (default outputs/demo)")
    p.add_argument("--steps", type=positive_int, default=None, help="fine-tuning steps (default: configs/train/demo_star.yaml)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_demo)

    p = sub.add_parser("make-shapes", help="write the built-in shapes dataset as an imagefolder")
    p.add_argument("--out", required=True, type=expand, help="folder to write (PNGs + metadata.jsonl)")
    p.add_argument("--n", type=positive_int, default=1000, help="number of images (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=positive_int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--shapes", nargs="+", default=None, help="shapes to draw (default circle square triangle; "
                                                              "also: star)")
    p.add_argument("--hold-out", action="store_true", help="leave out the base model's held-out combinations")
    p.set_defaults(run=_make_shapes)

    p = sub.add_parser("score-shapes", help="prompt adherence of shapes images: color, shape, position, all")
    p.add_argument("path", type=expand, help="a grid PNG with its .json sidecar, or an imagefolder with metadata.jsonl")
    p.add_argument("--details", action="store_true", help="also print one JSON line per image")
    p.set_defaults(run=_score_shapes)

    p = sub.add_parser("eval-shapes", help="adherence of a shapes model on all 90 prompts (held-out ones apart)")
    p.add_argument("--model", required=True, type=expand, help="model folder, e.g. latentsd/assets/shapes_base")
    p.add_argument("--out", default="outputs/eval", type=expand, help="folder for the grids (default outputs/eval)")
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--steps", type=positive_int, default=25)
    p.add_argument("--guidance", type=finite_float, default=2.0)
    p.set_defaults(run=_eval_shapes)

    p = sub.add_parser("export-single-file", help="write a model folder as one A1111/ComfyUI .safetensors file")
    p.add_argument("--model", required=True, type=expand, help="diffusers-layout model folder")
    p.add_argument("--out", required=True, type=expand, help="the .safetensors file to write")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="weight dtype (default fp32)")
    p.set_defaults(run=_export_single_file)

    p = sub.add_parser("init-model", help="save a randomly initialised model from a model config")
    p.add_argument("--config", default="tiny", type=expand, help="configs/models/NAME.yaml or a YAML path (default tiny)")
    p.add_argument("--out", required=True, type=expand, help="folder to write (diffusers layout)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_init_model)
    for command in sub.choices.values():  # also after the command: `latentsd train --debug --config ...`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


# ---- argument types: a bad value is argparse's one-line usage error (exit 2), before anything loads ----------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def image_side(text: str) -> int:
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a positive number of pixels (a multiple of 8), got {text!r}; "
                                         "leave it out for the model's native size") from None


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def unit_float(text: str) -> float:
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


# ---- the one error handler -------------------------------------------------------------------------------
def user_error_types() -> tuple[type, ...]:
    """What a user's input or environment causes (bad values, paths, files, missing extras, hub lookups)."""
    types = [ValueError, OSError, ImportError]  # OSError covers hub errors, PermissionError, NotADirectoryError...
    datasets_errors = sys.modules.get("datasets.exceptions")
    if datasets_errors is not None:  # DatasetGenerationError and friends are none of the above
        types.append(datasets_errors.DatasetsError)
    return tuple(types)


def raised_by_latentsd(err: BaseException) -> bool:
    """True when the innermost frame is ours: the message was written for the user (no traceback hint)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("latentsd")


def one_line(err: BaseException) -> str:
    """The error as one line: a DataLoader worker's re-raised error keeps only its original message."""
    text = str(err).strip() or type(err).__name__
    if "Traceback (most recent call last)" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        name, sep, message = last.partition(": ")
        text = message if sep and " " not in name else last
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    if text.startswith("[Errno"):  # a raw OSError: its type says what happened
        text = f"{type(err).__name__}: {text}"
    return text if raised_by_latentsd(err) else text + " (--debug shows the traceback)"


def main(argv: list[str] | None = None) -> int:
    """Run a command; a user error is one line on stderr and exit status 2 (``--debug``: the traceback)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or argparse's own one-line usage error
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    try:
        args.run(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"latentsd {args.command}: interrupted", file=sys.stderr)
        return 130
    except user_error_types() as err:
        if args.debug:
            raise
        print(f"latentsd {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
