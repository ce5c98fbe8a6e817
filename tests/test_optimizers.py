"""optim.optimizer: each optimizer from its own package, learning on the tiny model, resuming bit for bit; the
schedule-free train/eval switch around validation and export."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentsd.config import ConfigError, OptimConfig, load_config
from latentsd.models import build_components
from latentsd.training.logs import read_metrics
from latentsd.training.optimizers import EvalWeights, build_optimizer, lr_schedule_warmup, optimizer_name
from latentsd.training.trainer import Trainer, train

ROOT = Path(__file__).resolve().parent.parent
LEARNING_RATES = {"adamw": 1e-3, "prodigy": 1.0, "schedulefree_adamw": 1e-3, "adafactor": 1e-3, "lion": 1e-4}


def _package_class(name):
    """The class each name must build, imported here from its package (the reference)."""
    if name == "adamw":
        return torch.optim.AdamW
    if name == "prodigy":
        from prodigyopt import Prodigy
        return Prodigy
    if name == "schedulefree_adamw":
        from schedulefree import AdamWScheduleFree
        return AdamWScheduleFree
    if name == "adafactor":
        from transformers.optimization import Adafactor
        return Adafactor
    from lion_pytorch import Lion
    return Lion


def _optim(**changes):
    return dataclasses.replace(OptimConfig(), **changes)


@pytest.mark.parametrize("name", list(LEARNING_RATES))
def test_each_optimizer_is_its_packages_class_with_the_configured_settings(name):
    o = _optim(optimizer=name, learning_rate=0.5, adam_beta1=0.8, adam_beta2=0.95, adam_weight_decay=0.03)
    opt = build_optimizer(torch.nn.Linear(3, 2).parameters(), o)
    assert type(opt) is _package_class(name)
    group = opt.param_groups[0]
    assert group["lr"] == 0.5 and group["weight_decay"] == 0.03
    if name != "adafactor":  # Adafactor has no betas; the rest take adam_beta1/2
        assert tuple(group["betas"]) == (0.8, 0.95)
    else:  # an explicit learning rate: relative steps and parameter scaling off
        assert group["relative_step"] is False and group["scale_parameter"] is False


def test_use_8bit_adam_is_the_older_name_of_adamw8bit(monkeypatch):
    assert optimizer_name(_optim(use_8bit_adam=True)) == "adamw8bit"
    assert optimizer_name(_optim(optimizer="lion")) == "lion"
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as where it is not installed
    with pytest.raises(ValueError, match="adamw8bit needs the bitsandbytes package: pip install bitsandbytes"):
        build_optimizer(torch.nn.Linear(3, 2).parameters(), _optim(use_8bit_adam=True))
    with pytest.raises(ConfigError, match="use_8bit_adam: is the older name of optimizer=adamw8bit"):
        load_config(ROOT / "configs/train/tiny.yaml", ["optim.use_8bit_adam=true", "optim.optimizer=prodigy"])


@pytest.mark.parametrize("name,module,pip", [("prodigy", "prodigyopt", "pip install prodigyopt"),
                                             ("schedulefree_adamw", "schedulefree", "pip install schedulefree"),
                                             ("lion", "lion_pytorch", "pip install lion-pytorch")])
def test_a_missing_package_is_named_with_its_install_command(monkeypatch, name, module, pip):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ValueError, match=f"optim.optimizer={name} needs the {module} package: {pip}"):
        build_optimizer(torch.nn.Linear(3, 2).parameters(), _optim(optimizer=name))


def test_optimizer_args_reach_the_constructor_and_unknown_names_are_refused():
    opt = build_optimizer(torch.nn.Linear(3, 2).parameters(),
                          _optim(optimizer="prodigy", learning_rate=1.0, optimizer_args={"d_coef": 2.0}))
    assert opt.param_groups[0]["d_coef"] == 2.0
    with pytest.raises(ValueError, match=r"Prodigy \(prodigy\) takes no dcoef; it takes: .*d_coef"):
        build_optimizer(torch.nn.Linear(3, 2).parameters(), _optim(optimizer="prodigy", optimizer_args={"dcoef": 2}))


def test_schedule_free_has_no_lr_schedule_and_warms_up_itself():
    sf = _optim(optimizer="schedulefree_adamw", lr_warmup_steps=7)
    opt = build_optimizer(torch.nn.Linear(3, 2).parameters(), sf)
    assert opt.param_groups[0]["warmup_steps"] == 7 and lr_schedule_warmup(sf) == 0
    assert lr_schedule_warmup(_optim(lr_warmup_steps=7)) == 7
    with pytest.raises(ConfigError, match="lr_scheduler: is 'cosine', but schedule-free AdamW replaces the LR sched"):
        load_config(ROOT / "configs/train/tiny.yaml",
                    ["optim.optimizer=schedulefree_adamw", "optim.lr_scheduler=cosine"])
    with pytest.raises(ConfigError, match="ema.enabled: schedule-free AdamW already averages the weights"):
        load_config(ROOT / "configs/train/tiny.yaml", ["optim.optimizer=schedulefree_adamw", "ema.enabled=true"])


# ---- learning: one fixed batch of the tiny UNet, 20 steps --------------------------------------------------
@pytest.fixture(scope="module")
def fixed_batch():
    parts = build_components("tiny", seed=0)
    c, g = parts.unet.config, torch.Generator().manual_seed(0)
    latents = torch.randn(4, c.in_channels, c.sample_size, c.sample_size, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.tensor([100, 300, 600, 900])
    embeds = torch.randn(4, 8, c.cross_attention_dim, generator=g)
    return parts.unet.state_dict(), (parts.scheduler.add_noise(latents, noise, t), t, embeds, noise)


@pytest.mark.parametrize("name", list(LEARNING_RATES))
def test_every_optimizer_lowers_the_tiny_models_loss_in_20_steps(fixed_batch, name):
    weights, (noisy, t, embeds, noise) = fixed_batch
    unet = build_components("tiny", seed=0).unet
    unet.load_state_dict(weights)

    def loss():
        return torch.nn.functional.mse_loss(unet(noisy, t, encoder_hidden_states=embeds).sample, noise)

    opt = build_optimizer(unet.parameters(), _optim(optimizer=name, learning_rate=LEARNING_RATES[name]))
    modes = EvalWeights(opt)
    with torch.no_grad():
        before = loss().item()
    for _ in range(20):
        loss().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad(), modes():  # schedule-free: measured at the weights it exports
        after = loss().item()
    assert after < 0.6 * before, (name, before, after)


# ---- through the trainer: exact resume, schedule-free's eval weights -------------------------------------
def _cfg(out, data, name, *extra):
    return load_config(ROOT / "configs/train/tiny.yaml", [
        f"output_dir={out}", f"data.dataset={data}", "max_steps=4", "checkpoint_every=2", "checkpoints_total_limit=0",
        "optim.train_batch_size=2", f"optim.optimizer={name}", f"optim.learning_rate={LEARNING_RATES[name]}",
        "log_every=1", *extra])


def _unet(out):
    return load_file(Path(out) / "model/unet/diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("name", ["prodigy", "schedulefree_adamw", "adafactor", "lion"])
def test_resume_is_bit_identical_with_each_optimizer(tmp_path, shapes_dir, name):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    extra = ("optim.lr_warmup_steps=2",) if name in ("prodigy", "schedulefree_adamw") else ()  # their warm-up paths
    train(_cfg(full, shapes_dir, name, *extra))
    train(_cfg(resumed, shapes_dir, name, *extra, f"resume={full}/checkpoints/step-0000002"))
    a, b = read_metrics(full), read_metrics(resumed)
    assert sorted(b) == [3, 4] and all(a[s]["loss"] == b[s]["loss"] for s in b)
    wa, wb = _unet(full), _unet(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], v) for k, v in _unet_at_init().items())  # it trained


def _unet_at_init():
    return build_components("tiny", seed=0).unet.state_dict()


def test_schedule_free_validation_never_changes_training_and_export_is_the_eval_weights(tmp_path, shapes_dir):
    name, held = "schedulefree_adamw", ("validation.holdout=2",)
    plain = tmp_path / "plain"
    train(_cfg(plain, shapes_dir, name, *held))
    validated = Trainer(_cfg(tmp_path / "validated", shapes_dir, name, *held, "validation.every=1"))
    validated.run()
    a, b = read_metrics(plain), read_metrics(tmp_path / "validated")
    assert all("val_loss" in b[s] for s in b) and [a[s]["loss"] for s in a] == [b[s]["loss"] for s in b]
    exported = _unet(tmp_path / "validated")
    assert all(torch.equal(exported[k], v) for k, v in _unet(plain).items())
    # after the run the model holds the train-mode weights y; the package's own eval() gives the exported x
    unet = validated.acc.unwrap_model(validated.unet)
    train_mode = {k: v.clone() for k, v in unet.state_dict().items()}
    assert any(not torch.equal(train_mode[k], exported[k]) for k in exported)
    validated.optimizer.optimizer.eval()
    assert all(torch.equal(v, exported[k]) for k, v in unet.state_dict().items())


# ---- shown to learn on the shapes world (slow: minutes on 2 cores) -----------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name,overrides", [
    ("prodigy", ["optim.learning_rate=1.0"]),
    ("schedulefree_adamw", ["optim.learning_rate=1e-3", "optim.lr_scheduler=constant"]),
])
def test_the_demo_recipe_teaches_the_star_with_prodigy_and_schedule_free(tmp_path, name, overrides):
    """`latentsd demo` (300 steps of configs/train/demo_star.yaml) with the optimizer swapped: the base model draws
    no star before; after, the scorer reads star prompts back, and the known shapes stay."""
    from latentsd.demo import run_demo

    report = run_demo(tmp_path / "demo", overrides=[f"optim.optimizer={name}", *overrides])
    assert report["before"]["new"]["shape"] == 0.0
    assert report["after"]["new"]["all"] >= 0.9 and report["after"]["old"]["all"] >= 0.9, report["after"]
