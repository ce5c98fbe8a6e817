"""Generation speed: stock diffusers against latentsd's default and fast modes, interleaved in one run.

    python benchmarks/bench_generate.py            # the shipped shapes model on CPU: batch 16, 25 DDIM steps, guidance 2
    python benchmarks/bench_generate.py --tiny     # smoke test (CI): tiny random model, seconds; compiles with
                                                   # backend "eager" (no inductor), numbers mean nothing
    python benchmarks/bench_generate.py --sd15 --dtype fp16   # SD-1.5 architecture, random weights, 512², 50 steps,
                                                              # guidance 7.5, batch 1 and 8, on a GPU

Variants (``--variants``, default all): ``diffusers`` (``StableDiffusionPipeline`` as a user gets it: SDPA, eager),
``diffusers-compile`` (the same, UNet ``torch.compile``d by hand), ``latentsd`` (default mode), ``latentsd-fast``
(``pipe.optimize()``). Options for a variant measure one lever: ``latentsd-fast:freezing=0,compile_vae=1``.

Each round times every variant once (the order rotates), so drifting machine speed hits all alike; ratios are taken
within a round (median over rounds). Warm-up: the first call of a compiled variant in a fresh process with empty
compile caches ("1st process") and again in a second process that finds the first one's artefacts ("2nd process").
Prints a table and appends it to ``benchmarks/RESULTS.md`` (``--results``; ``--no-save`` to skip).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared benchmarks/*.py
import results_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Generation speed: `benchmarks/bench_generate.py`"
HEADER = ("| date | size | device (load) | versions | dtype | batch | variant | images/s | s/image | ratio vs diffusers "
          "| peak MiB | warm-up 1st / 2nd process (s) | max abs diff vs latentsd |")
SIZES = {
    "tiny": {"model": "tiny", "batches": [2], "steps": 2, "guidance": 2.0, "rounds": 1, "repeats": 1,
             "backend": "eager", "device": "cpu"},
    "shapes": {"model": str(ROOT / "latentsd/assets/shapes_base"), "batches": [16], "steps": 25, "guidance": 2.0,
               "rounds": 3, "repeats": 3, "backend": "inductor", "device": "cpu"},
    "sd15": {"model": "sd15", "batches": [1, 8], "steps": 50, "guidance": 7.5, "rounds": 3, "repeats": 2,
             "backend": "inductor", "device": "cuda"},
}
VARIANTS = ("diffusers", "diffusers-compile", "latentsd", "latentsd-fast")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROMPT = "a red circle on the left"


# ---- pipelines ---------------------------------------------------------------------------------------------
def load_components(model: str, dtype: torch.dtype) -> dict:
    """Components shared by the variants: a model folder, or random weights from a model config (sd15: the builtin
    tokenizer, so no download)."""
    from latentsd import LatentDiffusionPipeline, build_components
    from latentsd.models import load_model_config

    if Path(model).is_dir():
        loaded = LatentDiffusionPipeline.from_pretrained(model, dtype=dtype).components
        return {k: loaded[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    parts = build_components({**load_model_config(model), "tokenizer": "builtin"}).as_dict()
    for name in ("unet", "vae", "text_encoder"):
        parts[name] = parts[name].to(dtype).eval()
    return parts


def parse_variant(spec: str) -> tuple[str, dict]:
    name, _, opts = spec.partition(":")
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}: use one of {VARIANTS} (options: latentsd-fast:freezing=0)")
    options = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        options[key] = value.lower() in ("1", "true", "yes") if value.lower() in ("0", "1", "true", "false", "yes",
                                                                                  "no") else value
    return name, options


def build_pipeline(spec: str, parts: dict, device: str, backend: str):
    """The pipeline of one variant, on ``device``. Variants that change modules (fast mode: channels_last, fused
    QKV) get their own copies of the UNet and VAE; the others share them."""
    import diffusers

    from latentsd import DDIMScheduler, LatentDiffusionPipeline

    name, options = parse_variant(spec)
    if name.startswith("diffusers"):
        pipe = diffusers.StableDiffusionPipeline(
            **{**parts, "scheduler": diffusers.DDIMScheduler.from_config(parts["scheduler"].config)},
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if name == "diffusers-compile":  # by hand, as diffusers' docs show (default mode; no fullgraph needed)
            pipe.unet = torch.compile(pipe.unet, backend=backend)
    else:
        own = {k: copy.deepcopy(v) for k, v in parts.items() if k in ("unet", "vae")} if name.endswith("fast") else {}
        pipe = LatentDiffusionPipeline(**{**parts, **own, "scheduler": DDIMScheduler.from_config(
            parts["scheduler"].config)})
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if name == "latentsd-fast":
        pipe.optimize(**{"backend": backend, **options})
    return pipe


def generate(pipe, batch: int, steps: int, guidance: float, device: str) -> np.ndarray:
    generator = torch.Generator(device).manual_seed(0)
    return pipe([PROMPT] * batch, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                output_type="np").images


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = CLOCKS["wall"]


def timed(fn, device: str) -> float:
    sync(device)
    start = CLOCK()
    fn()
    sync(device)
    return CLOCK() - start


def peak_mib(fn, device: str) -> float:
    """Peak memory a call adds: CUDA allocator peak, or the process' resident-set peak on CPU (sampled)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    import psutil

    proc, peak, done = psutil.Process(), [0], threading.Event()
    base = proc.memory_info().rss

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0] - base, 0) / 2**20


