"""Many processes for real: `accelerate launch` on CPU (gloo), two "nodes" on one machine, FSDP2, DeepSpeed config.

Every multi-process run is compared with a 1-process run of the same global batch (the reference), and
runs under a timeout so a deadlock fails instead of hanging. Output goes to files, not pipes (a full pipe
would block one rank and hang the other in a collective).
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentsd.config import load_config
from latentsd.training.distributed import configure_deepspeed, even_shares
from latentsd.training.logs import read_metrics
from latentsd.training.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs/train/tiny.yaml"
TRAIN = ROOT / "train_scripts/train.py"
LAUNCHED = ROOT / "tests/launched_trainer.py"
TIMEOUT = 180


def _args(out, data, *extra) -> list[str]:
    return ["--config", str(TINY), f"output_dir={out}", f"data.dataset={data}", "max_steps=4", "checkpoint_every=2",
            "checkpoints_total_limit=0", *extra]


def _reference(out, data, *extra) -> Trainer:
    """The same run in this process: 1 process x batch 4 (the global batch of 2 processes x batch 2)."""
    trainer = Trainer(load_config(TINY, _args(out, data, *extra)[2:] + ["optim.train_batch_size=4"]))
    trainer.run()
    return trainer


def _start(config: str, script, args, log: Path, launch_args=(), cwd=None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate" / config),
           *launch_args, str(script), *map(str, args)]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


def _finish(procs: list[subprocess.Popen], logs: list[Path]) -> list[tuple[int, str]]:
    """Wait for every launcher (all or nothing: a hang is killed and fails the test); (returncode, output) each."""
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        pytest.fail("a multi-process run hung (killed after %d s):\n%s" % (TIMEOUT, logs[0].read_text()[-3000:]))
    return [(p.returncode, log.read_text()) for p, log in zip(procs, logs)]


def _launch(tmp_path, name: str, args, config="2cpu.yaml", script=TRAIN, launch_args=()) -> str:
    log = tmp_path / f"{name}.log"
    [(rc, out)] = _finish([_start(config, script, args, log, ["--num_processes", "2", *launch_args])], [log])
    assert rc == 0, out[-4000:]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(tmp_path, name: str, args, cwds=(None, None)) -> list[tuple[int, str]]:
    """Two "nodes" (one CPU process each) on this machine, rendezvous over loopback."""
    common = ["--num_processes", "2", "--num_machines", "2", "--main_process_ip", "127.0.0.1",
              "--main_process_port", str(_free_port())]
    logs = [tmp_path / f"{name}-node{r}.log" for r in (0, 1)]
    procs = [_start("multi_node.yaml", TRAIN, args, logs[r], [*common, "--machine_rank", str(r)], cwd=cwds[r])
             for r in (0, 1)]
    return _finish(procs, logs)


def _unet(out) -> dict:
    return load_file(Path(out) / "model/unet/diffusion_pytorch_model.safetensors")


def _assert_close_losses(a: dict, b: dict, steps, atol=1e-4, key="loss"):
    for s in steps:
        assert abs(a[s][key] - b[s][key]) < atol, (s, key, a[s][key], b[s][key])


def _assert_close_weights(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, worst


# ---- held-out validation loss --------------------------------------------------------------------
@pytest.mark.parametrize("n", range(1, 10))
def test_even_shares_give_every_rank_equal_batches_and_each_sample_once(n):
    for world in (1, 2, 3):
        for size in (1, 2, 3):
            shares = [even_shares(n, r, world, size) for r in range(world)]
            shapes = {tuple(len(ids) for ids, _ in s) for s in shares}
            assert len(shapes) == 1  # same number of batches, same sizes, on every rank
            real = sorted(i for s in shares for ids, mask in s for i, m in zip(ids, mask) if m)
            assert real == list(range(n))
            assert all(all(0 <= i < n for i in ids) for s in shares for ids, _ in s)


def test_validation_loss_with_an_odd_holdout_and_a_trained_text_encoder_matches_one_process(tmp_path, shapes_dir):
    """5 held-out samples, 2 ranks x batch 2: every rank must run the same forwards (DDP text encoder)."""
    extra = ["max_steps=2", "model.train_text_encoder=true", "validation.holdout=5", "validation.every=2"]
    _launch(tmp_path, "val", _args(tmp_path / "two", shapes_dir, *extra, "optim.train_batch_size=2"),
            script=LAUNCHED)
    ranks = json.loads((tmp_path / "two/ranks.json").read_text())["ranks"]
    assert ranks[0]["forwards"] == ranks[1]["forwards"]
    assert ranks[0]["forwards"]["text_encoder"] > 0
    ref = Trainer(load_config(TINY, _args(tmp_path / "one", shapes_dir, *extra)[2:] + ["optim.train_batch_size=4"]))
    before = ref.validate()["val_loss"]
    ref.run()
    assert abs(ranks[0]["val_loss"] - before) < 1e-5
    _assert_close_losses(read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one"), [2], 1e-5, "val_loss")


# ---- the cache, built by two processes -----------------------------------------------------------
def test_a_cache_built_by_two_processes_trains_like_one_process_without_cache(tmp_path, shapes_dir):
    common = ["max_steps=3", "data.random_flip=true", "data.caption_dropout=0.3"]
    _launch(tmp_path, "cache", _args(tmp_path / "two", shapes_dir, *common, "cache.latents=true", "cache.text=true",
                                     "cache.shard_size=4", "optim.train_batch_size=2"))
    _reference(tmp_path / "one", shapes_dir, *common)
    _assert_close_losses(read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one"), [1, 2, 3])
    for kind in ("latents", "text"):  # both ranks encoded their share
        writers = {p.name.split("-")[1] for p in (tmp_path / "two/cache" / kind).glob("*.safetensors")}
        assert writers == {"r00000", "r00001"}, kind


# ---- multi-node ----------------------------------------------------------------------------------
def test_nodes_that_do_not_share_output_dir_all_fail_with_a_clear_message(tmp_path, shapes_dir):
    """A relative output_dir under a different working directory per node: not the same folder."""
    cwds = [tmp_path / "node0", tmp_path / "node1"]
    for c in cwds:
        c.mkdir()
    results = _two_nodes(tmp_path, "unshared", _args("run", shapes_dir, "optim.train_batch_size=2"), cwds)
    for rc, out in results:
        assert rc != 0
        assert "output_dir run is not shared by all processes" in out and "shared filesystem" in out, out[-3000:]
    assert not any((c / "run/checkpoints").exists() for c in cwds)
    assert not list((cwds[0] / "run").glob(".latentsd-shared-*"))  # the marker is cleaned up


def test_two_nodes_train_resume_and_export_like_one_node(tmp_path, shapes_dir):
    args = ["optim.train_batch_size=2"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    for out, extra in ((full, []), (resumed, [f"resume={full}/checkpoints/step-0000002"])):
        for rc, log in _two_nodes(tmp_path, out.name, _args(out, shapes_dir, *args, *extra)):
            assert rc == 0, log[-4000:]
    assert (full / "checkpoints/step-0000002/random_states_1.pkl").is_file()  # node 1 wrote into the shared dir
    _reference(tmp_path / "one", shapes_dir)
    a, b, ref = (read_metrics(p) for p in (full, resumed, tmp_path / "one"))
    _assert_close_losses(a, ref, [1, 2, 3, 4])
    assert sorted(b) == [3, 4] and all(a[s]["loss"] == b[s]["loss"] for s in (3, 4))
    _assert_close_weights(_unet(resumed), _unet(full), 0.0)
    _assert_close_weights(_unet(full), _unet(tmp_path / "one"), 1e-5)


# ---- FSDP ----------------------------------------------------------------------------------------
FSDP_RUN = ["optim.max_grad_norm=0.1", "ema.enabled=true", "ema.decay=0.5", "ema.warmup=false",
            "validation.holdout=3", "validation.every=1", "validation.prompts=[a red circle]", "validation.steps=2"]


def test_fsdp_on_cpu_shards_clips_averages_exports_and_resumes_like_one_process(tmp_path, shapes_dir):
    """accelerate's own FSDP2 path over gloo (see launched_trainer.py --fsdp-on-cpu for why a flag is needed)."""
    import diffusers

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    for out, extra in ((full, []), (resumed, [f"resume={full}/checkpoints/step-0000002"])):
        _launch(tmp_path, out.name, ["--fsdp-on-cpu", *_args(out, shapes_dir, *FSDP_RUN, "optim.train_batch_size=2",
                                                             *extra)], config="fsdp.yaml", script=LAUNCHED)
    ranks = json.loads((full / "ranks.json").read_text())["ranks"]
    for r in ranks:  # really sharded: DTensor parameters, each rank holds about half, and so does its EMA
        assert r["dtensor_params"] and r["local_numel"] < 0.6 * r["full_numel"], r
        assert r["ema_shadow_numel"] == r["local_numel"]
    assert ranks[0]["forwards"] == ranks[1]["forwards"]
    _reference(tmp_path / "one", shapes_dir, *FSDP_RUN)
    a, b, ref = (read_metrics(p) for p in (full, resumed, tmp_path / "one"))
    _assert_close_losses(a, ref, [1, 2, 3, 4])
    _assert_close_losses(a, ref, [1, 2, 3, 4], 1e-5, "val_loss")  # EMA weights swapped into the shards
    assert sorted(b) == [3, 4] and all(a[s]["loss"] == b[s]["loss"] and a[s]["val_loss"] == b[s]["val_loss"]
                                       for s in (3, 4))
    _assert_close_weights(_unet(resumed), _unet(full), 0.0)
    _assert_close_weights(_unet(full), _unet(tmp_path / "one"), 1e-5)  # full EMA weights, clipped like 1 process
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(full / "model")  # a normal diffusers folder
    assert not any(isinstance(p, torch.distributed.tensor.DTensor) for p in pipe.unet.parameters())


