"""Sampling speed: latentsd's pipeline + our DDIM vs diffusers' StableDiffusionPipeline + its DDIM, same weights.

    python benchmarks/sampling.py [--model configs-name-or-folder] [--batch 16] [--steps 25] [--repeats 3]

Prints images/s for both and their ratio (the baseline is diffusers, measured in the same run).
"""

import argparse
import time

import diffusers
import torch

from latentsd import DDIMScheduler, LatentDiffusionPipeline, build_components


def load(model: str):
    if model.endswith((".yaml", ".yml")) or "/" not in model:
        parts = build_components(model).as_dict()
    else:
        pipe = LatentDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32)
        parts = dict(pipe.components)
    ours = LatentDiffusionPipeline(**{**parts, "scheduler": DDIMScheduler.from_config(parts["scheduler"].config)})
    ref = diffusers.StableDiffusionPipeline(**{**parts, "scheduler": diffusers.DDIMScheduler.from_config(
        parts["scheduler"].config)}, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return ours, ref


def images_per_second(pipe, batch: int, steps: int, repeats: int) -> float:
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle on the left"] * batch
    pipe(prompts, num_inference_steps=2, guidance_scale=2.0)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        pipe(prompts, num_inference_steps=steps, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
             output_type="np")
        best = min(best, time.perf_counter() - start)
    return batch / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="latentsd/assets/shapes_base")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ours, ref = load(args.model)
    rows = [("diffusers StableDiffusionPipeline + DDIM", images_per_second(ref, args.batch, args.steps, args.repeats)),
            ("latentsd LatentDiffusionPipeline + DDIM", images_per_second(ours, args.batch, args.steps, args.repeats))]
    print(f"model={args.model} batch={args.batch} steps={args.steps} threads={torch.get_num_threads()} "
          f"device=cpu")
    for name, ips in rows:
        print(f"{name:45s} {ips:8.2f} images/s")
    print(f"ratio latentsd/diffusers: {rows[1][1] / rows[0][1]:.3f}")


if __name__ == "__main__":
    main()