# ---- warm-up in fresh processes ------------------------------------------------------------------------------
def warmup_child(args) -> None:
    """(child process) the first and second call of one variant and batch, as JSON on stdout (wall clock: compiling
    runs in worker processes too)."""
    cfg = SIZES[args.size]
    parts = load_components(cfg["model"], DTYPES[args.dtype])
    start = time.perf_counter()
    pipe = build_pipeline(args.warmup_child, parts, cfg["device"], args.backend)
    call = lambda: generate(pipe, args.batch, cfg["steps"], cfg["guidance"], cfg["device"])  # noqa: E731
    first = time.perf_counter() - start + timed(call, cfg["device"])
    second = timed(call, cfg["device"])
    print(json.dumps({"first": first, "second": second}))


def warmups(spec: str, batch: int, args, cache: Path) -> tuple[float, float]:
    """Warm-up seconds (first call minus a steady call) in a process with empty caches of its own (no kernels
    shared with another variant), then in a second process with the same caches."""
    env = {**os.environ, **cache_env(cache / spec.replace(":", "_")), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, f"--{args.size}", "--dtype", args.dtype,
           "--backend", args.backend, "--threads", str(torch.get_num_threads()), "--warmup-child", spec,
           "--batch", str(batch)]
    out = []
    for _ in range(2):
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if run.returncode:
            raise SystemExit(f"warm-up of {spec} failed:\n{run.stderr[-3000:]}")
        result = json.loads(run.stdout.strip().splitlines()[-1])
        out.append(max(result["first"] - result["second"], 0.0))
    return out[0], out[1]


# ---- the interleaved run -------------------------------------------------------------------------------------
def cache_env(folder: Path) -> dict:
    return {"TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"), "LATENTSD_COMPILE_CACHE": str(folder / "latentsd")}


def measure(args, cache: Path) -> list[dict]:
    cfg = SIZES[args.size]
    device, variants = cfg["device"], args.variants or list(VARIANTS)
    compiled = [v for v in variants if "compile" in v or "fast" in v]
    # this process compiles from the (by then warm) caches of the last compiled variant
    os.environ.update(cache_env(cache / (compiled[-1].replace(":", "_") if compiled else "main")))
    args.load = [load_average()]
    parts = load_components(cfg["model"], DTYPES[args.dtype])
    pipes = {v: build_pipeline(v, parts, device, args.backend) for v in variants}
    rows = []
    for batch in args.batches or cfg["batches"]:
        warm = {v: warmups(v, batch, args, cache) for v in compiled if args.warmup}  # main then finds warm caches
        calls = {v: (lambda p=p: generate(p, batch, cfg["steps"], cfg["guidance"], device)) for v, p in pipes.items()}
        images = {v: call() for v, call in calls.items()}  # also compiles, from the warm caches
        times = interleaved(calls, args.rounds or cfg["rounds"], args.repeats or cfg["repeats"], device)
        for v in variants:
            rows.append({
                "variant": v, "batch": batch, "images_per_s": batch / statistics.median(times[v]),
                "s_per_image": statistics.median(times[v]) / batch, "peak_mib": peak_mib(calls[v], device),
                "ratio": statistics.median(b / a for a, b in zip(times[v], times["diffusers"]))
                if "diffusers" in times else float("nan"), "warmup": warm.get(v),
                "max_diff": float(np.abs(images[v] - images["latentsd"]).max()) if "latentsd" in images else None})
    args.load.append(load_average())
    return rows


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def interleaved(calls: dict, rounds: int, repeats: int, device: str) -> dict[str, list[float]]:
    """Per variant, one time per round (median of ``repeats`` calls); each round runs every variant, in an order
    that rotates from round to round."""
    names, times = list(calls), {v: [] for v in calls}
    for r in range(rounds):
        for v in names[r % len(names):] + names[:r % len(names)]:
            times[v].append(statistics.median(timed(calls[v], device) for _ in range(repeats)))
    return times


