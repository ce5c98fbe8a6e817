import logging

import pytest
import torch

from latentsd.text import PromptEncoder


@pytest.fixture(scope="module")
def enc(tiny):
    return PromptEncoder(tiny.tokenizer, tiny.text_encoder)


@torch.no_grad()
def test_short_prompt_equals_plain_clip_encoding(enc, tiny):
    ids = tiny.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(enc.tokenize(["a red circle"])[:, 0], ids)
    torch.testing.assert_close(enc("a red circle"), tiny.text_encoder(ids)[0], rtol=0, atol=0)


@torch.no_grad()
def test_long_prompt_is_encoded_in_75_token_chunks(enc):
    words = ("red blue green " * 40).split()  # 120 one-token words: two chunks
    embeds = enc(" ".join(words))
    assert embeds.shape[1] == 2 * 77
    torch.testing.assert_close(embeds[:, :77], enc(" ".join(words[:75])))
    torch.testing.assert_close(embeds[:, 77:], enc(" ".join(words[75:]), num_chunks=1))


@torch.no_grad()
def test_truncation_warns_and_names_what_was_dropped(tiny, caplog):
    enc = PromptEncoder(tiny.tokenizer, tiny.text_encoder, max_chunks=1)
    with caplog.at_level(logging.WARNING, logger="latentsd.text"):
        embeds = enc("red " * 75 + "purple star")
    assert embeds.shape[1] == 77
    assert "purple star" in caplog.text


@torch.no_grad()
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_uses_an_earlier_layer_with_final_norm(enc, tiny, clip_skip):
    ids = enc.tokenize(["a blue square"])[:, 0]
    states = tiny.text_encoder(ids, output_hidden_states=True).hidden_states
    expected = tiny.text_encoder.final_layer_norm(states[-(clip_skip + 1)])
    got = enc("a blue square", clip_skip=clip_skip)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, enc("a blue square"))


@torch.no_grad()
def test_negatives_encoded_with_the_prompts_get_their_chunk_count(enc):
    embeds, mask = enc.encode(["red " * 100, "a circle", "", "blurry"], long_prompts=True)
    assert embeds.shape[1] == 2 * 77 and mask[:, 77:].sum(dim=1).tolist() == [77, 0, 0, 0]
    torch.testing.assert_close(embeds[2:3, :77], enc(""), rtol=0, atol=0)  # the trainer's dropped caption
    torch.testing.assert_close(embeds[3:, :77], enc("blurry"), rtol=0, atol=0)


def test_max_chunks_must_be_positive(tiny):
    with pytest.raises(ValueError, match="max_chunks"):
        PromptEncoder(tiny.tokenizer, tiny.text_encoder, max_chunks=0)


@torch.no_grad()
def test_token_ids_go_to_the_given_device_not_the_parameters_one(enc):
    """Under sequential offload the encoder's parameters are on `meta` and its hooks run it on `device`."""
    import copy

    from accelerate import cpu_offload

    offloaded = copy.deepcopy(enc.text_encoder)
    cpu_offload(offloaded, torch.device("cpu"))
    assert next(offloaded.parameters()).is_meta
    got, _ = PromptEncoder(enc.tokenizer, offloaded, device="cpu").encode(["a red circle", "blurry"])
    torch.testing.assert_close(got, enc.encode(["a red circle", "blurry"])[0], rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="meta"):  # what the parameters' device would give
        PromptEncoder(enc.tokenizer, offloaded)("a red circle")


# ---- PromptEncoder.encode: diffusers' default, opt-in long prompts (masked), A1111 weighting ---------------
LONG = "red " * 74 + "blue green purple star"  # 78 one-token words: 3 past diffusers' 75


