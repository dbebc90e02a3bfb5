"""A tiny, offline, randomly initialised Qwen2.5-VL: the stand-in policy for tests and the bundled default.

:func:`build_tiny_qwen2_5_vl` writes an ordinary Hugging Face model directory (``config.json``, safetensors weights,
``generation_config.json``, ``tokenizer.json`` + ``tokenizer_config.json``, ``chat_template.jinja``,
``preprocessor_config.json`` …) that ``Qwen2_5_VLForConditionalGeneration.from_pretrained`` /
``AutoProcessor.from_pretrained`` reload with no network, that ``transformers serve`` serves and that the training code
fine-tunes. Nothing is downloaded:

* the model comes from a :class:`~transformers.Qwen2_5_VLConfig` (2 text layers, hidden 64; a 2-block vision tower
  with Qwen's patch 14 / spatial merge 2 / temporal patch 2, so images are still smart-resized to multiples of 28);
* the tokenizer is a byte-level BPE trained here with the ``tokenizers`` library on a small built-in corpus (the
  action grammar, tags, clinical words), digits split one per token as in Qwen2, with all Qwen2.5-VL special tokens
  and Qwen's chat template;
* the processor is a :class:`~transformers.Qwen2_5_VLProcessor` with a :class:`~transformers.Qwen2VLImageProcessor`
  fixed to :data:`TINY_MIN_PIXELS` / :data:`TINY_MAX_PIXELS`.

Everything is deterministic given the seed. :func:`ensure_tiny_model` builds once into a cache directory and reuses
it; concurrent builders (threads, processes, pytest-xdist workers) each build in a private temporary directory and
publish it with one atomic ``rename``, so a reader never sees a half-written model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ibisagent.observation import DEFAULT_MIN_PIXELS

#: Bump when the recipe changes so that caches built by older code are not reused.
TINY_VERSION = 2

#: RoPE base of the tiny language model. Qwen2.5-VL's M-RoPE gives each position axis a contiguous block of the
#: rotary frequencies — time the highest, height the middle, width the lowest (``mrope_section`` [2, 3, 3] of the 8
#: frequency pairs at head dim 16). With Qwen's base 1e6 the width pairs turn by at most 1.8e-4 rad per token, so
#: across an 8 × 8 token grid the language model sees no horizontal position at all (height pairs ≤ 0.25 rad). Base 10
#: turns the width pairs by 0.13–0.24 rad per token (1–2 rad across the grid) and the height pairs by 0.32–0.56 rad;
#: the prompts are short (~100 tokens with phrase tokens), so the faster text frequencies cost nothing. Measured on
#: the real-MRI tuning set with a trainable vision tower: docs/TRAINING.md.
TINY_ROPE_THETA = 10.0

#: Pixel budget of the tiny model's image processor: 2×2 to 8×8 merged tokens (56×56 … 224×224 px); the floor is
#: Qwen2.5-VL's own (:data:`ibisagent.observation.DEFAULT_MIN_PIXELS`).
TINY_MIN_PIXELS = DEFAULT_MIN_PIXELS
TINY_MAX_PIXELS = 224 * 224

#: Qwen2.5-VL's special tokens, in Qwen's order (ids follow the BPE vocabulary, so they are small here).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
#: Qwen2.5's non-special added tokens (tool calling, FIM); kept so that templates written for Qwen tokenise alike.
QWEN_ADDED_TOKENS: tuple[str, ...] = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

#: The chat template shipped with Qwen2.5-VL-*-Instruct (images and videos as vision_start/pad/end).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_VOCAB_SIZE = 1024  # upper bound of the BPE vocabulary incl. special tokens (the small corpus yields fewer)

_CORPUS_LINES: tuple[str, ...] = (
    "<think>\nThe target is partly covered; the mask misses the lower part.\n</think>",
    "<action>\nPositive Point (0.5123, 0.3012)\n</action>",
    "<action>\nNegative Point (0.2100, 0.7000) [left kidney]\n</action>",
    "<action>\nPositive Point (0.4471, 0.6089)\nNegative Point (0.8125, 0.1250)\n</action>",
    "<action>\nUndo\n</action>",
    "<action>\nReset\n</action>",
    "<action>\nTerminate\n</action>\n<answer>\nThe liver tumour is segmented.\n</answer>",
    "<answer>\nnot present\n</answer>",
    "Termination",
    "Segment the pancreatic tumour in this CT slice.",
    "Segment the liver, the spleen, the left kidney and the right kidney.",
    "Please segment the lesion in this MR image. The green overlay shows the current mask.",
    "The current mask is shown in green. Refine it with positive or negative points, undo, reset or terminate.",
    "Is there a nodule in the right lung? Answer yes or no.",
    "yes no The mask covers the whole organ now, so I stop. The overlay leaks into the adjacent bowel.",
    "brain tumour, polyp, skin lesion, breast mass, prostate, heart, aorta, vessel, bone, cell, nucleus, gland",
    "CT MRI MR X-ray ultrasound endoscopy dermoscopy fundus pathology microscopy PET axial coronal sagittal",
    "The false negative region is near the upper left border; a positive click at its centre should fix it.",
    "The false positive region lies outside the target; a negative click removes it.",
    "You are a helpful assistant. You are an expert radiologist segmenting medical images step by step.",
    "0 1 2 3 4 5 6 7 8 9 0.0000 1.0000 0.5000 (x, y) [target name]",
    "system user assistant image video text",
)


def _corpus() -> list[str]:
    lines = list(_CORPUS_LINES)
    # Every printable ASCII character at least once, so the BPE learns merges over the whole alphabet.
    lines.append("".join(chr(c) for c in range(32, 127)))
    return lines * 4


def _train_tokenizer(extra_corpus: Sequence[str] = (), vocab_size: int = _VOCAB_SIZE, phrases: Sequence[str] = ()):
    """A byte-level BPE trained on the built-in corpus (plus ``extra_corpus``), Qwen-style (digits split), with the
    Qwen special tokens and each of ``phrases`` as one added (non-special) token."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(QWEN_SPECIAL_TOKENS) - len(QWEN_ADDED_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus() + [line for line in extra_corpus for _ in range(4)], trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_ADDED_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in dict.fromkeys(phrases) if t])
    return tok


