"""Bad inputs through the `latentsd` command: a one-line `latentsd CMD: error: ...` naming the problem and the fix,
exit status 2 and never a traceback (`--debug` shows it); or, where the issue asks, trained through with the rows
counted by reason. Nothing here reaches the hub: its download functions fail the test if called. Every fixture
(non-UTF-8 captions, broken JSON lines, rows without captions, garbage images, .bin-only and malicious model
folders) is built by the tests."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from latentsd.cli import main
from latentsd.config import load_config
from latentsd.data.datasets import CaptionImageDataset, load_caption_dataset

ROOT = Path(__file__).resolve().parent.parent
HUB_FUNCTIONS = ("hf_hub_download", "snapshot_download", "model_info", "dataset_info", "list_repo_files")
GOOD = [{"file_name": f"{i}.png", "text": f"a red square {i}"} for i in range(4)]


# ---- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """Any hub lookup fails the test (AssertionError is no user error: main lets it through)."""
    import diffusers.pipelines.pipeline_utils  # noqa: F401 - import the modules that hold references first
    import huggingface_hub
    import transformers.utils.hub  # noqa: F401

    def refuse(*args, **kwargs):
        raise AssertionError(f"hub lookup {args} {kwargs}")

    for name in HUB_FUNCTIONS:
        hub_fn = getattr(huggingface_hub, name)
        for module in list(sys.modules.values()):
            if getattr(module, name, None) is hub_fn:
                monkeypatch.setattr(module, name, refuse)
        monkeypatch.setattr(huggingface_hub.HfApi, name, refuse, raising=False)


def _folder(root: Path, lines: list[bytes], garbage: bool = False) -> Path:
    root.mkdir(parents=True)
    for i in range(4):
        if garbage:
            (root / f"{i}.png").write_bytes(b"\x89PNG but not really an image")
        else:
            Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(root / f"{i}.png")
    (root / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    good = [json.dumps(row).encode() for row in GOOD]
    _folder(root / "good", good)
    _folder(root / "latin1", [good[0], '{"file_name": "1.png", "text": "un caf\xe9"}'.encode("latin-1"), *good[2:]])
    _folder(root / "broken", [good[0], b'{"file_name": "1.png", "text": "no closing brace"', *good[2:]])
    _folder(root / "no_caption", [good[0], b'{"file_name": "1.png"}', *good[2:]])
    _folder(root / "garbage", good, garbage=True)
    table = root / "table"
    shutil.copytree(root / "good", table)
    (table / "metadata.jsonl").unlink()
    (table / "rows.csv").write_bytes(b"file_name,text\n0.png,ok\n1.png,na\xefve\n2.png,ok\n3.png,ok\n")
    (root / "a_file").write_text("not a folder")
    (root / "ckpt_is_file").mkdir()
    (root / "ckpt_is_file" / "checkpoints").write_text("not a folder")
    return root


def _bin_copy(src: Path, dst: Path) -> Path:
    """``src`` with every safetensors weight replaced by the same tensors in a pickled ``.bin``."""
    shutil.copytree(src, dst)
    for sub, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                      ("text_encoder", "model")):
        weights = dst / sub / f"{name}.safetensors"
        torch.save(load_file(weights), dst / sub / ("pytorch_model.bin" if sub == "text_encoder" else f"{name}.bin"))
        weights.unlink()
    return dst


class RunsCode:
    """A pickle that would run a shell command when unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def bin_model(tiny_model_dir, tmp_path_factory) -> Path:
    return _bin_copy(tiny_model_dir, tmp_path_factory.mktemp("bin") / "model")


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def assert_one_line_error(code: int, text: str, command: str, *fragments: str) -> None:
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if f"latentsd {command}: error:" in line
              or line.startswith(("usage:", f"latentsd {command}: error:"))]
    assert code == 2 and errors, text
    for fragment in fragments:
        assert fragment in text, (fragment, text)


def train_args(data_dir, out, *extra):
    return ["train", "--config", "tiny", f"data.dataset={data_dir}", f"output_dir={out}", "max_steps=1",
            "checkpoint_every=1", "optim.train_batch_size=2", *extra]


# ---- every bad input through the CLI: one line, exit 2 -----------------------------------------------
GENERATE_CASES = {
    "height -64": (["--height", "-64"], "--height: must be a positive number of pixels"),
    "height 0": (["--height", "0"], "--height: must be a positive number of pixels"),
    "width 30": (["--width", "30"], "divisible by 8"),
    "steps 0": (["--steps", "0"], "--steps: must be >= 1"),
    "guidance nan": (["--guidance", "nan"], "--guidance: must be a finite number"),
    "guidance inf": (["--guidance", "inf"], "--guidance: must be a finite number"),
    "num-images 0": (["--num-images", "0"], "--num-images: must be >= 1"),
}


