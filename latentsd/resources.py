"""Files shipped inside the package (configs, the base model, the tokenizer), found with importlib.resources,
so a checkout, an editable install and an installed wheel all read the same files."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

CONFIG_KINDS = ("models", "train", "accelerate")


def package_path(*parts: str) -> Path:
    """``package_path("assets", "shapes_base")`` → that folder inside the installed ``latentsd`` package."""
    path = files("latentsd").joinpath(*parts)
    if not isinstance(path, Path):  # a zip import: the trainer and loaders need real files
        raise RuntimeError(f"latentsd is installed as {type(path).__name__}, not as files: install the wheel with pip")
    return path


def config_dir(kind: str) -> Path:
    """The folder of shipped ``kind`` configs: latentsd/configs/{models,train,accelerate}."""
    if kind not in CONFIG_KINDS:
        raise ValueError(f"unknown config kind {kind!r}: use one of {list(CONFIG_KINDS)}")
    return package_path("configs", kind)


def shipped_configs(kind: str) -> list[str]:
    """Names of the shipped ``kind`` configs (file stems), sorted."""
    return sorted(p.stem for p in config_dir(kind).glob("*.yaml"))


def shipped_config(kind: str, name: str) -> Path | None:
    """``shipped_config("train", "tiny")`` → latentsd/configs/train/tiny.yaml; None when no such config ships."""
    if not name or Path(name).name != name or Path(name).suffix:
        return None
    path = config_dir(kind) / f"{name}.yaml"
    return path if path.is_file() else None