def diffusers_ids(tokenizer, prompts):
    """diffusers' encode_prompt tokenization (the reference for the default path)."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def biased(tiny):
    """The tiny text encoder with a final layer-norm bias: a fresh one's hidden states have mean ~0 per token,
    which makes A1111's mean-restoring rescale degenerate; trained CLIP's do not."""
    import copy

    encoder = copy.deepcopy(tiny.text_encoder)
    with torch.no_grad():
        encoder.final_layer_norm.bias.copy_(0.4 + 0.2 * torch.randn(encoder.final_layer_norm.bias.shape,
                                                                     generator=torch.Generator().manual_seed(0)))
    return PromptEncoder(tiny.tokenizer, encoder)


@torch.no_grad()
def test_default_encode_equals_diffusers_encode_prompt(enc, tiny):
    import diffusers

    ref = diffusers.StableDiffusionPipeline(**tiny.as_dict(), safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False)
    prompts, negatives = [LONG, "a red circle"], ["blurry", "red " * 90]
    want_cond, want_uncond = ref.encode_prompt(prompts, "cpu", 1, True, negatives)
    embeds, mask = enc.encode(prompts + negatives)
    assert mask is None and embeds.shape == (4, 77, 32)
    torch.testing.assert_close(embeds[:2], want_cond, rtol=0, atol=0)
    torch.testing.assert_close(embeds[2:], want_uncond, rtol=0, atol=0)


@torch.no_grad()
def test_default_truncation_warns_with_diffusers_words(enc, tiny, caplog):
    import diffusers

    ref = diffusers.StableDiffusionPipeline(**tiny.as_dict(), safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False)
    theirs = logging.getLogger("diffusers")  # does not propagate to the root logger caplog listens on
    theirs.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING):
            ref.encode_prompt(LONG, "cpu", 1, False)
            diffusers_message = caplog.records[-1].getMessage()
            caplog.clear()
            enc.encode(LONG)
    finally:
        theirs.removeHandler(caplog.handler)
    assert "green purple star" in diffusers_message
    assert [r.name for r in caplog.records] == ["latentsd.text"]
    assert caplog.records[0].getMessage().startswith(diffusers_message)
    assert "long_prompts=True" in caplog.records[0].getMessage()  # and says how to keep it


@torch.no_grad()
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_default_clip_skip_is_an_earlier_layer_with_final_norm(enc, tiny, clip_skip):
    """diffusers' own clip_skip needs `text_encoder.text_model` (gone in transformers 5): closed form instead."""
    ids = diffusers_ids(tiny.tokenizer, [LONG, "a blue square"])
    states = tiny.text_encoder(ids, output_hidden_states=True).hidden_states
    expected = tiny.text_encoder.final_layer_norm(states[-(clip_skip + 1)])
    got, _ = enc.encode([LONG, "a blue square"], clip_skip=clip_skip)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(got, enc.encode([LONG, "a blue square"])[0])


@torch.no_grad()
def test_long_prompts_are_75_token_chunks_and_short_ones_unchanged(enc, tiny):
    words = ("red blue green " * 40).split()  # 120 one-token words: two chunks
    embeds, mask = enc.encode(" ".join(words), long_prompts=True)
    assert embeds.shape == (1, 2 * 77, 32) and mask is None
    ids = tiny.tokenizer(" ".join(words[75:]), add_special_tokens=False).input_ids
    second = torch.full((1, 77), tiny.tokenizer.pad_token_id)
    second[0, : len(ids) + 2] = torch.tensor([tiny.tokenizer.bos_token_id, *ids, tiny.tokenizer.eos_token_id])
    torch.testing.assert_close(embeds[:, :77], tiny.text_encoder(diffusers_ids(tiny.tokenizer, [" ".join(words)]))[0])
    torch.testing.assert_close(embeds[:, 77:], tiny.text_encoder(second)[0])
    short, short_mask = enc.encode(["a red circle", "blurry"], long_prompts=True)
    assert short_mask is None
    torch.testing.assert_close(short, enc.encode(["a red circle", "blurry"])[0], rtol=0, atol=0)


def _short_and_long(enc):
    return enc.encode(["a red circle", "blue " * 100], long_prompts=True)


@torch.no_grad()
def test_long_prompts_mask_whole_padding_chunks(enc):
    embeds, mask = _short_and_long(enc)
    assert embeds.shape == (2, 154, 32) and mask.dtype == torch.long
    assert mask[0].tolist() == [1] * 77 + [0] * 77 and mask[1].tolist() == [1] * 154
    torch.testing.assert_close(embeds[:1, :77], enc.encode("a red circle")[0], rtol=0, atol=0)
    _, fixed = enc.encode([""], long_prompts=True, num_chunks=3)  # e.g. negatives for 3-chunk prompt_embeds
    assert fixed[0].tolist() == [1] * 77 + [0] * 154


