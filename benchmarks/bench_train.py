"""Training speed: latentsd's trainer against a diffusers ``train_text_to_image.py``-style loop, same weights, same data.

    python benchmarks/bench_train.py            # the shipped shapes model on CPU: 64 px, batch 32, fp32
    python benchmarks/bench_train.py --tiny     # smoke test (CI): tiny random model, seconds, numbers mean nothing
    python benchmarks/bench_train.py --sd15     # SD-1.5 architecture, random weights, 512², batch 16, bf16, on a GPU

Modes (``--modes``, default all; a latentsd mode may add config overrides to measure one lever:
``fast:optim.channels_last=false``, several separated by ``;``):

* ``example``: the loop of diffusers' ``examples/text_to_image/train_text_to_image.py``: VAE and text encoder every
  step, HF ``imagefolder`` + ``with_transform`` (torchvision's transforms when installed, else the same operations in
  PIL), a shuffling ``DataLoader``, torch's default AdamW, Accelerate, the loss gathered and ``.item()``-ed every step.
  The baseline.
* ``uncached``: ``latentsd train`` with ``cache.latents=false cache.text=false`` (VAE and text encoder every step).
* ``default``: ``latentsd train`` as configured by default (``cache.*=auto``: both cached here, since the VAE and the
  text encoder are frozen and the data is center-cropped).
* ``fast``: the defaults plus ``optim.compile=true optim.channels_last=true`` (``--tiny``: compiled with
  ``optim.compile_backend=aot_eager``, graph capture without inductor's code generation, which takes minutes on a CPU).
* ``fast-bf16``: ``fast`` under bf16 autocast with ``model.attention=math``, the recipe for a CPU with AMX (on a GPU
  ``fast`` with ``--precision bf16`` is the one: SDPA's flash kernel is the fast attention there). Its precision is
  not the example's: add ``example:mixed_precision=bf16`` to ``--modes`` for a baseline in bf16 too (each mode's
  ratio is then given to both examples).

Every mode trains the UNet only: constant LR 1e-4, no EMA, ``num_workers=0``, fp32 (``--sd15``: bf16 autocast), on
the same images (``make-shapes``) and weights. Each mode runs in its own process, all at once but in lockstep: one
process works at a time, one step (or the setup) per turn, the order rotating from step to step, so a machine whose
speed drifts (other jobs on a shared CPU) slows every mode alike and each step of a mode is paired with the same step
of the example loop (``--in-process``, the default with ``--tiny``: the modes one after the other in this process).
Per mode: images/s and s/image from the median measured step (after ``--warmup`` steps), the ratio to the example
loop (median and quartiles of the paired steps' ratios), CPU s/image (process CPU time), peak memory (CUDA: max
allocated; CPU: the process's peak RSS) and the one-time cost: setup (loading, cache building) plus what compilation
and the warm-up steps take beyond the measured speed. ``--profile DIR`` writes a cProfile of each mode's measured
steps (``run-<i>.prof``, i: its place in ``--modes``). Prints a table and appends its rows to
``benchmarks/RESULTS.md`` (``--results``; ``--no-save`` to skip).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared benchmarks/*.py
import results_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Training speed: `benchmarks/bench_train.py`"
HEADER = ("| date | size | device (load) | versions | dtype | batch | mode | images/s | s/image | ratio vs example "
          "(quartiles) | CPU s/image | peak MiB | one-time s |")
MODES = ("example", "uncached", "default", "fast", "fast-bf16")
LATENTSD_MODES = {
    "uncached": ["cache.latents=false", "cache.text=false"],
    "default": [],
    "fast": ["optim.compile=true", "optim.channels_last=true"],
    "fast-bf16": ["optim.compile=true", "optim.channels_last=true", "mixed_precision=bf16", "model.attention=math"],
}
SIZES = {  # model, resolution, batch, images, mixed precision, device
    "tiny": ("tiny", 32, 4, 16, "no", "cpu"),
    "shapes": ("latentsd/assets/shapes_base", 64, 32, 320, "no", "cpu"),
    "sd15": ("sd15", 512, 16, 256, "bf16", "cuda"),
}


# =========================================================================== the parent: data, model, the lockstep


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="tiny random model, 2 + 2 steps (CI smoke test)")
    size.add_argument("--sd15", action="store_true", help="SD-1.5 architecture, random weights, 512², batch 16, bf16")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {','.join(MODES)}")
    ap.add_argument("--steps", type=int, default=None, help="measured optimizer steps per mode (default 30; --tiny 2)")
    ap.add_argument("--warmup", type=int, default=None, help="steps before the measured ones (default 3; --tiny 2)")
    ap.add_argument("--batch", type=int, default=None, help="default 32 (--tiny 4, --sd15 16)")
    ap.add_argument("--precision", choices=("no", "fp16", "bf16"), default=None,
                    help="mixed precision of every mode (default: no, i.e. fp32; --sd15: bf16)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    ap.add_argument("--no-save", action="store_true", help="print the table only")
    ap.add_argument("--profile", default=None, help="write a cProfile of each mode's measured steps to this folder")
    ap.add_argument("--workdir", default=None, help="where data, model and runs go (default: a temporary folder)")
    ap.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=None,
                    help="run the modes one after the other in this process, not in lockstep processes (default "
                         "with --tiny); no per-mode peak memory then")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one mode, turns on --control
    ap.add_argument("--control", default=None, help=argparse.SUPPRESS)  # "READ_FD,WRITE_FD"
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.size = "tiny" if args.tiny else "sd15" if args.sd15 else "shapes"
    tiny = args.size == "tiny"
    args.steps = args.steps or (2 if tiny else 30)
    args.warmup = args.warmup if args.warmup is not None else (2 if tiny else 3)
    _, args.resolution, batch, images, precision, args.device = SIZES[args.size]
    args.precision = args.precision or precision
    args.batch = args.batch or batch
    args.images = max(images, 2 * args.batch)
    args.in_process = tiny if args.in_process is None else args.in_process
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m.partition(":")[0] not in MODES
           or m.startswith("example:") and example_precision(m, None) not in ("no", "fp16", "bf16")]
    if bad:
        ap.error(f"unknown mode(s) {', '.join(bad)}: choose from {', '.join(MODES)} (a latentsd mode may add "
                 "config overrides: fast:optim.channels_last=false;optim.compile_backend=aot_eager; the example "
                 "only its precision: example:mixed_precision=bf16)")
    if min(args.steps, args.warmup, args.batch) < 1:
        ap.error("--steps, --warmup and --batch must be >= 1 (the first step is never measured)")
    return args


def example_precision(mode: str, default: str | None) -> str | None:
    """The mixed precision of an ``example[:mixed_precision=P]`` mode (its one override)."""
    extra = mode.partition(":")[2]
    key, _, value = extra.partition("=")
    return default if not extra else value.strip("'\"") if key == "mixed_precision" else None


def prepare(args, work: Path) -> tuple[Path, Path]:
    """The image folder and the model folder every mode reads (made once, outside the measurements)."""
    from latentsd.data.shapes import make_shapes_dataset, write_imagefolder

    data = work / f"data-{args.resolution}-{args.images}"
    if not (data / "metadata.jsonl").is_file():
        write_imagefolder(make_shapes_dataset(args.images, seed=0, size=args.resolution), data)
    name = SIZES[args.size][0]
    if "/" in name:
        return data, ROOT / name
    model = work / f"model-{name}"
    if not (model / "model_index.json").is_file():
        from latentsd.models import build_components, load_model_config
        from latentsd.pipeline import LatentDiffusionPipeline

        config = {**load_model_config(name), "tokenizer": "builtin"}  # offline: the shipped tokenizer
        LatentDiffusionPipeline(**build_components(config, seed=0).as_dict()).save_pretrained(model)
    return data, model


class Worker:
    """One mode in its own process, which works only between :meth:`go` and the answer :meth:`wait` reads."""

    def __init__(self, args, mode: str, data: Path, model: Path, out: Path):
        shutil.rmtree(out, ignore_errors=True)  # a fresh run folder: no cache of an earlier run is taken for free
        out.mkdir(parents=True)
        self.mode, self.log = mode, out / "worker.log"
        from_parent, to_worker = os.pipe()
        from_worker, to_parent = os.pipe()
        cmd = [sys.executable, __file__, "--worker", mode, "--control", f"{from_parent},{to_parent}", "--data",
               str(data), "--model", str(model), "--workdir", str(out), "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--batch", str(args.batch)]
        cmd += ["--tiny"] if args.size == "tiny" else ["--sd15"] if args.size == "sd15" else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        cmd += ["--precision", args.precision]
        cmd += ["--profile", str(Path(args.profile).resolve() / f"{out.name}.prof")] if args.profile else []
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, pass_fds=(from_parent, to_parent))
        os.close(from_parent)
        os.close(to_parent)
        self.send, self.answers = os.fdopen(to_worker, "w"), os.fdopen(from_worker)

    def go(self) -> None:
        self.send.write("go\n")
        self.send.flush()

    def wait(self) -> str:
        line = self.answers.readline()
        if not line:
            self.proc.wait()
            raise SystemExit(f"mode {self.mode} failed (exit {self.proc.returncode}):\n{self.log.read_text()[-4000:]}")
        return line.strip()


def run_all(args, data: Path, model: Path, work: Path) -> dict[str, dict]:
    """Every mode's measurement: in lockstep processes, or one after the other in this process."""
    if args.in_process:
        results = {}
        for i, mode in enumerate(args.modes):
            out = work / f"run-{i}"
            shutil.rmtree(out, ignore_errors=True)
            profile = str(Path(args.profile).resolve() / f"{out.name}.prof") if args.profile else None
            results[mode] = measure(args, mode, data, model, out, None, profile)
        return results
    workers = [Worker(args, mode, data, model, work / f"run-{i}") for i, mode in enumerate(args.modes)]
    for turn in range(1 + args.warmup + args.steps):  # the setup, then each step
        for w in workers[turn % len(workers):] + workers[:turn % len(workers)]:
            w.go()
            w.wait()
    results = {}
    for w in workers:  # let each finish its run and report
        w.go()
        results[w.mode] = json.loads(w.wait())
        w.proc.wait()
    return results