def describe_device(device: str, load: list[float]) -> str:
    """The device, and the machine's 1-minute load average at the start and end of the run."""
    where = torch.cuda.get_device_name() if device == "cuda" else \
        f"CPU {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return f"{where} (load {load[0]:.1f} → {load[-1]:.1f})"



def table_rows(rows: list[dict], args) -> list[str]:
    cfg, today = SIZES[args.size], datetime.date.today().isoformat()
    size = f"{args.size} ({cfg['steps']} steps, guidance {cfg['guidance']}, backend {args.backend}, {args.clock} clock)"
    device, versions, out = describe_device(cfg["device"], args.load), results_table.versions(), []
    for r in rows:
        warm = "-" if r["warmup"] is None else f"{r['warmup'][0]:.1f} / {r['warmup'][1]:.1f}"
        diff = "-" if r["max_diff"] is None else f"{r['max_diff']:.1e}"
        out.append(f"| {today} | {size} | {device} | {versions} | {args.dtype} | "
                   f"{r['batch']} | `{r['variant']}` | {r['images_per_s']:.2f} | {r['s_per_image']:.4f} | "
                   f"{r['ratio']:.2f} | {r['peak_mib']:.0f} | {warm} | {diff} |")
    return out


def append_rows(path: Path, lines: list[str]) -> None:
    """Add rows at the end of this benchmark's table in ``path`` (created, with its header, when missing)."""
    results_table.append_rows(path, SECTION, HEADER, lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    for name in SIZES:
        size.add_argument(f"--{name}", dest="size", action="store_const", const=name)
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default fp32 (sd15: fp16)")
    p.add_argument("--variants", nargs="+", default=None, help=f"default: {' '.join(VARIANTS)}")
    p.add_argument("--batches", nargs="+", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="timed calls per variant per round (median)")
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor; --tiny: eager)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the warm-up measurement in fresh processes (quicker lever comparisons)")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="wall time (default), or this process' CPU time: steadier on a shared machine (use with "
                        "--threads 1; CPU time counts OpenMP spin-waits)")
    p.add_argument("--cache", type=Path, default=None,
                   help="compile cache folder to use and keep (default: a fresh temporary one, removed at the end)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks/RESULTS.md")
    p.add_argument("--no-save", action="store_true", help="print only; do not append to --results")
    p.add_argument("--warmup-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.size = args.size or "shapes"
    args.dtype = args.dtype or ("fp16" if args.size == "sd15" else "fp32")
    args.backend = args.backend or SIZES[args.size]["backend"]
    if SIZES[args.size]["device"] == "cuda" and not torch.cuda.is_available():
        p.error(f"--{args.size} needs a CUDA GPU")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.warmup_child:
        return warmup_child(args)
    cache = args.cache or Path(tempfile.mkdtemp(prefix="bench_generate_cache_"))  # empty: cold, then warm
    try:
        lines = table_rows(measure(args, cache), args)
    finally:
        if args.cache is None:
            shutil.rmtree(cache, ignore_errors=True)
    print("\n".join([HEADER, "|" + " --- |" * (HEADER.count(" | ") + 1)] + lines))
    if not args.no_save:
        append_rows(args.results, lines)
        print(f"appended {len(lines)} rows to {args.results}")


if __name__ == "__main__":
    main()
