"""Every ```python block of README.md runs as written, from a copy of the repository root.

The blocks use paths relative to the repository root (the shipped model ``latentsd/assets/shapes_base``)
and write files into the current directory, so each runs in its own process in a temporary folder
where those paths resolve (a symlink to the shipped assets) and where what it writes can be checked.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"^```python\n(.*?)^```$", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2 and all("LatentDiffusionPipeline" in block for block in BLOCKS)


@pytest.fixture
def repo_like_cwd(tmp_path):
    """A fresh folder laid out like the repository root for the paths the README uses."""
    cwd = tmp_path / "cwd"
    (cwd / "latentsd").mkdir(parents=True)
    (cwd / "latentsd" / "assets").symlink_to(ROOT / "latentsd" / "assets", target_is_directory=True)
    return cwd


def _run_block(block: str, cwd: Path, tmp_path: Path) -> str:
    script = tmp_path / "block.py"  # outside cwd: imports resolve to the installed latentsd, not cwd/latentsd
    script.write_text(block)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"README block failed:\n{block}\n--- stderr ---\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_as_written(index, repo_like_cwd, tmp_path):
    block = BLOCKS[index]
    stdout = _run_block(block, repo_like_cwd, tmp_path)
    for name in re.findall(r'\.save\("([^"]+\.png)"\)', block):  # images it says it saves exist and open
        with Image.open(repo_like_cwd / name) as image:
            assert image.size[0] > 0
    for folder in re.findall(r'save_pretrained\("([^"]+)"\)', block):
        assert (repo_like_cwd / folder / "model_index.json").is_file()
    if "score(" in block:  # the first example prints the adherence of its images, claimed in its comment
        claimed = re.search(r"print\(score.*#.*: ([0-9.]+)$", block, flags=re.M).group(1)
        assert float(stdout.split()[-1]) == float(claimed)
