"""The `latentsd` command. Each subcommand parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import sys


def _generate(args) -> None:
    from .generate import add_lora_and_embeddings, generate_to_file, load_pipeline

    pipe = load_pipeline(args.model, scheduler=args.scheduler, device=args.device, allow_pickle=args.allow_pickle)
    for token in add_lora_and_embeddings(pipe, args.lora, args.lora_scale, args.embedding, args.embedding_token):
        print(f"loaded embedding {token!r}: use it in the prompt")
    out = generate_to_file(pipe, args.prompt, args.out, negative_prompt=args.negative_prompt, steps=args.steps,
                           guidance=args.guidance, seed=args.seed, num_images=args.num_images,
                           height=args.height, width=args.width, eta=args.eta,
                           long_prompts=args.long_prompts, prompt_weighting=args.prompt_weighting)
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


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training YAML, or the name of a shipped one (tiny, sd15_finetune, ...)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. max_steps=100 optim.learning_rate=1e-4 data.dataset=DIR")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentsd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="generate images from a prompt with a model folder or hub id")
    p.add_argument("prompt")
    p.add_argument("--model", required=True,
                   help="diffusers-layout model folder or hub id, or an SD-1/2 single file (A1111 .safetensors)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load a .ckpt/.pt single file (read with torch.load(weights_only=True)); trusted files only")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale; 1 disables it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1, help="images for the prompt; >1 writes a grid")
    p.add_argument("--height", type=int, default=None, help="default: the model's native size")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--scheduler", default="model", metavar="NAME",
                   help="sampler: 'model' (the folder's own, default) or an A1111 name, e.g. Euler, 'Euler a', "
                        "'DPM++ 2M Karras', UniPC, Heun, LMS, DDIM, DDPM, PNDM (any case; '_' for spaces works)")
    p.add_argument("--lora", default=None, metavar="PATH",
                   help="LoRA weights: a diffusers/PEFT folder or .safetensors, or a kohya/A1111 .safetensors")
    p.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength (default 1; 0 = no effect)")
    p.add_argument("--embedding", action="append", default=[], metavar="PATH",
                   help="textual-inversion embedding (diffusers or A1111 file); repeat for several")
    p.add_argument("--embedding-token", action="append", default=[], metavar="TOKEN",
                   help="the token for each --embedding (default: the file's own; A1111 files: the file name)")
    p.add_argument("--long-prompts", action="store_true",
                   help="encode prompts longer than 77 tokens in 75-token chunks (default: truncate, as diffusers)")
    p.add_argument("--prompt-weighting", action="store_true",
                   help="A1111 weights: (word:1.3), (word) x1.1, [word] /1.1, \\( \\) for literal brackets, BREAK")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default="out.png", help="output PNG (a .json sidecar lists the prompts)")
    p.set_defaults(run=_generate)

    p = sub.add_parser("train", help="train or fine-tune from a YAML config (also: accelerate launch train_scripts/train.py)")
    add_train_args(p)
    p.set_defaults(run=_train)

    p = sub.add_parser("train-vae", help="train a VAE from scratch (for the shapes base model; no pretrained VAE here)")
    add_train_args(p)
    p.set_defaults(run=_train_vae)

    p = sub.add_parser("demo", help="offline, minutes on CPU: teach the shipped base model a new shape, score before/after")
    p.add_argument("--out", default="outputs/demo", help="output folder (default outputs/demo)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: configs/train/demo_star.yaml)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_demo)

    p = sub.add_parser("make-shapes", help="write the built-in shapes dataset as an imagefolder")
    p.add_argument("--out", required=True, help="folder to write (PNGs + metadata.jsonl)")
    p.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--shapes", nargs="+", default=None, help="shapes to draw (default circle square triangle; "
                                                              "also: star)")
    p.add_argument("--hold-out", action="store_true", help="leave out the base model's held-out combinations")
    p.set_defaults(run=_make_shapes)

    p = sub.add_parser("score-shapes", help="prompt adherence of shapes images: color, shape, position, all")
    p.add_argument("path", help="a grid PNG with its .json sidecar, or an imagefolder with metadata.jsonl")
    p.add_argument("--details", action="store_true", help="also print one JSON line per image")
    p.set_defaults(run=_score_shapes)

    p = sub.add_parser("eval-shapes", help="adherence of a shapes model on all 90 prompts (held-out ones apart)")
    p.add_argument("--model", required=True, help="model folder, e.g. latentsd/assets/shapes_base")
    p.add_argument("--out", default="outputs/eval", help="folder for the grids (default outputs/eval)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=2.0)
    p.set_defaults(run=_eval_shapes)

    p = sub.add_parser("export-single-file", help="write a model folder as one A1111/ComfyUI .safetensors file")
    p.add_argument("--model", required=True, help="diffusers-layout model folder")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="weight dtype (default fp32)")
    p.set_defaults(run=_export_single_file)

    p = sub.add_parser("init-model", help="save a randomly initialised model from a model config")
    p.add_argument("--config", default="tiny", help="configs/models/NAME.yaml or a YAML path (default tiny)")
    p.add_argument("--out", required=True, help="folder to write (diffusers layout)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_init_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, ImportError) as err:  # bad input or a missing optional package
        print(f"latentsd {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
