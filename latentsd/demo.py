"""`latentsd demo`: the whole main job offline in minutes: fine-tune the shipped base model on a new
concept, then generate before/after grids and score how well the images follow their prompts."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .io import write_json_atomically, write_text_atomically
from .resources import package_path, shipped_config

BASE_MODEL = package_path("assets", "shapes_base")
NEW_SHAPE = "star"


def prompts_for(shapes: list[str]) -> list[str]:
    """Every color × position for the given shapes."""
    from .data.shapes import all_specs

    return [spec.caption for spec in all_specs(shapes=shapes)]


def write_concept_data(out: Path, n_new: int, n_old: int, seed: int) -> Path:
    """Stars in every color and position, plus some old shapes so the model does not forget them."""
    from datasets import concatenate_datasets

    from .data.shapes import HELD_OUT, SHAPES, all_specs, make_shapes_dataset, write_imagefolder

    new = make_shapes_dataset(n_new, seed=seed, specs=all_specs(shapes=[NEW_SHAPE]))
    old = make_shapes_dataset(n_old, seed=seed + 1, specs=all_specs(shapes=list(SHAPES)), exclude=HELD_OUT)
    return write_imagefolder(concatenate_datasets([new, old]).shuffle(seed=seed), out)


def generate_and_score(model_dir: Path, groups: dict[str, list[str]], out_png: Path, steps: int,
                       guidance: float, seed: int) -> dict:
    """One seeded image per prompt, saved as one grid (with its prompt sidecar), scored per prompt group."""
    from .data.shapes import score
    from .generate import load_pipeline
    from .images import save_images

    pipe = load_pipeline(str(model_dir), scheduler="ddim")
    pipe.set_progress_bar_config(desc=f"sampling {out_png.stem}", leave=False)
    prompts = [p for group in groups.values() for p in group]
    generator = torch.Generator(pipe.device).manual_seed(seed)
    images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generator).images
    save_images(images, prompts, out_png, cols=5)
    scores, start = {}, 0
    for name, group in groups.items():
        result = score(images[start:start + len(group)], group)
        result.pop("records")
        scores[name], start = result, start + len(group)
    return scores


def evaluate_shapes_model(model_dir: str | Path, out_dir: str | Path, seeds=(0, 1, 2), steps: int = 25,
                          guidance: float = 2.0) -> dict:
    """Adherence of a shapes model on all 90 combinations (held-out ones scored separately), per seed.

    Writes one grid per seed to ``out_dir`` and returns ``{"seen": scores, "held_out": scores}`` pooled over seeds.
    """
    from .data.shapes import HELD_OUT

    everything = prompts_for(["circle", "square", "triangle"])
    groups = {"seen": [p for p in everything if p not in HELD_OUT], "held_out": list(HELD_OUT)}
    runs = [generate_and_score(Path(model_dir), groups, Path(out_dir) / f"eval-seed{seed}.png", steps, guidance, seed)
            for seed in seeds]
    return {name: _pool([run[name] for run in runs]) for name in groups}


def _pool(results: list[dict]) -> dict:
    n = sum(r["n"] for r in results)
    return {"n": n, **{k: sum(r[k] * r["n"] for r in results) / n for k in ("color", "shape", "position", "all")}}


def run_demo(out_dir: str | Path, steps: int | None = None, seed: int = 0, base_model: str | Path | None = None,
             n_new: int = 600, n_old: int = 600, sample_steps: int = 25, guidance: float = 2.0,
             overrides: list[str] = ()) -> dict:
    """Fine-tune ``base_model`` on a new shape and write grids, the fine-tuned model and a report to ``out_dir``."""
    from .config import load_config
    from .training.trainer import train

    out, started = Path(out_dir), time.perf_counter()
    base_model = Path(base_model or BASE_MODEL)
    if not (base_model / "model_index.json").is_file():
        raise FileNotFoundError(f"no base model at {base_model}: build it with `make base-model` (see README)")
    groups = {"old": prompts_for(["circle", "square", "triangle"])[::3], "new": prompts_for([NEW_SHAPE])}
    print(f"1/4 writing {n_new} '{NEW_SHAPE}' images (+{n_old} known shapes) to {out / 'data'}")
    data = write_concept_data(out / "data", n_new, n_old, seed)
    print("2/4 generating with the base model")
    before = generate_and_score(base_model, groups, out / "before.png", sample_steps, guidance, seed)
    print("3/4 fine-tuning (the normal trainer; latentsd/configs/train/demo_star.yaml)")
    overrides = [f"output_dir={out / 'finetune'}", f"model.pretrained={base_model}", f"data.dataset={data}",
                 f"seed={seed}", "resume=none"] + ([f"max_steps={steps}"] if steps else []) + list(overrides)
    summary = train(load_config(shipped_config("train", "demo_star"), overrides))
    print("4/4 generating with the fine-tuned model")
    after = generate_and_score(Path(summary["model"]), groups, out / "after.png", sample_steps, guidance, seed)
    report = {"before": before, "after": after, "train_steps": summary["steps"],
              "train_seconds": summary["seconds"], "wall_seconds": round(time.perf_counter() - started, 1),
              "model": summary["model"], "grids": [str(out / "before.png"), str(out / "after.png")]}
    _write_report(out, report)
    return report


def _write_report(out: Path, report: dict) -> None:
    write_json_atomically(out / "report.json", report, indent=2)
    lines = ["# latentsd demo", "", f"Taught the base model a new shape, **{NEW_SHAPE}**.", "",
             "| model | prompts | color | shape | position | all three |", "| --- | --- | --- | --- | --- | --- |"]
    for when in ("before", "after"):
        for group in ("old", "new"):
            s = report[when][group]
            lines.append(f"| {when} | {group} ({s['n']}) | {s['color']:.0%} | {s['shape']:.0%} | "
                         f"{s['position']:.0%} | {s['all']:.0%} |")
    lines += ["", f"Fine-tuning: {report['train_steps']} steps in {report['train_seconds']} s; "
              f"whole demo {report['wall_seconds']} s.", "",
              "Grids (rows of 5; first the old prompts, then the new):", "",
              f"![before]({Path(report['grids'][0]).name}) ![after]({Path(report['grids'][1]).name})", ""]
    write_text_atomically(out / "report.md", "\n".join(lines))
