"""The one atomic writer (latentsd/io.py): old or new, never half; no temp left by a failure; a killed writer's temps
are removed by the next writer; a full disk keeps the previous version and says so."""

import errno
import os
import resource
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentsd.io import (
    HOST,
    DiskFullError,
    clean_stale_temps,
    write_bytes_atomically,
    write_dir_atomically,
    write_file_atomically,
)

ROOT = Path(__file__).resolve().parent.parent


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@contextmanager
def file_size_limit(limit: int):
    """Writes past ``limit`` bytes fail with EFBIG, as on a full disk (the hard limit is kept, so it can be undone)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_failed_write_keeps_the_old_version_and_leaves_no_temp(tmp_path):
    file, folder = tmp_path / "a.txt", tmp_path / "d"
    write_bytes_atomically(file, b"old")
    write_dir_atomically(folder, lambda tmp: (tmp.mkdir(), (tmp / "x").write_text("old")))

    def broken_file(tmp):
        tmp.write_bytes(b"ne")
        raise RuntimeError("writer bug")

    def broken_dir(tmp):
        tmp.mkdir()
        (tmp / "x").write_text("ne")
        raise RuntimeError("writer bug")

    with pytest.raises(RuntimeError, match="writer bug"):
        write_file_atomically(file, broken_file)
    with pytest.raises(RuntimeError, match="writer bug"):
        write_dir_atomically(folder, broken_dir)
    assert file.read_bytes() == b"old" and (folder / "x").read_text() == "old"
    assert _hidden(tmp_path) == []
    write_dir_atomically(folder, lambda tmp: (tmp.mkdir(), (tmp / "y").write_text("new")))  # replaces the folder
    assert [p.name for p in folder.iterdir()] == ["y"] and _hidden(tmp_path) == []


def test_a_kill_during_an_export_leaves_a_temp_folder_that_the_next_export_removes(tmp_path, tiny):
    from latentsd.pipeline import LatentDiffusionPipeline
    from latentsd.training.checkpoint import save_pipeline_atomically

    model = tmp_path / "model"
    # the export's own writer, stalled half-way through the folder, then killed
    script = ("import sys, time; from pathlib import Path; from latentsd.io import write_dir_atomically\n"
              "def write(tmp):\n"
              "    tmp.mkdir(); (tmp / 'model_index.json').write_text('{}'); print('writing', flush=True)\n"
              "    time.sleep(600)\n"
              "write_dir_atomically(Path(sys.argv[1]), write)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(model)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _hidden(tmp_path) == [f".tmp-model-{HOST}-{proc.pid}"] and not model.exists()

    pipe = LatentDiffusionPipeline(**tiny.as_dict())
    save_pipeline_atomically(pipe, model, torch.float32)
    assert _hidden(tmp_path) == []  # the stale temp of the killed run is gone
    saved = load_file(model / "unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in tiny.unet.state_dict().items())


def test_only_dead_processes_temps_are_removed_and_an_interrupted_swap_gets_its_old_folder_back(tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        names = {"live": f".tmp-shard-{HOST}-{alive.pid}", "dead": f".tmp-shard-{HOST}-{dead.pid}",
                 "other_host": f".tmp-shard-elsewhere_{HOST}-{dead.pid}", "old": f".old-model-{HOST}-{dead.pid}"}
        for name in names.values():
            (tmp_path / name).mkdir()
        (tmp_path / names["old"] / "weights").write_text("the previous export")
        removed = clean_stale_temps(tmp_path)
        assert sorted(p.name for p in removed) == sorted([names["dead"], names["old"]])
        assert _hidden(tmp_path) == sorted([names["live"], names["other_host"]])
        # killed between the two renames of a folder swap: model/ was missing, its old version is back
        assert (tmp_path / "model/weights").read_text() == "the previous export"
    finally:
        alive.kill()
        alive.wait()


def test_a_full_disk_half_way_through_a_write_keeps_the_previous_version_and_says_so(tmp_path):
    file = tmp_path / "shard.safetensors"
    save_file({"x": torch.zeros(4)}, str(file))
    before = file.read_bytes()

    def half_then_enospc(tmp):
        tmp.write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match="no room left while writing .*shard.safetensors.*previous version"):
        write_file_atomically(file, half_then_enospc)
    # a real write failing part-way: the OS refuses bytes past a file-size limit (EFBIG, as a full disk)
    folder = tmp_path / "ckpt"
    write_dir_atomically(folder, lambda tmp: (tmp.mkdir(), save_file({"x": torch.zeros(4)}, str(tmp / "w.safetensors"))))
    with file_size_limit(50_000), pytest.raises(DiskFullError, match="File too large"):
        write_dir_atomically(folder, lambda tmp: (tmp.mkdir(), save_file({"x": torch.zeros(100_000)},
                                                                         str(tmp / "w.safetensors"))))
    with file_size_limit(50_000), pytest.raises(DiskFullError):
        write_file_atomically(file, lambda tmp: save_file({"x": torch.zeros(100_000)}, str(tmp)))
    assert file.read_bytes() == before and torch.equal(load_file(folder / "w.safetensors")["x"], torch.zeros(4))
    assert _hidden(tmp_path) == []


def test_a_full_disk_at_a_training_checkpoint_keeps_the_previous_checkpoint_and_export(tmp_path, tiny_model_dir):
    from latentsd.config import load_config
    from latentsd.data.shapes import make_shapes_dataset, write_imagefolder
    from latentsd.training.checkpoint import list_checkpoints, resolve_resume
    from latentsd.training.trainer import Trainer

    data = write_imagefolder(make_shapes_dataset(4, seed=0), tmp_path / "data")
    out = tmp_path / "run"
    trainer = Trainer(load_config(ROOT / "configs/train/tiny.yaml", [
        f"output_dir={out}", f"data.dataset={data}", "max_steps=2", "checkpoint_every=2", "optim.train_batch_size=2",
        f"model.pretrained={tiny_model_dir}", "ema.enabled=true"]))
    trainer.run()
    files = {p: p.read_bytes() for p in out.rglob("*")
             if p.is_file() and {"checkpoints", "model"} & set(p.relative_to(out).parts)}
    trainer.state.step = 4
    with file_size_limit(100_000):  # the UNet weights (~3 MB) cannot be written
        with pytest.raises(DiskFullError, match="step-0000004"):
            trainer.checkpoint()
        with pytest.raises(DiskFullError, match="model"):
            trainer.export(out / "model")
    assert [p.name for p in list_checkpoints(out)] == ["step-0000002"] and resolve_resume("latest", out).name == \
        "step-0000002"
    assert all(p.read_bytes() == content for p, content in files.items())  # checkpoint and export untouched
    assert _hidden(out / "checkpoints") == [] and not [p for p in out.iterdir() if p.name.startswith((".tmp", ".old"))]
