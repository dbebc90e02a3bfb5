"""``hf:PATH`` — a Qwen2.5-VL-family checkpoint run in-process with transformers.

Loads ``AutoModelForImageTextToText`` + ``AutoProcessor`` from a local directory (the released IBISAgent-7B, a
fine-tune, or the tiny test model from :mod:`ibisagent.policies.tiny`); bf16 on GPU, fp32 on CPU; greedy unless
``temperature > 0`` (then seeded sampling). Requests in a batch are rendered with the checkpoint's chat template and
run as one left-padded ``generate`` call.

Two transformers 5.x details matter for correctness:

* Qwen2.5-VL computes its 3-D (temporal, height, width) rotary positions from ``mm_token_type_ids`` (0 text,
  1 image, 2 video). The processor returns it; without it ``generate`` silently falls back to 1-D positions and the
  model sees scrambled images. We pass the processor's tensor through and rebuild it from the image/video token ids
  when a processor does not return it.
* The image processor smart-resizes to multiples of ``patch_size · merge_size`` (28) within ``min_pixels`` /
  ``max_pixels``. :meth:`HFPolicy.image_size` is that same function with the same numbers, so the agent resizes
  once and the model, the tool and the overlay all agree on pixels.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ibisagent.policies.base import (
    Conversation,
    Generation,
    GenerationOptions,
    Policy,
    PolicyError,
    PolicyRequest,
    checkpoint_observation,
)


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Within the block, transformers' (and the Hub's) progress bars are on or off as ``enabled`` says; the
    process-wide setting (``transformers.utils.logging``) is restored on exit. Not thread-safe: the setting is global
    in transformers."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    if enabled != before:
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        if hf_logging.is_progress_bar_enabled() != before:
            (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


class HFPolicy(Policy):
    """A transformers Qwen2.5-VL policy.

    Args:
        path: local model directory (model, tokenizer and processor saved together).
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``…; default CUDA when available, else CPU.
        dtype: ``torch.dtype`` or its name (``"bfloat16"``); default bf16 on GPU, fp32 on CPU.
        min_pixels, max_pixels: image pixel budget; default the checkpoint's own (``preprocessor_config.json``).
            Pass the same numbers everywhere the checkpoint is used (training, vLLM, evaluation).
        attn_implementation: forwarded to ``from_pretrained`` (default: transformers' choice, SDPA).
        progress: show transformers' weight-loading progress bar (``False``: hidden while this model loads, the
            process-wide setting restored afterwards).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: str | None = None,
        dtype: Any = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        attn_implementation: str | None = None,
        progress: bool = True,
    ) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.path = Path(path).expanduser()
        self.name = f"hf:{path}"
        if not self.path.is_dir():
            raise PolicyError(f"hf policy: model directory {self.path} does not exist")
        self.observation = checkpoint_observation(self.path, self.name)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."))
        self.dtype = dtype

        try:
            self.processor = AutoProcessor.from_pretrained(self.path)
            if min_pixels is not None or max_pixels is not None:
                # transformers 5.x keeps the budget in ``size`` (shortest_edge = min_pixels, longest_edge = max_pixels)
                # and warns about per-call min_pixels/max_pixels; reload with an explicit size.
                size = self.processor.image_processor.size
                budget = {
                    "shortest_edge": int(min_pixels if min_pixels is not None else size["shortest_edge"]),
                    "longest_edge": int(max_pixels if max_pixels is not None else size["longest_edge"]),
                }
                self.processor = AutoProcessor.from_pretrained(self.path, size=budget)
            model_kwargs: dict[str, Any] = {"dtype": dtype}
            if attn_implementation:
                model_kwargs["attn_implementation"] = attn_implementation
            with progress_bars(progress):
                self.model = AutoModelForImageTextToText.from_pretrained(self.path, **model_kwargs)
        except (OSError, ValueError) as exc:
            raise PolicyError(f"hf policy: cannot load {self.path}: {exc}") from exc
        self.model.to(self.device).eval()

        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        ip = self.processor.image_processor
        self.patch_size = int(ip.patch_size)
        self.merge_size = int(ip.merge_size)
        self.min_pixels = int(ip.size["shortest_edge"])
        self.max_pixels = int(ip.size["longest_edge"])
        cfg = self.model.config
        self.image_token_id = getattr(cfg, "image_token_id", None)
        self.video_token_id = getattr(cfg, "video_token_id", None)
        self._eos_ids = self._stop_ids()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ geometry

    def image_size(self, height: int, width: int) -> tuple[int, int]:
        """The processor's own smart resize: multiples of 28 with ``min_pixels ≤ h·w ≤ max_pixels``."""
        from ibisagent.observation import qwen_grid

        return qwen_grid(int(height), int(width), self.min_pixels, self.max_pixels,
                         factor=self.patch_size * self.merge_size)

    # ------------------------------------------------------------------ inputs

    def prepare_inputs(self, requests: Sequence[PolicyRequest]) -> Any:
        """The processor's batch (``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``pixel_values``,
        ``image_grid_thw``) for ``requests``, left-padded, on the model's device."""
        texts: list[str] = []
        images: list[Any] = []
        for req in requests:
            messages, imgs = _normalise(req.messages)
            texts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
            images.extend(imgs)
        inputs = self.processor(
            text=texts, images=images or None, padding=True, padding_side="left", return_tensors="pt"
        )
        if "mm_token_type_ids" not in inputs:
            inputs["mm_token_type_ids"] = self._mm_token_type_ids(inputs["input_ids"])
        inputs.pop("token_type_ids", None)
        return inputs.to(self.device)

    def _mm_token_type_ids(self, input_ids: Any) -> Any:
        import torch

        types = torch.zeros_like(input_ids, dtype=torch.int32)
        if self.image_token_id is not None:
            types[input_ids == self.image_token_id] = 1
        if self.video_token_id is not None:
            types[input_ids == self.video_token_id] = 2
        return types

    def _stop_ids(self) -> list[int]:
        ids: list[int] = []
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        for value in eos if isinstance(eos, (list, tuple)) else [eos]:
            if value is not None:
                ids.append(int(value))
        for tok in ("<|im_end|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid not in ids:
                ids.append(tid)
        if not ids and self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        return ids

    # ------------------------------------------------------------------ generation

    def generate(self, requests: Sequence[PolicyRequest], options: GenerationOptions) -> list[Generation]:
        if not requests:
            return []
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        class _FirstToken(LogitsProcessor):
            """Timestamps the first logits call: the end of prefill."""

            def __init__(self) -> None:
                self.at: float | None = None

            def __call__(self, input_ids: Any, scores: Any) -> Any:
                if self.at is None:
                    if scores.is_cuda:
                        torch.cuda.synchronize(scores.device)
                    self.at = time.perf_counter()
                return scores

        sample = options.temperature > 0
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": int(options.max_new_tokens),
            "do_sample": sample,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self._eos_ids,
        }
        if sample:
            gen_kwargs.update(temperature=float(options.temperature), top_p=float(options.top_p), top_k=0)
        else:
            # Silence the checkpoint's sampling defaults (Qwen ships temperature/top_p/top_k in generation_config).
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        if options.deadline is not None:  # the agent's time limit: stop decoding there (transformers' MaxTimeCriteria)
            gen_kwargs["max_time"] = max(0.01, options.deadline - time.monotonic())

        with self._lock:
            try:
                inputs = self.prepare_inputs(requests)
                first = _FirstToken()
                devices = [self.device] if self.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices, enabled=sample and options.seed is not None):
                    if sample and options.seed is not None:
                        torch.manual_seed(int(options.seed))
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    t0 = time.perf_counter()
                    with torch.inference_mode():
                        out = self.model.generate(
                            **inputs, logits_processor=LogitsProcessorList([first]), **gen_kwargs
                        )
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    t1 = time.perf_counter()
            except torch.OutOfMemoryError as exc:
                raise PolicyError(f"{self.name}: out of memory on {self.device}: {exc}") from exc
            except RuntimeError as exc:
                raise PolicyError(f"{self.name}: generation failed: {exc}") from exc

        prefill = (first.at or t1) - t0
        decode = t1 - (first.at or t1)
        prompt_len = inputs["input_ids"].shape[1]
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        new = out[:, prompt_len:].tolist()
        stops = set(self._eos_ids)
        results: list[Generation] = []
        for i, row in enumerate(new):
            n = len(row)
            for j, tid in enumerate(row):
                if tid in stops:
                    n = j + 1  # the stop token was generated (and costs a step); it is not part of the text
                    break
            text_ids = [t for t in row[:n] if t not in stops]
            text = self.tokenizer.decode(text_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            results.append(
                Generation(
                    text=text,
                    prompt_tokens=int(prompt_tokens[i]),
                    completion_tokens=n,
                    prefill_seconds=prefill,
                    decode_seconds=decode,
                    extra={"batch_size": len(requests), "device": str(self.device)},
                )
            )
        return results


def _normalise(messages: Conversation) -> tuple[list[dict[str, Any]], list[Any]]:
    """Messages for the chat template (images replaced by a placeholder part) and the images in order, as PIL."""
    from PIL import Image

    out: list[dict[str, Any]] = []
    images: list[Any] = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, str) or content is None:
            out.append({"role": msg["role"], "content": content or ""})
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            kind = part.get("type")
            if kind == "image" or (kind is None and "image" in part):
                images.append(_to_pil(part["image"], Image))
                parts.append({"type": "image"})
            elif kind == "text":
                parts.append({"type": "text", "text": part.get("text", "")})
            else:
                raise PolicyError(f"hf policy: unsupported message part type {kind!r}")
        out.append({"role": msg["role"], "content": parts})
    return out, images


def _to_pil(image: Any, Image: Any) -> Any:  # noqa: N803 - the PIL module
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise PolicyError(f"hf policy: images must be (H, W, 3) uint8, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return Image.fromarray(arr[..., :3])
