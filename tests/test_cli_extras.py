"""`latentsd generate` with --scheduler NAME, --lora/--lora-scale and --embedding: images equal diffusers' own."""

import sys

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

from latentsd.cli import main
from latentsd.config import LoRAConfig
from latentsd.models import build_components
from latentsd.training.lora import add_lora, export_lora

PROMPT = "a red circle on the left"
CALL = {"num_inference_steps": 2, "guidance_scale": 2.0, "height": 32, "width": 32}


def _cli(tmp_path, model_dir, *extra, prompt=PROMPT):
    """Run `latentsd generate` and return its PNG as int16 pixels."""
    out = tmp_path / f"cli{len(list(tmp_path.glob('cli*.png')))}.png"
    args = ["generate", prompt, "--model", str(model_dir), "--steps", str(CALL["num_inference_steps"]),
            "--guidance", str(CALL["guidance_scale"]), "--height", "32", "--width", "32", "--seed", "0",
            "--device", "cpu", *extra, "--out", str(out)]
    assert main(args) == 0
    return np.asarray(PIL.Image.open(out).convert("RGB"), dtype=np.int16)


def _diffusers(model_dir, prompt=PROMPT, scheduler=None, setup=lambda pipe: None, **call):
    """diffusers' StableDiffusionPipeline from the same folder, set up by ``setup``, same seed: PIL → int16."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.scheduler = scheduler(pipe.scheduler.config)
    setup(pipe)
    image = pipe(prompt, generator=torch.Generator().manual_seed(0), **CALL, **call).images[0]
    return np.asarray(image, dtype=np.int16)


def _assert_same(a, b):
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1  # ≤ 1e-4 in [0, 1] can still round across a uint8 boundary


# ---- --scheduler NAME --------------------------------------------------------------------------------
def test_scheduler_by_a1111_name_equals_diffusers(tiny_model_dir, tmp_path):
    ours = _cli(tmp_path, tiny_model_dir, "--scheduler", "dpm++_2m_karras")
    ref = _diffusers(tiny_model_dir, scheduler=lambda c: diffusers.DPMSolverMultistepScheduler.from_config(
        c, use_karras_sigmas=True))
    _assert_same(ours, ref)
    assert np.abs(ours - _cli(tmp_path, tiny_model_dir)).max() > 2  # not the folder's own DDPM


# ---- --lora PATH --lora-scale S ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A LoRA on the tiny model's UNet and text encoder (random, non-zero B), in both export formats."""
    parts = build_components("tiny", seed=0)
    add_lora(parts.unet, parts.text_encoder, LoRAConfig(enabled=True, rank=4, alpha=8.0, text_encoder=True))
    torch.manual_seed(1)
    for model in (parts.unet, parts.text_encoder):
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.data.normal_(0, 0.1)
    folder = tmp_path_factory.mktemp("lora") / "lora"
    paths = export_lora(folder, parts.unet, parts.text_encoder)
    return {"folder": folder, "kohya": paths["kohya"]}


@pytest.mark.parametrize("fmt", ["folder", "kohya"])
def test_lora_at_scale_one_equals_diffusers_with_the_same_lora(tiny_model_dir, tmp_path, lora, fmt):
    ours = _cli(tmp_path, tiny_model_dir, "--lora", str(lora[fmt]), "--scheduler", "Euler a")
    ref = _diffusers(tiny_model_dir, scheduler=diffusers.EulerAncestralDiscreteScheduler.from_config,
                     setup=lambda pipe: pipe.load_lora_weights(str(lora[fmt])))
    _assert_same(ours, ref)
    assert np.abs(ours - _cli(tmp_path, tiny_model_dir, "--scheduler", "Euler a")).max() > 2  # the LoRA acts


def test_lora_scale_zero_equals_no_lora(tiny_model_dir, tmp_path, lora):
    _assert_same(_cli(tmp_path, tiny_model_dir, "--lora", str(lora["kohya"]), "--lora-scale", "0"),
                 _cli(tmp_path, tiny_model_dir))


def test_lora_scale_equals_diffusers_cross_attention_scale(tiny_model_dir, tmp_path, lora):
    ours = _cli(tmp_path, tiny_model_dir, "--lora", str(lora["folder"]), "--lora-scale", "0.5")
    ref = _diffusers(tiny_model_dir, setup=lambda pipe: pipe.load_lora_weights(str(lora["folder"])),
                     cross_attention_kwargs={"scale": 0.5})
    _assert_same(ours, ref)
    full = _cli(tmp_path, tiny_model_dir, "--lora", str(lora["folder"]))
    assert np.abs(ours - full).max() > 2  # the scale is applied, not ignored


