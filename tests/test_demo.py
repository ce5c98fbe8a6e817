"""`latentsd demo` end to end on the tiny random model (the real run uses the shipped base model)."""

import json

from latentsd.cli import main
from latentsd.demo import run_demo
from latentsd.images import load_grid


def test_demo_writes_data_grids_model_and_report(tmp_path, tiny_model_dir):
    out = tmp_path / "demo"
    report = run_demo(out, steps=2, base_model=tiny_model_dir, n_new=8, n_old=8, sample_steps=2,
                      overrides=["optim.train_batch_size=4", "cache.latents=false"])
    assert (out / "data/metadata.jsonl").read_text().count("star") == 8
    for when in ("before", "after"):
        cells, prompts = load_grid(out / f"{when}.png")
        assert len(cells) == 60 and sum("star" in p for p in prompts) == 30
        for group in ("old", "new"):
            scores = report[when][group]
            assert scores["n"] == 30 and 0.0 <= scores["all"] <= scores["color"] <= 1.0
    assert (out / "finetune/model/model_index.json").is_file() and report["train_steps"] == 2
    assert json.loads((out / "report.json").read_text())["after"] == report["after"]
    assert "| after | new (30) |" in (out / "report.md").read_text()


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
