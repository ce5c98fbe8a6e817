"""The A1111 weighting parser, on the examples of A1111's own `parse_prompt_attention` docstring and more."""

import pytest

from latentsd.prompt_weights import parse_prompt_weights

# (prompt, fragments) from stable-diffusion-webui modules/prompt_parser.py's docstring
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize("prompt,expected", A1111_EXAMPLES)
def test_a1111_docstring_examples(prompt, expected):
    got = parse_prompt_weights(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


@pytest.mark.parametrize("prompt,expected", [
    ("[small]", [("small", 1 / 1.1)]),
    ("[[small]] cat", [("small", 1 / 1.21), (" cat", 1.0)]),
    ("((big:2)) [x]", [("big", 2 * 1.1), (" ", 1.0), ("x", 1 / 1.1)]),
    ("(a [b] c:1.5)", [("a ", 1.5), ("b", 1.5 / 1.1), (" c", 1.5)]),
    ("(neg:-0.5) ok", [("neg", -0.5), (" ok", 1.0)]),
    ("([mixed)]", [("mixed", 1.0)]),  # a round and a square bracket cancel, whichever closes first
    (r"a \\ b \\( c", [("a \\ b \\", 1.0), (" c", 1.1)]),  # \\ is a backslash, then ( opens
    ("stray) and ] and : here", [("stray) and ] and : here", 1.0)]),
    ("ratio 16:9", [("ratio 16:9", 1.0)]),
    ("x:1.3) y", [("x:1.3) y", 1.0)]),  # a weight with no open bracket is text
    ("(word: 1.3)", [("word: 1.3", 1.1)]),  # A1111 allows no space before the number
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
])
def test_nesting_escapes_and_literals(prompt, expected):
    got = parse_prompt_weights(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_break_is_its_own_fragment():
    assert parse_prompt_weights("a cat BREAK (a dog) BREAK") == [
        ("a cat", 1.0), ("BREAK", None), ("a dog", 1.1), ("BREAK", None)]
    assert parse_prompt_weights("BREAKFAST and break") == [("BREAKFAST and break", 1.0)]  # a word of its own only


@pytest.mark.parametrize("prompt", ["(red:1.2.3)", "(red:.)"])
def test_a_weight_that_is_not_a_number_is_an_error(prompt):
    with pytest.raises(ValueError, match="is not a number"):
        parse_prompt_weights(prompt)