@pytest.mark.parametrize("case", GENERATE_CASES)
def test_bad_generate_argument_is_one_line(case, tiny_model_dir, tmp_path, capsys):
    args, fragment = GENERATE_CASES[case]
    out = tmp_path / "x.png"
    code, text = run(capsys, "generate", "x", "--model", tiny_model_dir, "--steps", "1", *args, "--out", out)
    assert_one_line_error(code, text, "generate", fragment)
    assert not out.exists()


MODEL_PATHS = ["models/does_not_exist", "./nope", "../nope", "a/b/c", "~/nope"]


@pytest.mark.parametrize("path", MODEL_PATHS)
def test_missing_local_model_path_never_goes_to_the_hub(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no ./models here: models/x is still local (the hub's own top-level name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    code, text = run(capsys, "generate", "x", "--model", path)
    shown = str(tmp_path / "home" / "nope") if path.startswith("~") else path
    assert_one_line_error(code, text, "generate", "does not exist", shown)


def test_missing_model_in_training_never_goes_to_the_hub(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, text = run(capsys, *train_args(data / "good", tmp_path / "run", "model.pretrained=models/typo"))
    assert_one_line_error(code, text, "train", "models/typo", "does not exist")


def test_hub_ids_still_go_to_the_hub(tmp_path, monkeypatch):
    """The rule keeps `org/name` a hub id (and the guard above really catches a hub lookup)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssertionError, match="hub lookup"):
        main(["generate", "x", "--model", "some-org/some-model"])


DATA_CASES = {
    "non-UTF-8 caption": ("latin1", [], ["latin1/metadata.jsonl", "line 2", "not UTF-8", "iconv"]),
    "metadata.jsonl not JSON": ("broken", [], ["broken/metadata.jsonl", "line 2", "not JSON"]),
    "non-UTF-8 csv": ("table/rows.csv", [], ["rows.csv", "line 3", "not UTF-8"]),
    "missing caption, error switch": ("no_caption", ["data.missing_caption=error"], ["1 of 4 rows have no caption",
                                                                                      "1.png", "missing_caption"]),
    "all images unreadable": ("garbage", [], ["none of the 4 images could be read", "0.png", "1.png"]),
    "all images unreadable, in a worker": ("garbage", ["data.num_workers=1"], ["none of the 4 images", "0.png"]),
    "resume=latest_or_fail, no checkpoint": ("good", ["resume=latest_or_fail"], ["no checkpoint in", "run/checkpoints"]),
    "output_dir under a file": ("good", ["output_dir={data}/a_file/run"], ["a_file/run"]),
    "output_dir/checkpoints a file": ("good", ["output_dir={data}/ckpt_is_file"], ["ckpt_is_file/checkpoints"]),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_training_input_is_one_line(case, data, tmp_path, capsys):
    dataset, extra, fragments = DATA_CASES[case]
    code, text = run(capsys, *train_args(data / dataset, tmp_path / "run", *[e.format(data=data) for e in extra]))
    assert_one_line_error(code, text, "train", *fragments)


def test_interrupt_is_exit_130_without_traceback(monkeypatch, capsys):
    import latentsd.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(latentsd.cli, "_generate", interrupted)
    code, text = run(capsys, "generate", "x", "--model", "m")
    assert code == 130 and "latentsd generate: interrupted" in text and "Traceback" not in text


def test_a_real_process_prints_no_traceback_and_debug_shows_it(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "latentsd.cli", "generate", "x", "--model", "models/does_not_exist"]
    plain = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr + plain.stdout
    assert "latentsd generate: error: model 'models/does_not_exist' does not exist" in plain.stderr
    debug = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "FileNotFoundError: model 'models/does_not_exist' does not exist" in debug.stderr


# ---- pickles: refused by default, weights_only when allowed --------------------------------------------
def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_bin_weights_need_allow_pickle_then_give_the_same_images(bin_model, tiny_model_dir, tmp_path, capsys):
    code, text = run(capsys, "generate", "x", "--model", bin_model, "--steps", "2", "--out", tmp_path / "no.png")
    assert_one_line_error(code, text, "generate", "pickled weights", "unet/diffusion_pytorch_model.bin",
                          "--allow-pickle")
    assert main(["generate", "x", "--model", str(bin_model), "--steps", "2", "--allow-pickle",
                 "--out", str(tmp_path / "bin.png")]) == 0
    assert main(["generate", "x", "--model", str(tiny_model_dir), "--steps", "2",
                 "--out", str(tmp_path / "ref.png")]) == 0
    np.testing.assert_array_equal(_pixels(tmp_path / "bin.png"), _pixels(tmp_path / "ref.png"))


@pytest.mark.parametrize("component", ["unet", "text_encoder"])  # diffusers' loader, transformers' loader
def test_allowed_pickle_that_runs_code_is_refused(component, bin_model, tmp_path, capsys):
    model = shutil.copytree(bin_model, tmp_path / "evil")
    marker = tmp_path / "code_ran"
    name = "diffusion_pytorch_model.bin" if component == "unet" else "pytorch_model.bin"
    weights = torch.load(model / component / name, weights_only=True)
    torch.save({**weights, "extra": RunsCode(marker)}, model / component / name)
    code, text = run(capsys, "generate", "x", "--model", model, "--allow-pickle", "--out", tmp_path / "x.png")
    assert_one_line_error(code, text, "generate", "weights_only=True", "system")
    assert not marker.exists()


def test_training_reads_bin_weights_only_with_model_allow_pickle(bin_model, tiny_model_dir, data, tmp_path, capsys):
    from latentsd.training.setup import load_model

    code, text = run(capsys, *train_args(data / "good", tmp_path / "run", f"model.pretrained={bin_model}"))
    assert_one_line_error(code, text, "train", "pickled weights", "model.allow_pickle=true")
    def cfg(src, *extra):
        return load_config("tiny", [f"model.pretrained={src}", "data.dataset=x", *extra])

    loaded = load_model(cfg(bin_model, "model.allow_pickle=true")).unet.state_dict()
    reference = load_model(cfg(tiny_model_dir)).unet.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


# ---- paths: `~` expanded ----------------------------------------------------------------------------------
def test_tilde_is_expanded_for_models_and_config_paths(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    code, _ = run(capsys, "generate", "x", "--model", "~/m", "--steps", "1", "--out", "~/x.png")
    assert code == 0 and (tmp_path / "x.png").is_file()
    cfg = load_config("tiny", ["output_dir=~/run", "model.pretrained=~/m", "data.dataset=~/data", "cache.dir=~/c"])
    assert (cfg.output_dir, cfg.model.pretrained, cfg.data.dataset, cfg.cache.dir) == \
        tuple(str(tmp_path / p) for p in ("run", "m", "data", "c"))


# ---- trained through, counted, warned ------------------------------------------------------------------------
def test_rows_without_a_caption_train_unconditioned_counted_and_warned_once(data, tmp_path, caplog, capsys):
    source = shutil.copytree(data / "no_caption", tmp_path / "data")  # a source not yet warned about
    with caplog.at_level(logging.WARNING):
        ds = CaptionImageDataset(load_caption_dataset(_dcfg(source)), _dcfg(source))
        assert [ds[i]["caption"] for i in range(4)] == ["a red square 0", "", "a red square 2", "a red square 3"]
        assert ds.data_issues == {"missing_caption": 1}
        code, text = run(capsys, *train_args(source, tmp_path / "run", "max_steps=3", "validation.holdout=2"))
    assert code == 0 and "1 row(s) without a caption trained with ''" in text
    warnings = [r.getMessage() for r in caplog.records if "have no caption" in r.getMessage()]
    assert len(warnings) == 1 and "1 of 4 rows" in warnings[0] and "1.png" in warnings[0]


def test_summary_counts_skips_by_reason(data, tmp_path):
    from latentsd.training.trainer import train

    broken = shutil.copytree(data / "no_caption", tmp_path / "mixed")
    (broken / "2.png").write_bytes(b"")  # a 0-byte image: skipped, counted
    summary = train(load_config("tiny", [f"data.dataset={broken}", f"output_dir={tmp_path / 'run'}", "max_steps=2",
                                         "checkpoint_every=2", "optim.train_batch_size=3", "data.shuffle=false"]))
    # one batch of rows 0-2 per epoch and step: the 0-byte row 2 is met (and replaced by row 3) twice
    assert summary["skipped_samples"] == 2
    assert summary["data_issues"] == {"unreadable_image": 2, "missing_caption": 1}


def test_resume_latest_without_a_checkpoint_warns_with_the_folder(data, tmp_path, caplog, capsys):
    with caplog.at_level(logging.WARNING):
        code, _ = run(capsys, *train_args(data / "good", tmp_path / "typo", "resume=latest"))
    assert code == 0
    assert f"resume=latest: no checkpoint in {tmp_path / 'typo' / 'checkpoints'}" in caplog.text


def test_pipeline_refuses_zero_size_and_nan_guidance(tiny):
    from latentsd import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline(**tiny.as_dict())
    for kwargs, fragment in (({"height": 0}, "`height`=0 must be a positive multiple of 8"),
                             ({"width": -64}, "`width`=-64 must be a positive multiple of 8"),
                             ({"guidance_scale": float("nan")}, "finite number")):
        with pytest.raises(ValueError, match=fragment):
            pipe("x", num_inference_steps=1, **kwargs)


def _dcfg(path):
    return load_config("tiny", [f"data.dataset={path}"]).data
