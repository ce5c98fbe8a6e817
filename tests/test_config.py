"""Typed YAML config: shipped files, overrides, error messages, save/load round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from latentsd.config import (
    ConfigError,
    TrainConfig,
    config_help,
    config_to_dict,
    load_config,
    opt,
    save_config,
)

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted((ROOT / "configs" / "train").glob("*.yaml"))
MIN = {"data": {"dataset": "data/x"}}  # the one key without a usable default


def test_shipped_configs_present():
    names = {p.name for p in TRAIN_CONFIGS}
    assert {"tiny.yaml", "sd15_finetune.yaml"} <= names


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_round_trips(path, tmp_path):
    from latentsd.training.vae import VAETrainConfig

    cls = VAETrainConfig if path.stem.endswith("_vae") else TrainConfig  # train-vae has its own config
    cfg = load_config(path, cls=cls)
    assert isinstance(cfg, cls)
    assert load_config(save_config(cfg, tmp_path / "c.yaml"), cls=cls) == cfg


def test_tiny_values():
    cfg = load_config(ROOT / "configs/train/tiny.yaml")
    assert (cfg.model.config, cfg.model.pretrained) == ("tiny", "")
    assert (cfg.data.resolution, cfg.optim.train_batch_size) == (64, 4)
    assert (cfg.max_steps, cfg.checkpoint_every, cfg.optim.learning_rate) == (20, 10, 1e-3)


def test_sd15_values():
    cfg = load_config(ROOT / "configs/train/sd15_finetune.yaml")
    assert cfg.model.pretrained and cfg.model.gradient_checkpointing
    assert cfg.mixed_precision == "fp16"
    o = cfg.optim
    assert (o.learning_rate, o.lr_scheduler, o.lr_warmup_steps) == (1e-5, "constant_with_warmup", 500)
    assert (o.train_batch_size, o.gradient_accumulation_steps, o.use_8bit_adam) == (4, 4, False)
    assert (cfg.max_steps, cfg.checkpoint_every, cfg.checkpoints_total_limit) == (15000, 500, 3)
    assert (cfg.data.random_flip, cfg.data.caption_dropout, cfg.data.resolution) == (True, 0.1, 512)


def test_top_level_keys_are_the_specified_ones():
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert names == [
        "output_dir", "seed", "max_steps", "checkpoint_every", "checkpoints_total_limit", "resume",
        "mixed_precision", "log_every", "report_to", "model", "data", "optim", "export",
        "ema", "lora", "loss", "cache", "validation", "dreambooth", "ti",
    ]


def test_every_field_has_help():
    # `config_help` is the documentation: every key must carry a help string
    for line in config_help().splitlines():
        assert "#" in line and line.split("#", 1)[1].strip(), line


@pytest.mark.parametrize(
    "override, getter, expected",
    [
        ("seed=3", lambda c: c.seed, 3),
        ("optim.learning_rate=1e-4", lambda c: c.optim.learning_rate, 1e-4),
        ("optim.learning_rate=2", lambda c: c.optim.learning_rate, 2.0),  # float fields accept ints
        ("data.random_flip=true", lambda c: c.data.random_flip, True),
        ("data.max_samples=null", lambda c: c.data.max_samples, None),
        ("data.max_samples=7", lambda c: c.data.max_samples, 7),
        ("model.variant=fp16", lambda c: c.model.variant, "fp16"),
        ("mixed_precision=bf16", lambda c: c.mixed_precision, "bf16"),
        ("model.prediction_type=v_prediction", lambda c: c.model.prediction_type, "v_prediction"),
        ("data.dataset=some/dir with spaces", lambda c: c.data.dataset, "some/dir with spaces"),
        ("model={pretrained: a/b}", lambda c: (c.model.pretrained, c.model.config), ("a/b", "tiny")),  # merges
    ],
)
def test_overrides(override, getter, expected):
    cfg = load_config(MIN, [override])
    assert getter(cfg) == expected
    assert type(getter(cfg)) is type(expected)


def test_override_applies_after_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: 1\ndata: {dataset: a}\n")
    cfg = load_config(p, ["seed=2", "data.dataset=b"])
    assert (cfg.seed, cfg.data.dataset) == (2, "b")


@pytest.mark.parametrize(
    "raw, overrides, key, suggestion",
    [
        ({**MIN, "max_step": 3}, [], "'max_step'", "max_steps"),
        (MIN, ["optim.learnig_rate=1"], "'optim.learnig_rate'", "optim.learning_rate"),
        ({"data": {"dataset": "x", "resolutoin": 64}}, [], "'data.resolutoin'", "data.resolution"),
    ],
)
def test_unknown_key_named_with_suggestion(raw, overrides, key, suggestion):
    with pytest.raises(ConfigError) as e:
        load_config(raw, overrides)
    msg = str(e.value)
    assert key in msg and f"did you mean '{suggestion}'" in msg
    assert "Allowed keys" in msg


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ConfigError, match="learning_rate, adam_beta1"):
        load_config(MIN, ["optim.zzz=1"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("seed=abc", "seed: expected int, got 'abc'"),
        ("seed=1.5", "seed: expected int"),
        ("data.random_flip=1", "data.random_flip: expected bool, got 1"),
        ("optim.learning_rate=fast", "optim.learning_rate: expected float"),
        ("output_dir=5", "output_dir: expected str, got 5"),
        ("data.max_samples=many", "data.max_samples: expected int or null"),
        ("model=3", "model: expected a mapping"),
        ("seed.x=1", "'seed' is a value, not a section"),
    ],
)
def test_wrong_type(override, fragment):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(MIN, [override])
    assert fragment in str(e.value)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("mixed_precision=fp32", "mixed_precision: must be one of 'no', 'fp16', 'bf16', got 'fp32'"),
        ("mixed_precision=no", "quote the value"),  # bare `no` is YAML false
        ("model.attention=flash", "'sdpa', 'xformers', 'math'"),
        ("optim.lr_scheduler=cosine_annealing", "'constant_with_warmup'"),
        ("model.prediction_type=eps", "'epsilon'"),
    ],
)
def test_literal_error_lists_choices(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(MIN, [override])
    assert fragment in str(e.value)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("max_steps=0", "max_steps: must be >= 1"),
        ("checkpoint_every=0", "checkpoint_every: must be >= 1"),
        ("data.caption_dropout=1.5", "data.caption_dropout: must be in [0, 1]"),
        ("data.resolution=100", "data.resolution: must be a positive multiple of 8"),
        ("data.dataset=''", "data.dataset: is empty"),
        ("resume=''", "resume: is empty"),
        ("resume=Latest", "write it lowercase"),
        ("report_to=slack", "report_to: must be one of"),
        ("optim.gradient_accumulation_steps=0", "optim.gradient_accumulation_steps: must be >= 1"),
    ],
)
def test_validation(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(MIN, [override])
    assert fragment in str(e.value)


def test_validation_reports_all_errors_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(MIN, ["max_steps=0", "data.resolution=30"])
    assert "max_steps" in str(e.value) and "data.resolution" in str(e.value)


@pytest.mark.parametrize("resume", ["none", "latest", "outputs/run/checkpoint-500"])
def test_resume_forms(resume):
    assert load_config(MIN, [f"resume={resume}"]).resume == resume


@pytest.mark.parametrize("bad", ["seed", "seed:3", "=3", "a..b=1", "9x=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="e.g. optim.learning_rate=1e-4"):
        load_config(MIN, [bad])


def test_yaml_float_exponent_without_dot(tmp_path):
    # plain PyYAML reads `1e-5` as a string; our loader must read it as a float
    p = tmp_path / "c.yaml"
    p.write_text("data: {dataset: x}\noptim: {learning_rate: 1e-5}\n")
    assert load_config(p).optim.learning_rate == 1e-5


def test_save_load_round_trip_with_tricky_values(tmp_path):
    cfg = load_config(
        MIN,
        ["model.revision='1e5'", "data.dataset='null'", "optim.adam_epsilon=1e-12", "resume=a/b c", "seed=-3"],
    )
    path = save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert load_config(path) == cfg
    assert cfg.model.revision == "1e5" and cfg.data.dataset == "null"  # strings stay strings
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind
    assert yaml.safe_load(path.read_text()) == config_to_dict(cfg)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    save_config(load_config(MIN), path)
    before = path.read_text()
    monkeypatch.setattr("latentsd.config.os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_config(load_config(MIN, ["seed=9"]), path)
    assert path.read_text() == before and list(tmp_path.iterdir()) == [path]


def test_empty_section_and_missing_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\ndata: {dataset: x}\n")  # `model:` with children commented out -> defaults
    assert load_config(p).model == TrainConfig().model
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    p.write_text("seed: 1\ndata: {dataset: x}\nseed: 2\n")  # PyYAML would silently keep the last
    with pytest.raises(ConfigError, match="duplicate key 'seed' at line 3"):
        load_config(p)


# A new section / new field types need no loader changes: this is the "one-line" extension point.
@dataclasses.dataclass
class _EMA:
    decay: float = opt(0.9999, "EMA decay")
    power: Optional[float] = opt(None, "warmup power")
    mode: Literal["a", "b"] = opt("a", "mode")
    betas: tuple[float, float] = opt((0.9, 0.99), "pair")
    names: list[str] = opt(["x"], "list of names")


@dataclasses.dataclass
class _Extended(TrainConfig):
    ema: _EMA = dataclasses.field(default_factory=_EMA, metadata={"help": "ema"})


def test_new_section_and_container_types(tmp_path):
    cfg = load_config(MIN, ["ema.decay=0.99", "ema.betas=[0.8, 1]", "ema.names=[a, b]"], cls=_Extended)
    assert cfg.ema.decay == 0.99 and cfg.ema.betas == (0.8, 1.0) and cfg.ema.names == ["a", "b"]
    assert load_config(save_config(cfg, tmp_path / "c.yaml"), cls=_Extended) == cfg
    with pytest.raises(ConfigError, match=r"ema.betas: expected 2 items"):
        load_config(MIN, ["ema.betas=[1]"], cls=_Extended)
    with pytest.raises(ConfigError, match=r"ema.names\[1\]: expected str"):
        load_config(MIN, ["ema.names=[a, 2]"], cls=_Extended)
    with pytest.raises(ConfigError, match="unknown key 'ema.decy'"):
        load_config(MIN, ["ema.decy=1"], cls=_Extended)