@pytest.mark.parametrize("launch, extra, message", [
    ([], [], "on CPU ranks it would silently train unsharded DDP"),
    (["--fsdp-on-cpu"], ["model.train_text_encoder=true"], "FSDP2 prepares exactly one model"),
])
def test_fsdp_setups_that_cannot_work_are_refused_at_start(tmp_path, shapes_dir, launch, extra, message):
    log = tmp_path / "fsdp.log"
    args = [*launch, *_args(tmp_path / "run", shapes_dir, "optim.train_batch_size=2", *extra)]
    [(rc, out)] = _finish([_start("fsdp.yaml", LAUNCHED, args, log, ["--num_processes", "2"])], [log])
    assert rc != 0 and out.count(message) >= 2, out[-3000:]  # every rank says why
    assert not (tmp_path / "run/checkpoints").exists()


# ---- DeepSpeed (not installed here: the config logic is tested on accelerate's real plugin) ----------
def _ds_cfg(*extra):
    return load_config(TINY, ["optim.max_grad_norm=0.3", "optim.gradient_accumulation_steps=2",
                              "optim.train_batch_size=3", *extra])


def _accelerate_fills(plugin):
    """What accelerate's ``_prepare_deepspeed`` does to the config: fill every ``auto`` (clipping: 1.0)."""
    plugin.deepspeed_config_process(must_match=False, gradient_clipping=1.0, train_micro_batch_size_per_gpu=3,
                                    gradient_accumulation_steps=2, train_batch_size=6)
    return plugin.deepspeed_config


