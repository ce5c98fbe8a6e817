import json
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest

from latentsd.cli import main
from latentsd.images import load_grid

ROOT = Path(__file__).resolve().parent.parent


def test_generate_one_image(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "one.png"
    assert main(["generate", "a red circle", "--model", str(tiny_model_dir), "--steps", "3",
                 "--out", str(out)]) == 0
    assert PIL.Image.open(out).size == (64, 64)
    assert json.loads(out.with_suffix(".json").read_text())["prompts"] == ["a red circle"]
    assert str(out) in capsys.readouterr().out


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_generate_grid_with_options(tiny_model_dir, tmp_path, scheduler):
    out = tmp_path / "grid.png"
    args = ["generate", "a blue square", "--model", str(tiny_model_dir), "--steps", "2", "--num-images", "4",
            "--height", "32", "--width", "48", "--negative-prompt", "blurry", "--guidance", "3",
            "--seed", "7", "--scheduler", scheduler, "--out", str(out)]
    assert main(args) == 0
    assert PIL.Image.open(out).size == (2 * 48, 2 * 32)
    cells, prompts = load_grid(out)
    assert len(cells) == 4 and prompts == ["a blue square"] * 4
    again = tmp_path / "again.png"
    assert main(args[:-1] + [str(again)]) == 0  # same seed → same pixels
    assert PIL.Image.open(again).tobytes() == PIL.Image.open(out).tobytes()


def test_bad_input_is_a_clear_error_not_a_traceback(tiny_model_dir, tmp_path, capsys):
    code = main(["generate", "x", "--model", str(tiny_model_dir), "--height", "30", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "divisible by 8" in err and "Traceback" not in err
    assert main(["generate", "x", "--model", str(tmp_path / "missing")]) == 2
    assert "not a diffusers-layout model folder" in capsys.readouterr().err


def test_init_model_and_thin_script_entry_point(tmp_path):
    model = tmp_path / "m"
    assert main(["init-model", "--config", "tiny", "--out", str(model)]) == 0
    out = tmp_path / "s.png"
    run = subprocess.run([sys.executable, str(ROOT / "pipelines" / "text_to_image.py"), "a green triangle",
                          "--model", str(model), "--steps", "2", "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert PIL.Image.open(out).size == (64, 64)
