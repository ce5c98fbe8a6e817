"""Textual inversion (+ pivotal tuning): only the new tokens' vectors train, the loss falls, the exports load in
diffusers and latentsd and reproduce the exported model, resume is exact."""

from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from latentsd import LatentDiffusionPipeline
from latentsd.config import ConfigError, load_config
from latentsd.data.shapes import all_specs, make_shapes_dataset, write_imagefolder
from latentsd.demo import BASE_MODEL
from latentsd.generate import load_embedding
from latentsd.latents import encode
from latentsd.models import build_components
from latentsd.training.logs import read_metrics
from latentsd.training.textual_inversion import MultiVectorPromptEncoder, make_textual_inversion
from latentsd.training.trainer import train

from shapes_adherence import adherence

ROOT = Path(__file__).resolve().parent.parent
TOKEN, INIT = "<glyph>", "square"
TE_FILE, UNET_FILE = "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors"


def _glyph_data(path, n=16):
    """Triangles captioned with the new word: 'a red <glyph> on the left'."""
    ds = make_shapes_dataset(n, seed=0, specs=all_specs(shapes=["triangle"]))
    return write_imagefolder(ds.map(lambda r: {"text": r["text"].replace("triangle", TOKEN)}), path)


def _ti_cfg(out, data, *extra):
    return load_config(ROOT / "configs/train/demo_star.yaml", [
        f"output_dir={out}", f"data.dataset={data}", "max_steps=15", "checkpoint_every=100", "log_every=1",
        "model.train_text_encoder=false", "cache.latents=false", "data.caption_dropout=0", "optim.train_batch_size=8",
        "optim.learning_rate=5e-2", "optim.lr_scheduler=constant", "optim.lr_warmup_steps=0",
        f"ti.tokens=[\"{TOKEN}\"]", "ti.num_vectors=2", f"ti.init_word={INIT}", *extra])


@pytest.fixture(scope="module")
def glyph_run(tmp_path_factory):
    """15 textual-inversion steps on the shipped shapes base model (a few seconds)."""
    tmp = tmp_path_factory.mktemp("ti")
    data = _glyph_data(tmp / "data")
    train(_ti_cfg(tmp / "run", data))
    return tmp / "run", data


def _pipe(path, cls=LatentDiffusionPipeline):
    pipe = cls.from_pretrained(path, torch_dtype=torch.float32)  # the shipped text encoder is fp16 on disk
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def _fixed_loss(pipe, data: Path, replace: str) -> float:
    """ε-MSE of ``pipe`` on the training images (posterior mode, fixed noise and timesteps), captions with the
    new token replaced by ``replace``: a deterministic loss that does not use the trainer's code."""
    import json

    import PIL.Image

    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    pixels = torch.stack([torch.from_numpy(np.array(PIL.Image.open(data / r["file_name"]).convert("RGB")))
                          for r in rows]).permute(0, 3, 1, 2).float() / 127.5 - 1
    latents = encode(pipe.vae, pixels, sample=False)
    embeds, _ = pipe.encode_prompt([r["text"].replace(TOKEN, replace) for r in rows], "cpu", 1, False)
    losses = []
    for t in (100, 300, 500, 700, 900):
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(t))
        steps = torch.full((len(rows),), t)
        pred = pipe.unet(pipe.scheduler.add_noise(latents, noise, steps), steps, encoder_hidden_states=embeds).sample
        losses.append(torch.nn.functional.mse_loss(pred, noise).item())
    return float(np.mean(losses))


def test_only_the_new_vectors_train_and_the_loss_falls(glyph_run):
    run, data = glyph_run
    base_te, base_unet = load_file(BASE_MODEL / TE_FILE), load_file(BASE_MODEL / UNET_FILE)
    te, unet = load_file(run / "model" / TE_FILE), load_file(run / "model" / UNET_FILE)
    assert all(torch.equal(unet[k], v.float()) for k, v in base_unet.items())  # the UNet is frozen
    key = next(k for k in te if k.endswith("token_embedding.weight"))
    n = base_te[key].shape[0]
    assert te[key].shape[0] == n + 2  # <glyph>, <glyph>_1
    assert torch.equal(te[key][:n], base_te[key].float())  # every old row bit for bit (no weight decay on them)
    assert all(torch.equal(te[k], v.float()) for k, v in base_te.items() if k != key)
    init = base_te[key][_ids(INIT)].float()
    assert init.shape[0] == 1  # one token: both vectors started as it
    assert all(not torch.equal(row, init[0]) for row in te[key][n:])  # both new rows moved from "square"
    # the loss on the training images fell, from the base model's with "square square" (what the init vectors are)
    # toward the base model's with the true word
    before = _fixed_loss(_pipe(BASE_MODEL), data, f"{INIT} {INIT}")
    truth = _fixed_loss(_pipe(BASE_MODEL), data, "triangle")
    after = _fixed_loss(_pipe(run / "model"), data, TOKEN)
    assert truth < before and after < before - 0.3 * (before - truth), (before, after, truth)
    losses = [m["loss"] for m in read_metrics(run).values()]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def _ids(word):
    return _pipe(BASE_MODEL).tokenizer(word, add_special_tokens=False).input_ids