def test_deepspeed_clips_at_optim_max_grad_norm_not_accelerates_default():
    from accelerate.utils import DeepSpeedPlugin

    assert _accelerate_fills(DeepSpeedPlugin(zero_stage=2))["gradient_clipping"] == 1.0  # without latentsd
    plugin = DeepSpeedPlugin(zero_stage=2)
    configure_deepspeed(plugin, _ds_cfg(), text_encoder_trained=False)
    config = _accelerate_fills(plugin)
    assert config["gradient_clipping"] == 0.3
    assert config["gradient_accumulation_steps"] == 2 and config["train_micro_batch_size_per_gpu"] == 3


def test_deepspeed_config_that_contradicts_the_training_config_is_an_error():
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(zero_stage=2, gradient_clipping=1.0)
    with pytest.raises(ValueError, match=r"gradient_clipping=1.0 .* optim.max_grad_norm=0.3"):
        configure_deepspeed(plugin, _ds_cfg(), text_encoder_trained=False)


def test_deepspeed_refuses_a_trained_text_encoder_with_the_reason():
    from accelerate.utils import DeepSpeedPlugin

    with pytest.raises(ValueError, match="one model per DeepSpeed engine"):
        configure_deepspeed(DeepSpeedPlugin(zero_stage=2), _ds_cfg("model.train_text_encoder=true"), True)