# ---- --embedding PATH [--embedding-token T] ----------------------------------------------------------
def _vectors(n, dim=32, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) * 0.5


def test_a1111_embedding_equals_diffusers(tiny_model_dir, tmp_path, capsys):
    """A1111's safetensors format (``emb_params``, token = file name) with two vectors, also in the negative prompt."""
    path = tmp_path / "mystyle.safetensors"
    save_file({"emb_params": _vectors(2)}, str(path))
    prompt, negative = "a mystyle circle on the left", "mystyle"
    ours = _cli(tmp_path, tiny_model_dir, "--embedding", str(path), "--negative-prompt", negative, prompt=prompt)
    assert "loaded embedding 'mystyle'" in capsys.readouterr().out
    ref = _diffusers(tiny_model_dir, prompt, setup=lambda pipe: pipe.load_textual_inversion(str(path), token="mystyle"),
                     negative_prompt=negative)
    _assert_same(ours, ref)


def test_diffusers_embeddings_with_tokens_equal_diffusers(tiny_model_dir, tmp_path):
    """diffusers' format (``{"<token>": vectors}``): a folder and a file, two embeddings, tokens given."""
    folder = tmp_path / "toy"
    folder.mkdir()
    save_file({"<cat-toy>": _vectors(1, seed=1)}, str(folder / "learned_embeds.safetensors"))
    file = tmp_path / "shape.safetensors"
    save_file({"<shape>": _vectors(3, seed=2)}, str(file))
    prompt = "a <toy> next to a <blob> on the left"
    ours = _cli(tmp_path, tiny_model_dir, "--embedding", str(folder), "--embedding", str(file),
                "--embedding-token", "<toy>", "--embedding-token", "<blob>", prompt=prompt)
    ref = _diffusers(tiny_model_dir, prompt, setup=lambda pipe: pipe.load_textual_inversion(
        [str(folder), str(file)], token=["<toy>", "<blob>"]))
    _assert_same(ours, ref)


# ---- bad input: exit 2, a message naming the problem, no traceback -----------------------------------
BAD_INPUT = {  # case → (arguments, "{tmp}" = the test's folder; what the message must say)
    "missing lora": (["--lora", "{tmp}/nope"], "do not exist"),
    "lora not safetensors": (["--lora", "{tmp}/notes.txt"], "is not a LoRA file"),
    "scale without lora": (["--lora-scale", "0.5"], "--lora-scale needs --lora"),
    "missing embedding": (["--embedding", "{tmp}/nope.safetensors"], "does not exist"),
    "embedding not a weights file": (["--embedding", "{tmp}/notes.txt"], "is not an embedding file"),
    "folder without embedding": (["--embedding", "{tmp}"], "has no learned_embeds.safetensors"),
    "wrong width": (["--embedding", "{tmp}/narrow.safetensors"], "incorrect shape"),
    "token count": (["--embedding", "{tmp}/ok.safetensors", "--embedding-token", "x", "--embedding-token", "y"],
                    "one per embedding"),
    "unknown sampler": (["--scheduler", "Euler b"], "'DPM++ 2M Karras'"),
    "pndm few steps": (["--scheduler", "PNDM"], "at least 4 steps"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_a_clear_error(tiny_model_dir, tmp_path, capsys, case):
    (tmp_path / "notes.txt").write_text("not a LoRA")
    save_file({"emb_params": _vectors(1, dim=16)}, str(tmp_path / "narrow.safetensors"))
    save_file({"emb_params": _vectors(1)}, str(tmp_path / "ok.safetensors"))
    extra, message = BAD_INPUT[case]
    code = main(["generate", "x", "--model", str(tiny_model_dir), "--steps", "2", "--device", "cpu",
                 *(a.format(tmp=tmp_path) for a in extra), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_missing_scipy_for_lms_is_named_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # importlib's "not installed"
    code = main(["generate", "x", "--model", str(tmp_path / "never-read"), "--scheduler", "lms",
                 "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "'LMS' needs scipy: pip install scipy" in err and "Traceback" not in err
