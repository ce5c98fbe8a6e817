"""Resume unpickles nothing but plain data: a crafted file in a checkpoint folder is refused, never run.

Every crafted file holds a pickle whose unpickling creates a marker file (the controls show it does, and that
accelerate / torch's distributed checkpoint would unpickle it); resuming must refuse with a message naming the file
and the marker must never appear.
"""

import contextlib
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from latentsd.cli import main
from latentsd.config import load_config
from latentsd.data.shapes import make_shapes_dataset, write_imagefolder
from latentsd.training.logs import read_metrics
from latentsd.training.safe_resume import UnsafeCheckpointError, check_dcp_folder, check_resumable
from latentsd.training.trainer import train

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs/train/tiny.yaml"


class Payload:
    """Unpickling it creates ``marker``: what a crafted checkpoint file could do instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _overrides(out, data, *extra) -> list[str]:
    return [f"output_dir={out}", f"data.dataset={data}", "max_steps=3", "checkpoint_every=2",
            "checkpoints_total_limit=0", "optim.train_batch_size=2", "ema.enabled=true", *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 3-step run (EMA on) with a checkpoint at step 2."""
    root = tmp_path_factory.mktemp("run")
    data = write_imagefolder(make_shapes_dataset(8, seed=1), root / "shapes")
    train(load_config(TINY, _overrides(root / "out", data)))
    return root / "out", data


@pytest.fixture
def checkpoint(run, tmp_path):
    """A copy of the run's step-2 checkpoint, to plant files in."""
    return Path(shutil.copytree(run[0] / "checkpoints/step-0000002", tmp_path / "step-0000002"))


def _plant(path: Path, marker: Path, how: str) -> None:
    if how == "torch.save":  # a zip archive, as accelerate writes its files
        torch.save(Payload(marker), path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))


def test_the_crafted_pickle_runs_code_when_unpickled(tmp_path):
    """The control: without the checks, unpickling the planted files creates the marker."""
    for how in ("torch.save", "pickle"):
        marker = tmp_path / f"ran-{how}"
        _plant(tmp_path / "file", marker, how)
        torch.load(tmp_path / "file", weights_only=False) if how == "torch.save" else \
            pickle.loads((tmp_path / "file").read_bytes())
        assert marker.exists()


def test_a_checkpoint_holds_no_pickled_counters_and_resumes(run, checkpoint, tmp_path):
    names = {p.name for p in checkpoint.iterdir()}
    assert names == {"config.yaml", "train_state.json", "model.safetensors", "ema.safetensors", "optimizer.bin",
                     "scheduler.bin", "random_states_0.pkl"}  # no custom_checkpoint_0.pkl
    check_resumable(checkpoint)
    out, data = run
    train(load_config(TINY, _overrides(tmp_path / "resumed", data, f"resume={checkpoint}")))
    assert read_metrics(tmp_path / "resumed")[3]["loss"] == read_metrics(out)[3]["loss"]


@pytest.mark.parametrize("name, how, message", [
    ("custom_checkpoint_0.pkl", "torch.save", "custom_checkpoint_0.pkl is an accelerate custom-state pickle, which "
                                              "accelerate loads with weights_only=False"),
    ("optimizer.bin", "torch.save", "optimizer.bin holds more than tensors and plain values"),
    ("optimizer.bin", "pickle", "optimizer.bin is not a torch.save archive"),
    ("scheduler.bin", "torch.save", "scheduler.bin holds more than tensors and plain values"),
    ("random_states_0.pkl", "torch.save", "random_states_0.pkl holds more than tensors and plain values"),
    ("random_states_0.pkl", "pickle", "random_states_0.pkl is not a torch.save archive"),
    ("extra.pt", "torch.save", "extra.pt is a pickle-type file a latentsd checkpoint never holds"),
])
def test_resume_refuses_a_crafted_pickle_and_never_runs_it(run, checkpoint, tmp_path, name, how, message):
    marker = tmp_path / "code-ran"
    _plant(checkpoint / name, marker, how)
    out = tmp_path / "resumed"
    with pytest.raises(UnsafeCheckpointError) as err:
        train(load_config(TINY, _overrides(out, run[1], f"resume={checkpoint}")))
    assert str(err.value).startswith(f"refusing to resume from {checkpoint}: {message}")
    assert not marker.exists() and not (out / "logs").exists()  # refused before anything ran


def test_the_cli_refuses_in_one_line_with_exit_2(run, checkpoint, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    _plant(checkpoint / "custom_checkpoint_0.pkl", marker, "torch.save")
    code = main(["train", "--config", str(TINY), *_overrides(tmp_path / "resumed", run[1], f"resume={checkpoint}")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "custom_checkpoint_0.pkl is an accelerate custom-state" in err
    assert not marker.exists()


def test_a_checkpoint_without_train_state_json_is_refused(run, checkpoint, tmp_path):
    (checkpoint / "train_state.json").unlink()  # what latentsd wrote before (its counters were pickled)
    with pytest.raises(UnsafeCheckpointError, match="train_state.json is missing"):
        train(load_config(TINY, _overrides(tmp_path / "resumed", run[1], f"resume={checkpoint}")))


# ---- FSDP's distributed-checkpoint folders ---------------------------------------------------------------
def _dcp_save(state: dict, folder: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(folder))
    return folder


def test_a_plain_distributed_checkpoint_passes(tmp_path):
    """Tensors and non-tensor entries (an optimizer's param groups: DCP pickles them) of plain data."""
    folder = _dcp_save({"w": torch.ones(3), "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "fused": None}]},
                       tmp_path / "optimizer_0")
    check_dcp_folder(folder)


def test_crafted_distributed_checkpoint_metadata_is_refused(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    folder = _dcp_save({"w": torch.ones(3)}, tmp_path / "optimizer_0")
    marker = tmp_path / "code-ran"
    _plant(folder / ".metadata", marker, "pickle")
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata is not plain distributed-checkpoint metadata "
                                                    r"\(unsupported global builtins\.exec\)"):
        check_dcp_folder(folder)
    assert not marker.exists()
    with contextlib.suppress(AttributeError):  # exec returned None, not Metadata: too late, it ran
        FileSystemReader(str(folder)).read_metadata()  # the control: torch's own reader runs it (plain pickle.load)
    assert marker.exists()


def test_a_crafted_non_tensor_entry_of_a_distributed_checkpoint_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "code-ran"
    folder = _dcp_save({"w": torch.ones(3), "extra": Payload(marker)}, tmp_path / "pytorch_model_fsdp_0")
    with pytest.raises(UnsafeCheckpointError, match="entry extra.*not plain data"):
        check_dcp_folder(folder)
    assert not marker.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"w": torch.zeros(3), "extra": None}, checkpoint_id=str(folder))  # the control: DCP runs it
    assert marker.exists()


def test_resume_checks_the_distributed_checkpoint_folders_it_would_load(checkpoint, tmp_path):
    marker = tmp_path / "code-ran"
    _dcp_save({"extra": Payload(marker)}, checkpoint / "optimizer_0")
    with pytest.raises(UnsafeCheckpointError, match="optimizer_0 holds .*entry extra"):
        check_resumable(checkpoint)
    assert not marker.exists() and os.path.isdir(checkpoint / "optimizer_0")
