import pytest

import assets


def test_long_text_is_long_english():
    text = assets.long_text()
    assert "GNU GENERAL PUBLIC LICENSE" in text and len(text.split()) > 5000


def test_long_document_question_answer_is_in_the_text():
    prompt, answer = assets.long_document_question()
    assert prompt.startswith(assets.long_text()[:100]) and prompt.endswith("Answer with a number.")
    assert f"prior to {answer} days" in prompt


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_length_and_depth(embedded, depth):
    _, tokenizer = embedded
    prompt, key = assets.passkey_prompt(tokenizer, 600, depth, seed=3)
    n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert 560 <= n <= 600
    assert len(key) == 5 and prompt.count(key) == 2
    where = prompt.index(key) / len(prompt)
    assert abs(where - depth) < 0.1
    assert assets.passkey_prompt(tokenizer, 600, depth, seed=3) == (prompt, key)
    assert assets.passkey_prompt(tokenizer, 600, depth, seed=4)[1] != key


def test_passkey_prompt_rejects_bad_arguments(embedded):
    _, tokenizer = embedded
    with pytest.raises(ValueError, match="depth"):
        assets.passkey_prompt(tokenizer, 600, 1.5)
    with pytest.raises(ValueError, match="too short"):
        assets.passkey_prompt(tokenizer, 10, 0.5)


def test_prompt_presets_build(embedded):
    _, tokenizer = embedded
    for name, build in assets.PROMPTS.items():
        assert build(tokenizer).strip(), name
