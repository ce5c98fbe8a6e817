"""A test helper for the slow learning runs: how well a trained shapes model follows prompts."""

import numpy as np
import torch


def adherence(model, prompts, targets, seeds=(0, 1)) -> dict:
    """Scorer results (color, shape, position, all) of ``model`` prompted with ``prompts``, judged against
    ``targets``, pooled over ``seeds`` (25 DDIM steps, guidance 2)."""
    from latentsd.data.shapes import score
    from latentsd.generate import load_pipeline

    pipe = load_pipeline(str(model), scheduler="ddim")
    pipe.set_progress_bar_config(disable=True)
    runs = [score(pipe(prompts, num_inference_steps=25, guidance_scale=2.0,
                       generator=torch.Generator().manual_seed(seed)).images, targets) for seed in seeds]
    return {k: float(np.mean([r[k] for r in runs])) for k in ("color", "shape", "position", "all")}
