"""A built wheel holds everything the library needs: installed into a fresh venv and run from a folder
outside the checkout, the CLI, the demo and ``build_components`` work (configs and the shipped base model
come from the installed package, found with importlib.resources)."""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import PIL.Image
import pytest
import torch

from latentsd.cli import main
from latentsd.config import config_to_dict, load_config
from latentsd.data.shapes import make_shapes_dataset, write_imagefolder
from latentsd.models import build_components

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BUILD_INPUTS = ("pyproject.toml", "README.md", "latentsd")  # all a wheel build reads


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the package sources (no build/ or egg-info left in the checkout)."""
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
          "-w", str(dist)], cwd=src)
    (built,) = dist.glob("latentsd-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> Path:
    """A fresh venv with only the wheel installed; torch & co. come from this interpreter's site-packages,
    appended by a .pth file *after* the venv's own (so the checkout's latentsd can never shadow the wheel's;
    paths listed in a .pth do not run that folder's .pth files, so the editable install stays invisible)."""
    env = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", str(env)])
    python = env / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)])
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    dev_sites = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "_latentsd_test_deps.pth").write_text("".join(f"{p}\n" for p in dev_sites))
    return env


@pytest.fixture()
def outside(tmp_path) -> Path:
    """A working folder outside the repository (no configs/ or latentsd/ next to it)."""
    assert ROOT not in tmp_path.resolve().parents
    return tmp_path


def _run(cmd, cwd=None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _latentsd(venv: Path, *args, cwd: Path) -> str:
    return _run([venv / "bin" / "latentsd", *args], cwd=cwd)


def _package_files(folder: str, pattern: str) -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "latentsd" / folder).rglob(pattern) if p.is_file()}


def test_wheel_contains_every_config_and_the_shipped_assets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs, assets = _package_files("configs", "*.yaml"), _package_files("assets", "*")
    assert {"latentsd/configs/models/tiny.yaml", "latentsd/configs/train/demo_star.yaml",
            "latentsd/configs/accelerate/2cpu.yaml"} <= configs
    assert "latentsd/assets/shapes_base/unet/diffusion_pytorch_model.safetensors" in assets
    assert sorted(configs - names) == [] and sorted(assets - names) == []


def test_the_installed_package_is_the_wheel_not_the_checkout(venv, outside):
    where = _run([venv / "bin" / "python", "-c", "import latentsd; print(latentsd.__file__)"], cwd=outside)
    assert Path(where.strip()).resolve().is_relative_to(venv.resolve())


def test_build_components_by_name(venv, outside):
    code = ("from latentsd import build_components; ps = list(build_components('tiny').unet.parameters()); "
            "print(sum(p.numel() for p in ps), repr(sum(float(p.detach().double().sum()) for p in ps)))")
    numel, total = _run([venv / "bin" / "python", "-c", code], cwd=outside).split()
    ref = list(build_components("tiny", seed=0).unet.parameters())
    assert int(numel) == sum(p.numel() for p in ref)
    assert float(total) == pytest.approx(sum(float(p.detach().double().sum()) for p in ref), rel=1e-12)


def test_init_model_then_generate_equal_the_checkout(venv, outside):
    _latentsd(venv, "init-model", "--config", "tiny", "--out", "m", cwd=outside)
    _latentsd(venv, "generate", "a red circle", "--model", "m", "--steps", "2", "--out", "x.png", cwd=outside)
    ref = outside / "ref.png"
    assert main(["generate", "a red circle", "--model", str(outside / "m"), "--steps", "2", "--out", str(ref)]) == 0
    ours = PIL.Image.open(outside / "x.png")
    assert ours.size == (64, 64) and ours.tobytes() == PIL.Image.open(ref).tobytes()
    from safetensors.torch import load_file

    saved = load_file(outside / "m/unet/diffusion_pytorch_model.safetensors")
    expected = build_components("tiny", seed=0).unet.state_dict()
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)


def test_train_with_a_shipped_config_name(venv, outside):
    data = write_imagefolder(make_shapes_dataset(8, seed=0), outside / "shapes")
    overrides = [f"data.dataset={data}", "max_steps=2", "checkpoint_every=2", "optim.train_batch_size=2",
                 f"output_dir={outside / 'run'}"]
    _latentsd(venv, "train", "--config", "tiny", *overrides, cwd=outside)
    saved = load_config(outside / "run" / "config.yaml")
    assert config_to_dict(saved) == config_to_dict(load_config(ROOT / "configs/train/tiny.yaml", overrides))
    assert (outside / "run/model/model_index.json").is_file()


def test_demo_uses_the_installed_base_model_and_config(venv, outside):
    _latentsd(venv, "demo", "--steps", "5", "--out", "d", cwd=outside)
    report = json.loads((outside / "d/report.json").read_text())
    assert report["train_steps"] == 5
    saved = load_config(outside / "d/finetune/config.yaml")
    assert Path(saved.model.pretrained).resolve().is_relative_to(venv.resolve())
    overrides = [f"output_dir={saved.output_dir}", f"model.pretrained={saved.model.pretrained}",
                 f"data.dataset={saved.data.dataset}", "seed=0", "resume=none", "max_steps=5"]
    expected = load_config(ROOT / "configs/train/demo_star.yaml", overrides)
    assert config_to_dict(saved) == config_to_dict(expected)
    from latentsd.demo import BASE_MODEL, NEW_SHAPE, generate_and_score, prompts_for

    groups = {"old": prompts_for(["circle", "square", "triangle"])[::3], "new": prompts_for([NEW_SHAPE])}
    before = generate_and_score(BASE_MODEL, groups, outside / "ref.png", 25, 2.0, 0)
    assert before == report["before"]
    assert PIL.Image.open(outside / "ref.png").tobytes() == PIL.Image.open(outside / "d/before.png").tobytes()


def test_train_config_names_resolve_to_the_shipped_files_and_unknown_names_are_clear(tmp_path, monkeypatch, capsys):
    from latentsd.training.vae import load_vae_config

    monkeypatch.chdir(tmp_path)
    assert config_to_dict(load_config("tiny")) == config_to_dict(load_config(ROOT / "configs/train/tiny.yaml"))
    assert load_vae_config("shapes_vae") == load_vae_config(ROOT / "configs/train/shapes_vae.yaml")
    assert main(["train", "--config", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "config file not found: nosuch" in err and "demo_star, sd15_finetune, shapes_base, shapes_vae, tiny" in err


def test_the_sd15_example_names_the_hub_id_the_readme_lists_as_known_to_work():
    paragraph = README.split("**Hub ids.**", 1)[1].split("\n\n", 1)[0]
    known = re.search(r"Known to work[^`]*`([^`]+)`", paragraph).group(1)
    assert load_config("sd15_finetune").model.pretrained == known
    pretrained = {name: load_config(p).model.pretrained for p in (ROOT / "configs/train").glob("*.yaml")
                  if (name := p.stem) != "shapes_vae"}
    assert not [name for name, hub in pretrained.items() if hub.startswith("runwayml/")]