def _images(pipe, prompt):
    return pipe(prompt, num_inference_steps=4, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def test_exported_embeddings_reproduce_the_model_in_diffusers_and_latentsd(glyph_run):
    run, _ = glyph_run
    prompt = f"a red {TOKEN} on the left"
    reference = _images(_pipe(run / "model", diffusers.StableDiffusionPipeline), prompt)
    theirs = _pipe(BASE_MODEL, diffusers.StableDiffusionPipeline)
    theirs.load_textual_inversion(str(run / "embeddings" / "glyph"))  # learned_embeds.safetensors
    np.testing.assert_allclose(_images(theirs, prompt), reference, atol=1e-5)
    ours = _pipe(run / "model")
    np.testing.assert_allclose(_images(ours, prompt), reference, atol=1e-5)
    a1111 = _pipe(BASE_MODEL)
    assert load_embedding(a1111, run / "embeddings" / "glyph.safetensors") == "glyph"  # A1111: the file name
    np.testing.assert_allclose(_images(a1111, "a red glyph on the left"), reference, atol=1e-5)
    vectors = load_file(run / "embeddings" / "glyph.safetensors")["emb_params"]
    assert torch.equal(vectors, load_file(run / "embeddings/glyph/learned_embeds.safetensors")[TOKEN])
    assert vectors.shape == (2, theirs.text_encoder.config.hidden_size)


def test_training_captions_expand_like_the_pipelines_prompts():
    """A multi-vector token reads all its vectors in training exactly as diffusers' pipeline expands prompts."""
    parts = build_components("tiny", seed=0)
    ti = make_textual_inversion(load_config(None, [f"ti.tokens=[\"{TOKEN}\"]", "ti.num_vectors=3",
                                                   "data.dataset=x"]).ti, parts.tokenizer)
    ti.add_rows(parts.text_encoder)
    ti.embedding.new.data.normal_()
    captions = [f"a {TOKEN} at the top", "a red circle"]
    ids = MultiVectorPromptEncoder(parts.tokenizer, parts.text_encoder, max_chunks=1).tokenize(captions)
    assert ids[0, 0, 2:5].tolist() == parts.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1", f"{TOKEN}_2"])
    pipe = LatentDiffusionPipeline(**parts.as_dict())
    with torch.no_grad():
        ours = MultiVectorPromptEncoder(parts.tokenizer, parts.text_encoder, max_chunks=1)(captions)
        theirs, _ = pipe.encode_prompt(captions, "cpu", 1, False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def _tiny_cfg(out, data, *extra):
    return load_config(ROOT / "configs/train/tiny.yaml", [
        f"output_dir={out}", f"data.dataset={data}", "max_steps=4", "checkpoint_every=2", "checkpoints_total_limit=0",
        "optim.train_batch_size=2", "data.random_flip=true", "data.center_crop=false", "data.caption_dropout=0.2",
        f"ti.tokens=[\"{TOKEN}\"]", "ti.num_vectors=2", *extra])


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return _glyph_data(tmp_path_factory.mktemp("tiny_glyph"), n=8)


@pytest.mark.parametrize("extra", [[], ["lora.enabled=true"], ["lora.enabled=true", "lora.text_encoder=true"]],
                         ids=["ti", "pivotal", "pivotal+text_encoder_lora"])
def test_resume_with_textual_inversion_is_bit_identical(tmp_path, tiny_data, extra):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(_tiny_cfg(full, tiny_data, *extra))
    train(_tiny_cfg(resumed, tiny_data, *extra, f"resume={full}/checkpoints/step-0000002"))
    a, b = read_metrics(full), read_metrics(resumed)
    assert sorted(b) == [3, 4] and all(a[s]["loss"] == b[s]["loss"] for s in b)
    for name in ("glyph.safetensors", "glyph/learned_embeds.safetensors"):
        va, vb = (load_file(run / "embeddings" / name) for run in (full, resumed))
        assert all(torch.equal(va[k], vb[k]) for k in va)
    for file in (TE_FILE, UNET_FILE):
        wa, wb = load_file(full / "model" / file), load_file(resumed / "model" / file)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_pivotal_tuning_exports_lora_and_vectors_that_rebuild_the_model(tmp_path, tiny_data, tiny_model_dir,
                                                                        precision):
    """TI + LoRA (UNet and text encoder): base + LoRA file + embedding file equals the exported model, in diffusers;
    under bf16 the frozen text encoder rows come from the source weights, not their bf16 compute copy."""
    out = tmp_path / "run"
    train(_tiny_cfg(out, tiny_data, f"model.pretrained={tiny_model_dir}", "lora.enabled=true",
                    "lora.text_encoder=true", "optim.learning_rate=1e-2", "ti.init_word=red",
                    f"mixed_precision='{precision}'"))
    base, model = (load_file(Path(p) / TE_FILE) for p in (tiny_model_dir, out / "model"))
    key = next(k for k in model if k.endswith("token_embedding.weight"))
    assert torch.equal(model[key][:len(base[key])], base[key])
    prompt = f"a {TOKEN} on the left"
    reference = _images(_pipe(out / "model", diffusers.StableDiffusionPipeline), prompt)
    rebuilt = _pipe(tiny_model_dir, diffusers.StableDiffusionPipeline)
    rebuilt.load_lora_weights(str(out / "lora"))
    rebuilt.load_textual_inversion(str(out / "embeddings" / "glyph"))
    np.testing.assert_allclose(_images(rebuilt, prompt), reference, atol=1e-4)
    # training moved the model: the base with what the vectors started as ("red red") renders differently
    assert not np.allclose(_images(_pipe(tiny_model_dir), "a red red on the left"), reference, atol=1e-3)


@pytest.mark.parametrize("overrides,message", [
    (['ti.tokens=["<GLYPH>"]'], "lowercases"),
    (['ti.tokens=["a b"]'], "one word"),
    (['ti.tokens=["<x>", "x"]'], "distinct file names"),
    (['ti.tokens=["<t>"]', "ti.num_vectors=0"], "num_vectors"),
])
def test_bad_textual_inversion_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs/train/tiny.yaml", overrides)


def test_textual_inversion_with_a_fully_trained_text_encoder_is_refused():
    with pytest.raises(ConfigError, match="model.train_text_encoder"):
        load_config(ROOT / "configs/train/tiny.yaml", ['ti.tokens=["<t>"]', "model.train_text_encoder=true"])


@pytest.mark.parametrize("cfg_args,message", [
    (['ti.tokens=["red"]'], "already knows"),
    (['ti.tokens=["<t>"]', "ti.init_word=<t>"], "init_word"),
])
def test_a_known_token_or_an_unusable_init_word_is_a_clear_error(cfg_args, message):
    parts = build_components("tiny", seed=0)
    with pytest.raises(ValueError, match=message):
        ti = make_textual_inversion(load_config(None, ["data.dataset=x", *cfg_args]).ti, parts.tokenizer)
        ti.add_rows(parts.text_encoder)


# ---- shown to learn on the shapes world (slow: minutes of CPU; numbers in the README) ------------------
def textual_inversion_on_shapes(tmp_path, shape: str = "triangle", steps: int = 200, lr: float = 5e-2,
                                *extra: str) -> dict:
    """50 images of ``shape`` captioned 'a {color} <glyph> {where}' teach the new token <glyph> (one vector, from
    'square'); everything else frozen (``extra`` ``lora.enabled=true``: pivotal tuning). Returns the scorer's results
    for the 30 '<glyph>' prompts judged as ``shape``: before (the base model with 'square', what the vector starts
    as) and after."""
    specs = all_specs(shapes=[shape])
    ds = make_shapes_dataset(50, seed=0, specs=specs)
    data = write_imagefolder(ds.map(lambda r: {"text": r["text"].replace(shape, TOKEN)}), tmp_path / "data")
    summary = train(load_config(ROOT / "configs/train/demo_star.yaml", [
        f"output_dir={tmp_path / 'run'}", f"data.dataset={data}", f"max_steps={steps}", f"checkpoint_every={steps}",
        "model.train_text_encoder=false", "optim.train_batch_size=16", f"optim.learning_rate={lr}",
        "optim.lr_scheduler=constant", "optim.lr_warmup_steps=0", f"ti.tokens=[\"{TOKEN}\"]", f"ti.init_word={INIT}",
        *extra]))
    targets = [s.caption for s in specs]
    return {"before": adherence(BASE_MODEL, [t.replace(shape, INIT) for t in targets], targets),
            "after": adherence(summary["model"], [t.replace(shape, TOKEN) for t in targets], targets)}


@pytest.mark.slow
def test_a_new_token_trained_on_triangles_draws_triangles(tmp_path):
    scores = textual_inversion_on_shapes(tmp_path)
    print(scores)
    assert scores["before"]["shape"] <= 0.1 and scores["after"]["shape"] >= 0.9


@pytest.mark.slow
def test_pivotal_tuning_teaches_a_shape_the_base_model_never_saw(tmp_path):
    """Stars: a token alone cannot make the frozen UNet draw them; the token with a LoRA (pivotal tuning) can."""
    alone = textual_inversion_on_shapes(tmp_path / "ti", "star", 300)
    pivotal = textual_inversion_on_shapes(tmp_path / "pivotal", "star", 300, 5e-3, "lora.enabled=true", "lora.rank=8")
    print({"ti": alone, "pivotal": pivotal})
    assert alone["after"]["shape"] <= 0.2 and pivotal["after"]["shape"] >= 0.8