@torch.no_grad()
def test_masked_unet_output_of_a_prompt_is_the_same_alone_or_batched_with_a_longer_one(enc, tiny):
    """diffusers' UNet turns encoder_attention_mask (1 keep, 0 discard) into a -10000 attention bias."""
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    alone, alone_mask = enc.encode("a red circle", long_prompts=True)
    assert alone_mask is None
    want = tiny.unet(latents[:1], 500, encoder_hidden_states=alone).sample
    embeds, mask = _short_and_long(enc)
    got = tiny.unet(latents, 500, encoder_hidden_states=embeds, encoder_attention_mask=mask).sample[:1]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    unmasked = tiny.unet(latents, 500, encoder_hidden_states=embeds).sample[:1]
    assert (unmasked - want).abs().max() > 1e-3  # the padding chunk does matter when it is not masked


@torch.no_grad()
def test_long_prompts_beyond_max_chunks_warn_with_what_is_dropped(tiny, caplog):
    enc = PromptEncoder(tiny.tokenizer, tiny.text_encoder, max_chunks=2)
    with caplog.at_level(logging.WARNING, logger="latentsd.text"):
        embeds, mask = enc.encode(["red " * 150 + "purple star", "a circle"], long_prompts=True)
    assert embeds.shape[1] == 2 * 77 and mask[1].tolist() == [1] * 77 + [0] * 77
    assert "purple star" in caplog.text and "max_chunks" in caplog.text


@pytest.mark.parametrize("bad", [[], ["ok", 3], None])
def test_encode_rejects_what_is_not_a_prompt_list(enc, bad):
    with pytest.raises(ValueError, match="prompts must be"):
        enc.encode(bad)


def test_encode_rejects_a_nonpositive_num_chunks(enc):
    with pytest.raises(ValueError, match="num_chunks"):
        enc.encode("a circle", long_prompts=True, num_chunks=0)


# ---- weighting --------------------------------------------------------------------------------------------
def a1111_emphasis(z, w):
    """A1111's 'Original' emphasis on one prompt's chunk, in closed form: z·w, rescaled to z's mean."""
    weighted = z * w[:, None]
    return weighted * (z.mean() / weighted.mean())


def words_and_weights(tokenizer, pairs):
    """Tokens of each word on its own and their weights: the reference alignment of weights to BPE tokens."""
    ids, weights = [], []
    for word, weight in pairs:
        tokens = tokenizer(word, add_special_tokens=False).input_ids
        ids += tokens
        weights += [weight] * len(tokens)
    return ids, torch.tensor(weights)


@torch.no_grad()
@pytest.mark.parametrize("prompt", ["a (red:1.0) circle", "a red circle", "(a red:1) ((circle:1.0):1)"])
def test_weights_of_one_equal_the_plain_encoding_exactly(biased, prompt):
    for kw in ({}, {"long_prompts": True}):
        got, mask = biased.encode(prompt, weighting=True, **kw)
        assert mask is None
        torch.testing.assert_close(got, biased.encode("a red circle")[0], rtol=0, atol=0)


@torch.no_grad()
def test_weighted_words_follow_a1111_closed_form_token_by_token(biased, tiny):
    # "starfish" is 6 BPE tokens of the tiny tokenizer: each must carry the word's weight
    pairs = [("a", 1.0), ("red", 1.3), ("circle", 1.0), ("above", 1 / 1.1), ("starfish", 1.21)]
    ids, weights = words_and_weights(tiny.tokenizer, pairs)
    plain = "a red circle above starfish"
    assert ids == tiny.tokenizer(plain, add_special_tokens=False).input_ids and len(ids) == 10
    w = torch.ones(77)
    w[1: 1 + len(ids)] = weights
    z = biased.text_encoder(diffusers_ids(tiny.tokenizer, [plain]))[0][0]
    got, _ = biased.encode("a (red:1.3) circle [above] ((starfish))", weighting=True)
    torch.testing.assert_close(got[0], a1111_emphasis(z, w), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[0], z, atol=1e-3)


@torch.no_grad()
def test_an_encoder_with_zero_mean_states_gets_the_weights_without_the_rescale(enc, tiny):
    """A fresh encoder's states have mean ~1e-9: A1111's ratio of means would be noise there."""
    z = tiny.text_encoder(diffusers_ids(tiny.tokenizer, ["a red circle"]))[0][0]
    w = torch.ones(77)
    w[2] = 1.3
    got, _ = enc.encode("a (red:1.3) circle", weighting=True)
    torch.testing.assert_close(got[0], z * w[:, None], rtol=0, atol=0)


