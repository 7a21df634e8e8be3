"""Prompts for QJL studio: a long English document, presets the app offers, and a passkey-retrieval generator.

The long document is the GNU GPL version 3 (copied verbatim from Debian's ``/usr/share/common-licenses/GPL-3``; its
notice allows verbatim copies): about 7,500 tokens of ordinary English prose, long enough to fill most of the embedded
model's 8k context without any download.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).parent
LONG_TEXT_FILE = HERE / "gpl-3.0.txt"

# Repeated filler of the passkey test (as in Mohtashami & Jaggi, "Landmark attention", 2023).
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_QUESTION = "What is the pass key? The pass key is"


@lru_cache(maxsize=1)
def long_text() -> str:
    """The long English document (the GNU GPL v3)."""
    return LONG_TEXT_FILE.read_text(encoding="utf-8")


def truncate_to_tokens(text: str, tokenizer, n_tokens: int) -> str:
    """The longest prefix of ``text`` with at most ``n_tokens`` tokens (cut at a token boundary)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= n_tokens else tokenizer.decode(ids[:n_tokens])


def long_document_question() -> tuple[str, str]:
    """``(prompt, expected answer)``: the whole long document, then a question whose answer sits in section 8,
    about 63% of the way in."""
    prompt = (f"{long_text()}\n\nQuestion: according to section 8 of the license above, within how many days after "
              "the copyright holder's notice must a licensee cure a violation for the license to be reinstated "
              "permanently? Answer with a number.")
    return prompt, "30"


def passkey_prompt(tokenizer, n_tokens: int, depth: float, seed: int = 0) -> tuple[str, str]:
    """``(prompt, passkey)``: a five-digit pass key hidden at ``depth`` (0 = start, 1 = end) of filler text, the
    whole prompt about ``n_tokens`` tokens long (before any chat template), ending with the question."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be between 0 and 1")
    passkey = str(random.Random(seed).randint(10_000, 99_999))
    intro = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n"
    needle = f" The pass key is {passkey}. Remember it. {passkey} is the pass key. "
    question = f"\n{PASSKEY_QUESTION}"

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    per_filler = count(FILLER * 8) / 8
    room = n_tokens - count(intro) - count(needle) - count(question)
    if room < 0:
        raise ValueError(f"n_tokens={n_tokens} is too short for a passkey prompt (needs {n_tokens - room})")
    n_filler = int(room / per_filler)
    before = round(n_filler * depth)
    return intro + FILLER * before + needle + FILLER * (n_filler - before) + question, passkey


# Prompt presets the app and the command line offer: name -> function of the tokenizer returning the prompt.
PROMPTS = {
    "Long document question (GPL v3, ~7.6k tokens)": lambda tokenizer: long_document_question()[0],
    "Passkey retrieval (2k tokens, depth 50%)": lambda tokenizer: passkey_prompt(tokenizer, 2000, 0.5)[0],
    "Summarise the document (first 1k tokens)": lambda tokenizer: truncate_to_tokens(long_text(), tokenizer, 1000)
    + "\n\nSummarise the text above in three sentences.",
    "Short chat": lambda tokenizer: "Explain in a few sentences why the sky is blue.",
}
