"""Before a run loads anything: output folders writable (a file in the way named), free disk for a checkpoint and the
export (sizes from the config, no weights read), through the trainer and the CLI."""

from collections import namedtuple
from pathlib import Path

import pytest

from latentsd.cli import main
from latentsd.config import load_config
from latentsd.training import preflight as preflight_module
from latentsd.training.estimate import estimate
from latentsd.training.preflight import PreflightError, check_disk, check_output_dir

ROOT = Path(__file__).resolve().parent.parent
Usage = namedtuple("Usage", "total used free")


def _cfg(out, *extra):
    return load_config(ROOT / "configs/train/tiny.yaml", [f"output_dir={out}", *extra])


@pytest.fixture
def no_model_load(monkeypatch):
    """The checks run before any model is loaded: loading one fails the test."""
    from latentsd.training import trainer

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the preflight checks failed")

    monkeypatch.setattr(trainer, "load_model", refuse)


def test_a_file_in_the_way_is_named_before_any_model_loads(tmp_path, no_model_load):
    from latentsd.training.trainer import Trainer

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(PreflightError, match=r"output_dir .*a_file/run cannot be created: .*a_file is a file"):
        Trainer(_cfg(tmp_path / "a_file/run"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run/checkpoints").write_text("x")
    with pytest.raises(PreflightError, match=r"output_dir/checkpoints .*run/checkpoints cannot be created"):
        Trainer(_cfg(tmp_path / "run"))
    check_output_dir(_cfg(tmp_path / "fresh/run"))  # missing folders are fine (created by the run) ...
    assert not (tmp_path / "fresh").exists()  # ... and not created by the check


def test_an_unwritable_output_dir_is_a_clear_error(tmp_path, monkeypatch):
    # the test runs as root, for whom chmod forbids nothing: the probe write itself is refused
    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(preflight_module.tempfile, "TemporaryFile", refuse)
    with pytest.raises(PreflightError, match=r"output_dir .*ro is not writable: .*Permission denied.*output_dir="):
        check_output_dir(_cfg(tmp_path / "ro"))


def test_free_disk_must_hold_a_checkpoint_and_the_export(tmp_path, monkeypatch, no_model_load, capsys):
    from latentsd.training.trainer import Trainer

    cfg = _cfg(tmp_path / "run", "ema.enabled=true")
    need = estimate(cfg, trace=False).disk_bytes
    monkeypatch.setattr(preflight_module.shutil, "disk_usage", lambda path: Usage(10 * need, 9 * need, need - 1))
    with pytest.raises(PreflightError, match=r"not enough free disk space .* one checkpoint \(~.*\) plus the export"):
        Trainer(cfg)
    assert main(["train", "--config", str(ROOT / "configs/train/tiny.yaml"), f"output_dir={tmp_path / 'run'}",
                 "ema.enabled=true"]) == 2
    err = capsys.readouterr().err
    assert "not enough free disk space" in err and "Traceback" not in err
    monkeypatch.setattr(preflight_module.shutil, "disk_usage", lambda path: Usage(10 * need, 9 * need, need))
    check_disk(cfg, estimate(cfg, trace=False))  # exactly enough passes
    # LoRA checkpoints hold the adapters' optimizer states, not the UNet's: far less disk
    assert estimate(_cfg(tmp_path / "run", "lora.enabled=true"), trace=False).disk_bytes < need / 2


def test_a_pretrained_folder_is_sized_from_its_configs_as_the_loaded_model(tmp_path, tiny_model_dir):
    from latentsd.models import load_components
    from latentsd.training.estimate import MetaRun

    run = MetaRun.build(_cfg(tmp_path, f"model.pretrained={tiny_model_dir}"))  # meta device: no weights read
    loaded = load_components(str(tiny_model_dir))
    assert run.base_counts == {name: sum(p.numel() for p in getattr(loaded, name).parameters())
                               for name in ("unet", "vae", "text_encoder")}


def test_on_a_gpu_the_estimate_is_logged_with_settings_that_fit_when_it_does_not(tmp_path, monkeypatch, caplog):
    import logging
    from types import SimpleNamespace

    from latentsd.training.preflight import preflight

    cfg = _cfg(tmp_path / "run", "model.config=shapes", "optim.train_batch_size=16")
    peak = estimate(cfg).peak
    cuda = preflight_module.torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)  # a stand-in GPU just too small for this run
    monkeypatch.setattr(cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=int(peak * 1.05)))
    with caplog.at_level(logging.INFO, logger="latentsd.training.preflight"):
        assert preflight(cfg).peak == peak
    assert "estimated GPU memory" in caplog.text and "| **peak**" in caplog.text
    assert "exceeds 90% of this GPU" in caplog.text and "settings that fit: model.gradient_checkpointing=true" in \
        caplog.text
