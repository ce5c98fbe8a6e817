import pytest

from latentsd.tokenizer import BUILTIN_TOKENIZER_DIR, WORDS, load_tokenizer, write_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin")


@pytest.mark.parametrize("caption", ["a red circle on the left", "a purple triangle at the bottom",
                                     "a yellow square in the center", "A Green STAR on the right"])
def test_captions_tokenize_to_one_word_id_each(tok, caption):
    ids = tok(caption).input_ids
    words = caption.lower().split()
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1:-1]) == [w + "</w>" for w in words]
    assert tok.decode(ids, skip_special_tokens=True) == caption.lower()


def test_unknown_words_fall_back_to_pieces_not_padding(tok):
    ids = tok("zebra xylophone", padding="max_length", max_length=77).input_ids
    body = ids[1:ids.index(tok.eos_token_id)]
    assert len(body) > 2 and tok.pad_token_id not in body
    assert tok.decode(ids, skip_special_tokens=True) == "zebra xylophone"
    assert len(ids) == 77 and tok.model_max_length == 77


def test_shipped_files_are_reproducible(tmp_path):
    write_tokenizer(tmp_path)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (BUILTIN_TOKENIZER_DIR / name).read_bytes()


def test_every_listed_word_is_a_single_token(tok):
    for word in WORDS:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
