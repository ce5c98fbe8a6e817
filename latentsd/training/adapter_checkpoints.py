"""With LoRA on, a checkpoint holds the adapters only: not the frozen base weights, which the run reloads anyway.

accelerate's ``save_state`` writes each prepared model's full state dict (``model.safetensors``,
``model_1.safetensors``, …). :func:`register_adapter_checkpoints` adds accelerate state hooks that make those files
hold only the adapter tensors (LoRA, DoRA, LoHa, LoKr; bare module names, so a checkpoint resumes under any number of
processes) and load them back on resume, checking that every adapter tensor is there and nothing unknown is. The
optimizer state already covers the adapters only (they are the only parameters it optimizes), and so does EMA.
A full-model checkpoint of an older LoRA run still resumes (its adapter tensors are taken, the base is the source).
"""

from __future__ import annotations

from pathlib import Path

from ..adapter_formats import is_adapter_key, unwrap


def register_adapter_checkpoints(accelerator) -> None:
    """Checkpoints of this accelerator hold (and restore) the adapters of its prepared models, not their base weights.

    Under DeepSpeed (which saves and loads its engines itself) the hooks see no model weights and do nothing."""
    accelerator.register_save_state_pre_hook(_keep_adapters)
    accelerator.register_load_state_pre_hook(_load_adapters)


def model_file(folder: str | Path, index: int) -> Path:
    """accelerate's name for the ``index``-th prepared model's weights in a checkpoint folder (safetensors)."""
    return Path(folder) / ("model.safetensors" if index == 0 else f"model_{index}.safetensors")


def _kept_keys(bare) -> set[str]:
    """The adapter tensors, and any other parameter that trains beside them (textual-inversion vectors)."""
    trained = {name for name, p in bare.named_parameters() if p.requires_grad}
    return {k for k in bare.state_dict() if is_adapter_key(k) or k in trained}


def adapter_state_dict(model) -> dict:
    """The adapter tensors of ``model`` (any wrapper), under the bare module names; an error if there are none."""
    bare = unwrap(model)
    kept = _kept_keys(bare)
    state = {k: v for k, v in bare.state_dict().items() if k in kept}
    if not state:
        raise ValueError(f"{type(bare).__name__} has no LoRA adapter: adapter-only checkpoints need lora.enabled")
    return state


def load_adapter_state(model, path: str | Path) -> None:
    """Restore ``model``'s adapters from a checkpoint file; an error naming the file if one is missing or unknown."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this checkpoint is incomplete (resume from another one)")
    saved = {k.removeprefix("module."): v for k, v in load_file(str(path)).items()}  # old DDP-wrapped full checkpoints
    bare = unwrap(model)
    names = bare.state_dict().keys()
    wanted = _kept_keys(bare)
    missing, unknown = sorted(wanted - saved.keys()), sorted(saved.keys() - names)
    if missing or unknown:
        raise ValueError(f"{path} does not fit this run's {type(bare).__name__} adapters (missing {missing[:3]}, "
                         f"unknown {unknown[:3]}): resume with the lora.* settings (variant, rank, targets, conv) "
                         "of the run that wrote it")
    bare.load_state_dict({k: saved[k] for k in wanted}, strict=False)


def _keep_adapters(models: list, weights: list, output_dir: str) -> None:
    for i, model in enumerate(models[:len(weights)]):
        weights[i] = adapter_state_dict(model)


def _load_adapters(models: list, input_dir: str) -> None:
    for i, model in enumerate(models):
        load_adapter_state(model, model_file(input_dir, i))
    models.clear()  # accelerate loads no model weights itself: the adapters are in, the base is the source's
