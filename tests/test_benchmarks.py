"""The benchmarks run end to end in CI with ``--tiny`` (no timing assertions: the numbers of a tiny model on a shared
machine mean nothing; what is checked is that every measurement is made and recorded, and that the images agree)."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| 20")]  # data rows start with the date


def test_bench_generate_tiny_measures_records_and_agrees(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Another benchmark\n\n| a |\n| --- |\n| 1 |\n")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_generate.py"), "--tiny", "--threads", "1",
                          "--variants", "diffusers", "latentsd", "latentsd-fast", "--results", str(results)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {row[6].strip("`"): row for row in table(run.stdout)}
    assert list(rows) == ["diffusers", "latentsd", "latentsd-fast"]
    for name, row in rows.items():
        images_per_s, s_per_image, ratio = float(row[7]), float(row[8]), float(row[9])
        assert images_per_s > 0 and abs(images_per_s * s_per_image - 1) < 0.01 and ratio > 0
        assert float(row[10]) >= 0  # peak MiB
    assert rows["diffusers"][9] == "1.00"
    assert re.fullmatch(r"\d+\.\d / \d+\.\d", rows["latentsd-fast"][11])  # warm-up: 1st / 2nd process
    assert rows["latentsd"][11] == "-"
    assert float(rows["diffusers"][12]) <= 1e-4 and float(rows["latentsd-fast"][12]) <= 1e-5  # vs latentsd
    saved = results.read_text()
    assert "## Another benchmark\n\n| a |\n| --- |\n| 1 |" in saved  # other sections untouched
    assert [row[6] for row in table(saved)] == [row[6] for row in table(run.stdout)]


def test_rows_go_to_the_end_of_their_own_table(tmp_path):
    bench = load_script("bench_generate")
    results = tmp_path / "RESULTS.md"
    bench.append_rows(results, ["| 2026-01-01 | first |"])
    results.write_text(results.read_text() + "\n## Training speed\n\n| x |\n| --- |\n| 2 |\n")
    bench.append_rows(results, ["| 2026-01-02 | second |"])
    text = results.read_text()
    assert text.count(bench.SECTION) == 1 and text.count(bench.HEADER) == 1
    ours = text[text.index(bench.SECTION):text.index("## Training speed")]
    assert ours.index("| 2026-01-01 | first |") < ours.index("| 2026-01-02 | second |")
    assert text.endswith("## Training speed\n\n| x |\n| --- |\n| 2 |\n")


def test_bench_train_tiny_measures_every_mode_as_configured_and_records_it(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Another benchmark\n\n| a |\n| --- |\n| 1 |\n")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_train.py"), "--tiny", "--threads", "1",
                          "--results", str(results)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    # each mode trained as it says: the example loop encodes every step, latentsd's default caches, fast compiles
    for what in ("example (VAE and text encoder every step)", "uncached (nothing cached)",
                 "default (latents+text cached)", "fast (latents+text cached, UNet compiled)",
                 "fast-bf16 (latents+text cached, UNet compiled, bf16, math attention)"):
        assert f"\n{what}: " in run.stdout
    rows = {row[6].strip("`"): row for row in table(run.stdout)}
    assert list(rows) == ["example", "uncached", "default", "fast", "fast-bf16"]
    for name, row in rows.items():
        images_per_s, s_per_image, cpu_s_per_image, one_time = map(float, (row[7], row[8], row[10], row[12]))
        assert images_per_s > 0 and abs(images_per_s * s_per_image - 1) < 0.01
        assert cpu_s_per_image > 0 and one_time >= 0 and row[11] == "-"  # --tiny: one process, no per-mode peak
        ratio, low, high = map(float, re.fullmatch(r"(\S+) \((\S+)–(\S+)\)", row[9]).groups())
        assert 0 < low <= ratio <= high  # the median of the steps' ratios to the example's, and its quartiles
    assert rows["example"][9] == "1.00 (1.00–1.00)"
    saved = results.read_text()
    assert saved.startswith("# Benchmark results\n\n## Another benchmark\n\n| a |\n| --- |\n| 1 |\n")
    assert "## Training speed: `benchmarks/bench_train.py`" in saved
    assert [row[6] for row in table(saved)] == [row[6] for row in table(run.stdout)]


def test_bench_train_lockstep_processes_each_report_their_own_peak_memory(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_train.py"), "--tiny", "--no-in-process",
                          "--modes", "example,example:mixed_precision=bf16,default", "--steps", "1", "--warmup", "1",
                          "--threads", "1", "--no-save"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {row[6].strip("`"): row for row in table(run.stdout)}
    assert list(rows) == ["example", "example:mixed_precision=bf16", "default"]
    for row in rows.values():
        assert float(row[7]) > 0 and 100 < float(row[11]) < 10_000  # a process's peak RSS in MiB
        # the ratio to the first example mode, then to the second one (the baseline in bf16)
        first, second = re.fullmatch(r"(\S+) \(\S+–\S+\); (\S+) \(\S+–\S+\) vs `example:mixed_precision=bf16`",
                                     row[9]).groups()
        assert float(first) > 0 and float(second) > 0
    assert rows["example"][9].startswith("1.00 (1.00–1.00); ")
    assert rows["example:mixed_precision=bf16"][9].endswith("; 1.00 (1.00–1.00) vs `example:mixed_precision=bf16`")
    assert "\nexample:mixed_precision=bf16 (VAE and text encoder every step, bf16): " in run.stdout
    assert "\ndefault (latents+text cached): " in run.stdout


def test_bench_train_lets_the_example_change_only_its_precision():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_train.py"), "--tiny", "--modes",
                          "example:optim.compile=true", "--no-save"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "the example only its precision: example:mixed_precision=bf16" in run.stderr