@torch.no_grad()
def test_weighting_works_per_prompt_with_long_prompts_and_negatives(biased, tiny):
    prompt, negative = "red " * 80 + "(blue:1.4) circle", "[blurry] (dark:0.7)"  # blue sits in chunk 2
    got, mask = biased.encode([prompt, negative], long_prompts=True, weighting=True)
    assert mask[1].tolist() == [1] * 77 + [0] * 77
    torch.testing.assert_close(got[:1], biased.encode(prompt, long_prompts=True, weighting=True)[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1:, :77], biased.encode(negative, weighting=True)[0], rtol=0, atol=0)
    plain, _ = biased.encode("red " * 80 + "blue circle", long_prompts=True)
    torch.testing.assert_close(got[0, :77], plain[0, :77], rtol=0, atol=0)  # nothing weighted in chunk 1
    w = torch.ones(77)
    w[6] = 1.4  # BOS, red x5, blue
    torch.testing.assert_close(got[0, 77:], a1111_emphasis(plain[0, 77:], w), rtol=1e-5, atol=1e-6)
    _, neg_weights = words_and_weights(tiny.tokenizer, [("blurry", 1 / 1.1), ("dark", 0.7)])
    w = torch.ones(77)
    w[1: 1 + len(neg_weights)] = neg_weights
    z = biased.text_encoder(diffusers_ids(tiny.tokenizer, ["blurry dark"]))[0][0]
    torch.testing.assert_close(got[1, :77], a1111_emphasis(z, w), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_break_starts_a_new_chunk(enc, caplog):
    prompt = "red circle BREAK blue square"
    got, mask = enc.encode(prompt, long_prompts=True, weighting=True)
    want = torch.cat([enc.encode("red circle")[0], enc.encode("blue square")[0]], dim=1)
    assert mask is None
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with caplog.at_level(logging.WARNING, logger="latentsd.text"):
        truncated, _ = enc.encode(prompt, weighting=True)  # one window: what follows BREAK is cut
    torch.testing.assert_close(truncated, enc.encode("red circle")[0], rtol=0, atol=0)
    assert "blue square" in caplog.text
    assert enc.encode(prompt, long_prompts=True)[0].shape[1] == 77  # without weighting BREAK is a word


@torch.no_grad()
def test_escaped_brackets_are_literal_text(enc):
    got, _ = enc.encode(r"a \(red\) \[circle\]", weighting=True)
    torch.testing.assert_close(got, enc.encode("a (red) [circle]")[0], rtol=0, atol=0)


def test_a_weight_that_is_not_a_number_is_an_error_naming_it(enc):
    with pytest.raises(ValueError, match=r"'1\.2\.3' is not a number"):
        enc.encode("a (red:1.2.3) circle", weighting=True)


# ---- through the pipeline ---------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("weighted", [False, True])
def test_pipeline_image_of_a_prompt_is_the_same_alone_or_batched_with_a_long_one(tiny, weighted):
    from latentsd.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline(**tiny.as_dict())
    pipe.set_progress_bar_config(disable=True)
    short, long_ = ("a (red:1.3) circle", "(blue:0.8) " * 100) if weighted else ("a red circle", "blue " * 100)

    def run(prompts, negatives):
        return pipe(prompts, negative_prompt=negatives, num_inference_steps=3, guidance_scale=3.0, output_type="np",
                    long_prompts=True, prompt_weighting=weighted,
                    generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))]).images

    alone = run([short], ["[dark]"])
    batched = run([short, long_], ["[dark]", "gray " * 80])
    assert float(abs(batched[0] - alone[0]).max()) <= 1e-5


@torch.no_grad()
def test_cli_flags_reach_the_pipeline(tiny_model_dir, tmp_path):
    import PIL.Image

    from latentsd.cli import main
    from latentsd.generate import load_pipeline

    prompt = "red " * 80 + "(blue:1.5) circle"  # past 77 tokens, and weighted
    common = ["generate", prompt, "--model", str(tiny_model_dir), "--steps", "2", "--device", "cpu"]
    assert main(common + ["--long-prompts", "--prompt-weighting", "--out", str(tmp_path / "long.png")]) == 0
    assert main(common + ["--out", str(tmp_path / "plain.png")]) == 0
    pipe = load_pipeline(str(tiny_model_dir), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    want = pipe(prompt, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(0), long_prompts=True,
                prompt_weighting=True).images[0]
    assert PIL.Image.open(tmp_path / "long.png").tobytes() == want.tobytes()
    assert PIL.Image.open(tmp_path / "plain.png").tobytes() != want.tobytes()
