"""`latentsd demo` end to end on the shipped base model (few steps), and the shapes evaluation."""

import json

from latentsd.cli import main
from latentsd.data.shapes import score
from latentsd.demo import BASE_MODEL, generate_and_score, run_demo
from latentsd.images import load_grid


def test_demo_writes_data_grids_model_and_report_and_the_base_model_cannot_draw_stars(tmp_path):
    """The real base model, few sampling steps: before fine-tuning it follows the old prompts and draws no star; the
    report holds the scores of the grids it wrote, re-read and re-scored here."""
    out = tmp_path / "demo"
    report = run_demo(out, steps=2, base_model=BASE_MODEL, n_new=8, n_old=8, sample_steps=4,
                      overrides=["optim.train_batch_size=4", "cache.latents=false"])
    assert (out / "data/metadata.jsonl").read_text().count("star") == 8
    for when in ("before", "after"):
        cells, prompts = load_grid(out / f"{when}.png")
        assert len(cells) == 60 and sum("star" in p for p in prompts) == 30
        for group, start in (("old", 0), ("new", 30)):
            rescored = score(cells[start:start + 30], prompts[start:start + 30])
            assert {k: report[when][group][k] for k in ("n", "color", "shape", "position", "all")} == \
                {k: rescored[k] for k in ("n", "color", "shape", "position", "all")}
    assert report["before"]["old"]["all"] >= 0.95  # measured 1.0 with these 4 DDIM steps (README: 25 steps, 100 %)
    assert report["before"]["new"]["shape"] <= 0.1  # it never saw a star: measured 0.0
    assert (out / "finetune/model/model_index.json").is_file() and report["train_steps"] == 2
    assert json.loads((out / "report.json").read_text())["after"] == report["after"]
    assert "| after | new (30) |" in (out / "report.md").read_text()


def test_the_base_model_follows_the_held_out_combinations_it_never_saw(tmp_path):
    from latentsd.data.shapes import HELD_OUT

    result = generate_and_score(BASE_MODEL, {"held_out": list(HELD_OUT)}, tmp_path / "held_out.png", steps=6,
                                guidance=2.0, seed=1)
    assert result["held_out"]["n"] == 10 and result["held_out"]["all"] >= 0.95  # measured 1.0 (6 steps, seed 1)


def test_demo_without_a_base_model_says_how_to_build_it(tmp_path, capsys, monkeypatch):
    from latentsd import demo

    monkeypatch.setattr(demo, "BASE_MODEL", tmp_path / "missing")
    assert main(["demo", "--out", str(tmp_path / "d")]) == 2
    assert "make base-model" in capsys.readouterr().err


def test_eval_shapes_scores_seen_and_held_out_prompts(tmp_path, tiny_model_dir, capsys):
    assert main(["eval-shapes", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--seeds", "1",
                 "--steps", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["seen"]["n"] == 80 and result["held_out"]["n"] == 10
    assert (tmp_path / "eval-seed0.png").is_file()