def summarize(results: dict[str, dict], warmup: int, batch: int) -> dict[str, dict]:
    """Per mode: the median measured step as images/s, s/image and CPU s/image; the ratios of its steps' speeds to
    the same steps' of each example loop (median, quartiles; the first example mode listed is the baseline, a
    second one, e.g. ``example:mixed_precision=bf16``, adds its own ratio); the one-time cost; the peak memory."""
    table, examples = {}, [m for m in results if m.partition(":")[0] == "example"]
    for mode, r in results.items():
        wall, cpu = r["step_s"][warmup:], r["cpu_s"][warmup:]
        step = statistics.median(wall)
        row = {"images_per_s": batch / step, "s_per_image": step / batch, "cpu_s_per_image": statistics.median(cpu) / batch,
               "one_time_s": r["setup_s"] + max(0.0, sum(r["step_s"][:warmup]) - warmup * step),
               "peak_mem_mb": r["peak_mem_mb"], "what": r["what"], "ratios": {}}
        for example in examples:
            ratios = [e / t for e, t in zip(results[example]["step_s"][warmup:], wall)]
            q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            row["ratios"][example] = (statistics.median(ratios), min(q1, q3), max(q1, q3))
        table[mode] = row
    return table


def describe_device(args) -> str:
    import torch

    if args.device == "cuda":
        return torch.cuda.get_device_name()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"CPU {os.cpu_count()} cores, {args.threads or torch.get_num_threads()} threads (load {load:.1f})"



