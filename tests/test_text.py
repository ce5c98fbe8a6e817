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
def test_unconditional_is_the_empty_prompt_and_matches_length(enc):
    cond, uncond = enc.encode_pair(["red " * 100, "a circle"], None)
    assert cond.shape == uncond.shape and cond.shape[1] == 2 * 77
    torch.testing.assert_close(uncond[1:], enc([""], num_chunks=2))
    _, neg = enc.encode_pair(["a circle"], ["blurry"])
    torch.testing.assert_close(neg, enc("blurry"))


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
    got = PromptEncoder(enc.tokenizer, offloaded, device="cpu").encode_pair(["a red circle"], ["blurry"])
    for a, b in zip(got, enc.encode_pair(["a red circle"], ["blurry"])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="meta"):  # what the parameters' device would give
        PromptEncoder(enc.tokenizer, offloaded)("a red circle")
