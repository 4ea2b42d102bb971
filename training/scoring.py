"""Answer and chain-of-thought scoring exactly as the original COCONUT's run.py scores a generation.

The original (facebookresearch/coconut, run.py, the validation loop) decodes the prompt together
with the generation, `tokenizer.decode(prompt + generated, skip_special_tokens=True)`, and
- answer: the text after the last '#', commas removed, stripped; compared as a string with
  `answer.replace(",", "").strip()`. A generation without '#' is therefore scored on the tail of the
  prompt's text (wrong, in practice), and matching is case-sensitive;
- CoT match: `"\\n".join(text.split("\\n")[1:]).split("#")[0].strip() == "\\n".join(steps)`: the text
  after the first line (meant to be the question), up to the first '#'.
Its latent markers were added with `tokenizer.add_tokens` (ordinary added tokens), so they survive
that decoding: here they are special tokens, and `decode_as_original` keeps them to give the same
text. Its CoT match is an artefact in two cases: at Coconut stage 0 the surviving markers precede
the steps, and with a multimodal prompt the first line is not the question; at stage k > 0 the
first k steps are latents and never written. `written_cot_match` is the corrected figure: the
generation alone, without markers, against the steps that the stage leaves in text.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from dataset import training_latents
from utils import Config


def decode_as_original(
    tokenizer: Any, prompt_ids: Sequence[int], new_ids: Sequence[int], eos_token_id: int, kept_ids: Collection[int]
) -> str:
    """The original's decoded text: prompt + generation up to eos, special tokens skipped except kept_ids.

    The original's generate never appends eos (it stops before it), so the generation is cut there.
    kept_ids are the latent markers, which the original's tokenizer treats as ordinary tokens. Runs
    of other tokens are decoded as a whole and joined with the markers' text: the markers are ASCII
    and start with '<' and end with '>', so no byte-level merge or clean-up crosses a boundary.
    """
    ids = list(prompt_ids) + _until_eos(new_ids, eos_token_id)
    pieces, run = [], []
    for token in ids:
        if token in kept_ids:
            pieces += [tokenizer.decode(run, skip_special_tokens=True), tokenizer.decode([token])]
            run = []
        else:
            run.append(token)
    pieces.append(tokenizer.decode(run, skip_special_tokens=True))
    return "".join(pieces)


def decode_generation(tokenizer: Any, new_ids: Sequence[int], eos_token_id: int) -> str:
    """The generated text alone (every special token, latent markers included, skipped)."""
    return tokenizer.decode(_until_eos(new_ids, eos_token_id), skip_special_tokens=True)


def _until_eos(ids: Sequence[int], eos_token_id: int) -> list[int]:
    ids = list(ids)
    return ids[: ids.index(eos_token_id)] if eos_token_id in ids else ids


def extract_answer(text: str) -> str:
    """The original's answer: the text after the last '#', commas removed, stripped."""
    return text.split("#")[-1].replace(",", "").strip()


def gold_answer(record: dict[str, Any]) -> str:
    """The original's reference answer: the record's answer, commas removed, stripped."""
    return record["answer"].replace(",", "").strip()


def original_cot(text: str) -> str:
    """The original's generated CoT: the text after the first line, up to the first '#', stripped."""
    return "\n".join(text.split("\n")[1:]).split("#")[0].strip()


def gold_cot(record: dict[str, Any]) -> str:
    """The original's reference CoT: the steps joined by newlines (not stripped)."""
    return "\n".join(record["steps"])


def written_cot(generation: str) -> str:
    """The reasoning a generation writes out: its text before the first '#', stripped."""
    return generation.split("#")[0].strip()


def written_cot_gold(record: dict[str, Any], stage: int, config: Config) -> str:
    """The steps a sample at this stage is trained to write out, as the generation would show them."""
    steps = record["steps"]
    return "\n".join(steps[training_latents(len(steps), stage, config)[0] :]).strip()