def table_rows(table: dict[str, dict], args) -> list[str]:
    today, device, versions = datetime.date.today().isoformat(), describe_device(args), results_table.versions()
    dtype = "fp32" if args.precision == "no" else args.precision
    size = f"{args.size} ({args.resolution}², {args.steps} steps after {args.warmup})"
    out = []
    for mode, r in table.items():
        ratio = "; ".join(f"{m:.2f} ({lo:.2f}–{hi:.2f})" + ("" if i == 0 else f" vs `{example}`")
                          for i, (example, (m, lo, hi)) in enumerate(r["ratios"].items())) or "-"
        memory = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        out.append(f"| {today} | {size} | {device} | {versions} | {dtype} | {args.batch} | `{mode}` | "
                   f"{r['images_per_s']:.2f} | {r['s_per_image']:.4f} | {ratio} | {r['cpu_s_per_image']:.4f} | "
                   f"{memory} | {r['one_time_s']:.1f} |")
    return out


def append_rows(path: Path, lines: list[str]) -> None:
    """Add rows at the end of this benchmark's table in ``path`` (created, with its header, when missing)."""
    results_table.append_rows(path, SECTION, HEADER, lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:  # a worker process: one mode, in turns
        turns = Turns(*map(int, args.control.split(",")))
        res = measure(args, args.worker, Path(args.data), Path(args.model), Path(args.workdir), turns, args.profile)
        turns.done(json.dumps(res))
        return {}
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--sd15 measures on a CUDA GPU and none is available here")
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        work = Path(args.workdir or tmp).resolve()
        # offline, quiet, and datasets' imagefolder cache in the work folder (set before datasets is imported)
        os.environ.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", HF_DATASETS_CACHE=str(work / "hf-datasets"))
        data, model = prepare(args, work)
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
        table = summarize(run_all(args, data, model, work), args.warmup, args.batch)
    for mode, r in table.items():
        print(f"{mode} ({r['what']}): {r['images_per_s']:.1f} img/s, one-time {r['one_time_s']:.1f} s")
    lines = table_rows(table, args)
    print("\n".join([HEADER, "|" + " --- |" * (HEADER.count(" | ") + 1)] + lines))
    if not args.no_save:
        append_rows(args.results, lines)
        print(f"appended {len(lines)} rows to {args.results}")
    return table


# =========================================================================== the worker: one measurement


class Turns:
    """The worker's side of the lockstep: wait for the parent's go, say when done (the last answer: the result)."""

    def __init__(self, read_fd: int, write_fd: int):
        self.read, self.write = os.fdopen(read_fd), os.fdopen(write_fd, "w")

    def wait(self) -> None:
        if not self.read.readline():
            raise SystemExit("the benchmark's parent process went away")

    def done(self, message: str = "done") -> None:
        self.write.write(message + "\n")
        self.write.flush()


class StepClock:
    """Wall and CPU seconds of the setup and of each optimizer step; with :class:`Turns`, each is one turn (the clock
    stops while other modes work)."""

    def __init__(self, sync, turns: Turns | None = None, profile: str | None = None, warmup: int = 0):
        self.sync, self.turns, self.profile, self.warmup = sync, turns, profile, warmup
        self.profiler, self.setup_s, self.step_s, self.cpu_s = None, 0.0, [], []
        self._next_turn(first=True)

    def _next_turn(self, first: bool = False) -> None:
        if self.turns is not None:
            if not first:
                self.turns.done()
            self.turns.wait()
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def setup_done(self) -> None:
        self.setup_s = time.perf_counter() - self.t0
        self._next_turn()

    def tick(self) -> None:
        """The end of a step (the trainer's ``at_step_end``, after the step's one host sync)."""
        self.sync()
        self.step_s.append(time.perf_counter() - self.t0)
        self.cpu_s.append(time.process_time() - self.c0)
        if self.profile and len(self.step_s) == self.warmup:
            import cProfile

            self.profiler = cProfile.Profile()
            self.profiler.enable()
        self._next_turn()

    def result(self) -> dict:
        if self.profiler is not None:
            self.profiler.disable()
            self.profiler.dump_stats(self.profile)
        return {"setup_s": self.setup_s, "step_s": self.step_s, "cpu_s": self.cpu_s}


def measure(args, mode: str, data: Path, model: Path, out: Path, turns: Turns | None, profile: str | None) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    clock = StepClock(device_sync(args.device), turns, profile, args.warmup)  # waits for the first turn
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if mode.partition(":")[0] == "example":
        from example_loop import example_loop

        what = example_loop(argparse.Namespace(**{**vars(args), "precision": example_precision(mode, args.precision)}),
                            data, model, clock)
    else:
        name, _, extra = mode.partition(":")
        what = latentsd_loop(args, data, model, out, LATENTSD_MODES[name] + list(filter(None, extra.split(";"))), clock)
    # a process's peak RSS is its whole life's: per mode only when each mode has its own process
    memory = peak_memory_mb(args.device) if args.device == "cuda" or turns is not None else None
    return {**clock.result(), "what": what, "peak_mem_mb": memory}


def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def device_sync(device: str):
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def latentsd_loop(args, data: Path, model: Path, out: Path, overrides: list[str], clock: StepClock) -> str:
    """``latentsd train`` itself, with a clock at every step end (checkpoints and the export switched off)."""
    from latentsd.config import load_config
    from latentsd.training.trainer import Trainer

    class TimedTrainer(Trainer):
        def at_step_end(self, metrics):
            clock.tick()

        def checkpoint(self):
            pass

        def export(self, path):
            return path

    steps = args.warmup + args.steps
    cfg = load_config(None, [
        f"output_dir={out}", f"data.dataset={data}", f"data.resolution={args.resolution}", f"model.pretrained={model}",
        f"max_steps={steps}", f"checkpoint_every={steps + 1}", f"optim.train_batch_size={args.batch}",
        "optim.learning_rate=1e-4", f"mixed_precision='{args.precision}'", "report_to=none", "data.num_workers=0",
        *overrides, *(["optim.compile_backend=aot_eager"] if args.size == "tiny" else [])])
    trainer = TimedTrainer(cfg)
    clock.setup_done()
    trainer.run()
    return describe_run(trainer)


def describe_run(trainer) -> str:
    """What the trainer really did: which parts came from the cache, whether the UNet ran compiled, under which
    autocast, with which attention."""
    cached = [part for part in ("latents", "text") if getattr(trainer.dataset, part, None) is not None]
    compiled = getattr(trainer.parts.unet, "_compiled_call_impl", None) is not None
    precision, attention = trainer.acc.mixed_precision, trainer.cfg.model.attention
    return f"{'+'.join(cached) or 'nothing'} cached" + (", UNet compiled" if compiled else "") + \
        ("" if precision == "no" else f", {precision}") + ("" if attention == "sdpa" else f", {attention} attention")


if __name__ == "__main__":
    main()