def build_tiny_qwen2_5_vl(out_dir: str | os.PathLike[str], seed: int = 0, *, hidden_size: int = 64,
                          num_layers: int = 2, max_pixels: int = TINY_MAX_PIXELS, corpus: Sequence[str] = (),
                          vocab_size: int = _VOCAB_SIZE, vision_hidden_size: int = 32,
                          phrases: Sequence[str] = (), rope_theta: float = TINY_ROPE_THETA) -> Path:
    """Write a tiny random Qwen2.5-VL model directory (model, tokenizer, processor, chat template) to ``out_dir``.

    Deterministic given ``seed``; a few hundred kB at the defaults; builds in about a second on CPU. ``hidden_size``
    (a multiple of 16) and ``num_layers`` size the language model, ``vision_hidden_size`` (a multiple of 16) the
    vision tower's width (the training recipe uses larger ones),
    ``max_pixels`` the image budget; ``corpus`` adds text the tokenizer is trained on (the prompt wording, the
    instructions: fewer tokens per turn) within ``vocab_size``; each of ``phrases`` (fixed texts every row repeats,
    such as the system prompt) becomes one token of its own, so a row costs a few hundred tokens less to train on
    and to run — the text the model is given is unchanged; ``rope_theta`` is the language model's RoPE base
    (:data:`TINY_ROPE_THETA`, why not Qwen's 1e6). Returns ``out_dir``.
    """
    import torch
    from transformers import (
        GenerationConfig,
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
    )

    try:
        from transformers import Qwen2VLVideoProcessor
    except ImportError:  # pragma: no cover - video processors need torchvision
        Qwen2VLVideoProcessor = None  # type: ignore[assignment,misc]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    backend = _train_tokenizer(corpus, vocab_size, phrases)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        padding_side="left",
        split_special_tokens=False,
    )
    tokenizer.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    vocab = len(tokenizer)  # exactly the tokenizer: an untrained model must not emit ids the tokenizer lacks

    text_hidden = int(hidden_size)
    if text_hidden % 16:
        raise ValueError(f"hidden_size must be a multiple of 16, got {hidden_size}")
    if int(vision_hidden_size) <= 0 or int(vision_hidden_size) % 16:
        raise ValueError(f"vision_hidden_size must be a positive multiple of 16, got {vision_hidden_size}")
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": text_hidden,
            "intermediate_size": 2 * text_hidden,
            "num_hidden_layers": int(num_layers),
            "num_attention_heads": text_hidden // 16,  # head dim 16 at every size (mrope_section sums to 8)
            "num_key_value_heads": max(1, text_hidden // 32),
            "max_position_embeddings": 4096,
            "max_window_layers": int(num_layers),
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": float(rope_theta), "mrope_section": [2, 3, 3]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 2,
            "hidden_size": int(vision_hidden_size),
            "intermediate_size": 2 * int(vision_hidden_size),
            "num_heads": int(vision_hidden_size) // 16,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "out_hidden_size": text_hidden,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
        max_new_tokens=64,
    )
    model.save_pretrained(out)

    image_processor = Qwen2VLImageProcessor(
        min_pixels=TINY_MIN_PIXELS, max_pixels=int(max_pixels), patch_size=14, temporal_patch_size=2, merge_size=2
    )
    video_processor = None
    if Qwen2VLVideoProcessor is not None:
        video_processor = Qwen2VLVideoProcessor(
            min_pixels=TINY_MIN_PIXELS, max_pixels=int(max_pixels), patch_size=14, temporal_patch_size=2, merge_size=2
        )
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    (out / "ibisagent_tiny.json").write_text(
        json.dumps(
            {"version": TINY_VERSION, "seed": seed, "min_pixels": TINY_MIN_PIXELS, "max_pixels": int(max_pixels),
             "hidden_size": text_hidden, "num_layers": int(num_layers)}
        )
    )
    return out


def ensure_tiny_model(cache_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """The tiny model under ``cache_dir``, built on first use and reused afterwards. Safe under concurrency.

    The model lives in ``cache_dir/qwen2_5_vl-tiny-v{TINY_VERSION}-s{seed}``; it is built in a temporary sibling
    directory and renamed into place, so a directory that exists is complete. When two builders race, the first
    rename wins and the other discards its copy.
    """
    cache = Path(cache_dir).expanduser()
    final = cache / f"qwen2_5_vl-tiny-v{TINY_VERSION}-s{seed}"
    if (final / "ibisagent_tiny.json").is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache))
    try:
        build_tiny_qwen2_5_vl(tmp, seed=seed)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the published model is an ordinary directory
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        try:
            os.rename(tmp, final)
        except OSError:
            # Someone else published first (rename onto a non-empty directory fails atomically).
            if not (final / "ibisagent_tiny.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    """``python -m ibisagent.policies.tiny OUT_DIR [--seed N]``: build (or reuse) the tiny model, print its path."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("cache_dir", help="cache directory; the model is built in a subdirectory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(ensure_tiny_model(args.cache_dir, seed=args.seed))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
