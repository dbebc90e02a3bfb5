"""``vllm:PATH`` — a Qwen2.5-VL-family checkpoint on an in-process vLLM engine (GPU).

vLLM is an optional dependency (the ``gpu`` extra) and is imported only when a :class:`VLLMPolicy` is created. A batch
is one ``LLM.chat`` call over all conversations, so vLLM's scheduler batches them; images are passed as PNG data URLs
in OpenAI-style ``image_url`` parts, which ``LLM.chat`` parses exactly as ``vllm serve`` does. The pixel budget is
passed to the Hugging Face processor inside vLLM through ``mm_processor_kwargs`` (``min_pixels`` / ``max_pixels``) and
:meth:`VLLMPolicy.image_size` applies the same smart resize, so the agent pre-resizes once and vLLM does not resize
again.

For a vLLM *server* (``vllm serve PATH``) use ``openai:http://HOST:PORT/v1#PATH`` instead.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ibisagent.observation import DEFAULT_MIN_PIXELS
from ibisagent.policies.base import (
    Generation,
    GenerationOptions,
    Policy,
    PolicyError,
    PolicyRequest,
    checkpoint_observation,
)
from ibisagent.policies.openai import to_openai_messages

#: Raised (as the message of an ImportError) where vLLM is not installed.
VLLM_MISSING = (
    "the vllm policy needs vLLM, which is not installed; install the gpu extra: pip install -e '.[gpu]' "
    "(or serve the checkpoint with `vllm serve PATH` elsewhere and use the policy 'openai:http://HOST:PORT/v1#PATH')"
)

#: Qwen2.5-VL's processor defaults, used when the checkpoint's preprocessor config does not say: its smallest image
#: (:data:`ibisagent.observation.DEFAULT_MIN_PIXELS`, imported above) and its processor's largest (not the authors'
#: policy budget).
DEFAULT_MAX_PIXELS = 28 * 28 * 1280


def import_vllm() -> Any:
    """``import vllm`` or an :class:`ImportError` that says how to install it."""
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(VLLM_MISSING) from exc
    return vllm


def checkpoint_pixels(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """``(min_pixels, max_pixels, factor)`` from a checkpoint's preprocessor config, with Qwen's defaults."""
    root = Path(path)
    cfg: dict[str, Any] = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        f = root / name
        if f.is_file():
            data = json.loads(f.read_text())
            cfg = data.get("image_processor", data)
            break
    size = cfg.get("size") or {}
    lo = cfg.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or DEFAULT_MIN_PIXELS
    hi = cfg.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or DEFAULT_MAX_PIXELS
    factor = int(cfg.get("patch_size", 14)) * int(cfg.get("merge_size", 2))
    return int(lo), int(hi), factor


class VLLMPolicy(Policy):
    """An in-process vLLM engine.

    Args:
        path: local checkpoint directory.
        min_pixels, max_pixels: image pixel budget (default: the checkpoint's); passed to vLLM's processor.
        max_images: images per conversation vLLM reserves room for (``limit_mm_per_prompt``); ``history=full``
            conversations carry one image per step.
        dtype: ``"auto"`` (bf16 for Qwen2.5-VL), ``"bfloat16"``, ``"float16"``.
        gpu_memory_utilization, max_model_len, tensor_parallel_size, seed, enforce_eager: vLLM engine arguments.
        **engine_kwargs: any other ``vllm.LLM`` / ``EngineArgs`` keyword.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_images: int = 16,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = 32768,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        enforce_eager: bool = False,
        **engine_kwargs: Any,
    ) -> None:
        vllm = import_vllm()
        self.path = Path(path).expanduser()
        self.name = f"vllm:{path}"
        if not self.path.is_dir():
            raise PolicyError(f"vllm policy: model directory {self.path} does not exist")
        self.observation = checkpoint_observation(self.path, self.name)
        lo, hi, self.factor = checkpoint_pixels(self.path)
        self.min_pixels = int(min_pixels) if min_pixels is not None else lo
        self.max_pixels = int(max_pixels) if max_pixels is not None else hi
        kwargs: dict[str, Any] = {
            "model": str(self.path),
            "dtype": dtype,
            "gpu_memory_utilization": gpu_memory_utilization,
            "tensor_parallel_size": tensor_parallel_size,
            "seed": seed,
            "enforce_eager": enforce_eager,
            "limit_mm_per_prompt": {"image": int(max_images), "video": 0},
            "mm_processor_kwargs": {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels},
        }
        if max_model_len is not None:
            kwargs["max_model_len"] = int(max_model_len)
        kwargs.update(engine_kwargs)
        try:
            self.llm = vllm.LLM(**kwargs)
        except Exception as exc:  # vLLM raises many types (ValueError, RuntimeError, CUDA errors)
            raise PolicyError(f"{self.name}: cannot start the vLLM engine: {exc}") from exc
        self._SamplingParams = vllm.SamplingParams
        self._lock = threading.Lock()  # LLM is not re-entrant; one batch at a time, the batch is the parallelism

    def image_size(self, height: int, width: int) -> tuple[int, int]:
        """Qwen's smart resize (multiples of 28 within the pixel budget), as vLLM's processor applies it."""
        from ibisagent.observation import qwen_grid

        return qwen_grid(int(height), int(width), self.min_pixels, self.max_pixels, factor=self.factor)

    def sampling_params(self, options: GenerationOptions) -> Any:
        kwargs: dict[str, Any] = {"max_tokens": int(options.max_new_tokens), "temperature": float(options.temperature)}
        if options.temperature > 0:
            kwargs["top_p"] = float(options.top_p)
            if options.seed is not None:
                kwargs["seed"] = int(options.seed)
        return self._SamplingParams(**kwargs)

    def generate(self, requests: Sequence[PolicyRequest], options: GenerationOptions) -> list[Generation]:
        if not requests:
            return []
        conversations = [to_openai_messages(r.messages) for r in requests]
        params = self.sampling_params(options)
        with self._lock:
            t0 = time.perf_counter()
            try:
                outputs = self.llm.chat(conversations, sampling_params=params, use_tqdm=False)
            except Exception as exc:
                raise PolicyError(f"{self.name}: generation failed: {exc}") from exc
            total = time.perf_counter() - t0
        results: list[Generation] = []
        for out in outputs:
            completion = out.outputs[0]
            prefill, decode = _split_timing(getattr(out, "metrics", None), total)
            results.append(
                Generation(
                    text=completion.text,
                    prompt_tokens=len(out.prompt_token_ids or ()),
                    completion_tokens=len(completion.token_ids or ()),
                    prefill_seconds=prefill,
                    decode_seconds=decode,
                    extra={"finish_reason": completion.finish_reason, "batch_size": len(requests)},
                )
            )
        return results


def _split_timing(metrics: Any, total: float) -> tuple[float, float]:
    """(prefill, decode) seconds from vLLM's per-request metrics where it reports them, else (0, batch wall time)."""
    if metrics is None:
        return 0.0, total
    first = getattr(metrics, "first_token_time", None)
    start = getattr(metrics, "first_scheduled_time", None) or getattr(metrics, "arrival_time", None)
    last = getattr(metrics, "last_token_time", None) or getattr(metrics, "finished_time", None)
    if first and start and last and last >= first >= start:
        return float(first - start), float(last - first)
    ttft = getattr(metrics, "first_token_latency", None)  # v1 RequestStateStats-style
    if ttft:
        return float(ttft), max(0.0, total - float(ttft))
    return 0.0, total
