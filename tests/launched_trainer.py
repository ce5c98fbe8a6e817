"""Run by tests/test_distributed.py under ``accelerate launch``: the real Trainer, plus what each rank saw.

    accelerate launch ... tests/launched_trainer.py [--fsdp-on-cpu] [--inf-loss RANK:MICRO] [--digest] --config YAML key=value ...

Before training it runs one extra ``validate()`` and counts, per rank, the forward passes of the trained
modules (UNet, text encoder); it also records whether the UNet's parameters are FSDP shards (DTensor) and
how many elements this rank holds. The main process writes them to ``<output_dir>/ranks.json``
(``{"ranks": [...]}``), then the run trains as ``latentsd train`` does.

``--fsdp-on-cpu``: accelerate 1.15 turns FSDP on only for GPU-type process groups (MULTI_GPU, ...): with
an FSDP config on CPU ranks it silently trains plain DDP, and latentsd refuses that. This flag starts
accelerate's gloo process group first and labels it MULTI_GPU, so that accelerate's own FSDP2 code
(``fully_shard`` over gloo) runs on CPU ranks as it would on GPUs. Test-only: nothing in latentsd does this.

``--inf-loss RANK:MICRO``: rank RANK's loss of micro-batch MICRO becomes inf (its gradients stay finite); after
training each rank writes its skipped-step count and a digest of its UNet weights to ``<output_dir>/rankN_after.json``.

``--digest``: write ``rankN_after.json`` without injecting anything; it also holds ``trained``, a digest of every
trained parameter of the rank (e.g. the UNet and text-encoder LoRA adapters), in order.
"""

import json
import sys
from pathlib import Path


def enable_fsdp_on_cpu() -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    PartialState(cpu=True)  # gloo process group, distributed_type MULTI_CPU
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU  # what AcceleratorState turns into FSDP


def inject_inf_loss(trainer, rank: int, micro: int) -> None:
    """``loss + inf`` on one rank and micro-batch: the loss is inf there, the gradients are those of the loss."""
    compute_loss = trainer.compute_loss

    def patched(batch, micro_step):
        loss = compute_loss(batch, micro_step)
        return loss + float("inf") if (trainer.acc.process_index, micro_step) == (rank, micro) else loss

    trainer.compute_loss = patched


def weights_digest(trainer, params=None) -> str:
    import hashlib

    params = trainer.acc.unwrap_model(trainer.unet).parameters() if params is None else params
    return hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in params)).hexdigest()


def probe(trainer) -> dict:
    """Forward passes of the trained modules during one validation, and how the UNet is sharded."""
    from torch.distributed.tensor import DTensor

    counts = {}
    hooks = []
    for name, module in zip(("unet", "text_encoder"), trainer.trainable):
        counts[name] = 0
        module = trainer.acc.unwrap_model(module)
        hooks.append(module.register_forward_pre_hook(lambda *_, n=name: counts.__setitem__(n, counts[n] + 1)))
    val_loss = trainer.validate().get("val_loss")
    for h in hooks:
        h.remove()
    params = list(trainer.acc.unwrap_model(trainer.unet).parameters())
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
    return {"rank": trainer.acc.process_index, "forwards": counts, "val_loss": val_loss,
            "dtensor_params": all(isinstance(p, DTensor) for p in params),
            "ema_shadow_numel": sum(t.numel() for t in getattr(trainer.ema, "shadow", [])),
            "local_numel": local, "full_numel": sum(p.numel() for p in params)}


def main(argv: list[str]) -> int:
    from accelerate.utils import gather_object

    if argv and argv[0] == "--fsdp-on-cpu":
        enable_fsdp_on_cpu()
        argv = argv[1:]
    inf_loss = None
    if argv and argv[0] == "--inf-loss":
        inf_loss, argv = tuple(map(int, argv[1].split(":"))), argv[2:]
    digest = bool(inf_loss)
    if argv and argv[0] == "--digest":
        digest, argv = True, argv[1:]
    assert argv[0] == "--config", "usage: launched_trainer.py [--fsdp-on-cpu] --config YAML key=value ..."
    from latentsd.config import load_config
    from latentsd.training.trainer import Trainer

    cfg = load_config(argv[1], argv[2:])
    trainer = Trainer(cfg)
    ranks = gather_object([probe(trainer)])
    if trainer.acc.is_main_process:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        Path(cfg.output_dir, "ranks.json").write_text(json.dumps({"ranks": ranks}, indent=1))
    if inf_loss:
        inject_inf_loss(trainer, *inf_loss)
    trainer.run()
    if digest:  # run() ended the process group: each rank writes its own file
        rank = trainer.acc.process_index
        Path(cfg.output_dir, f"rank{rank}_after.json").write_text(json.dumps(
            {"rank": rank, "skipped_steps": trainer.state.skipped_steps, "weights": weights_digest(trainer),
             "trained": weights_digest(trainer, trainer.params)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
