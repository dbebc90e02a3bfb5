"""What SFT and GRPO share: the model and processor they load, LoRA on the language model, the saved policy, the
time budget and the progress record the MONAI Label train task shows.

Model loading follows :class:`ibisagent.policies.hf.HFPolicy` (same pixel budget mechanism), so a checkpoint saved
by :func:`save_policy` loads with ``hf:PATH`` and renders prompts with the training chat template.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ibisagent.fileio import atomic_write_text
from ibisagent.train.config import LoraSettings, TrainCommon, check
from ibisagent.train.template import apply_templates

logger = logging.getLogger(__name__)

#: Sub-directory of a run's output holding the trainer's checkpoints (the resume points).
CHECKPOINTS = "checkpoints"
#: Sub-directory holding the final policy (loadable as ``hf:OUT/policy``).
POLICY = "policy"
#: Progress file written during training (epoch, total_epochs, best_metric, total_time, step, max_steps).
PROGRESS = "progress.json"
#: Written into each checkpoint: the training seconds spent up to it, so a resumed run continues its time budget.
TIME_SPENT = "time_spent.json"


def resolve_model(spec: str) -> Path:
    """A model directory from a config's ``model``: ``tiny`` builds/reuses the offline tiny Qwen2.5-VL."""
    if spec == "tiny":
        from ibisagent.policies import default_cache_dir
        from ibisagent.policies.tiny import ensure_tiny_model

        return ensure_tiny_model(default_cache_dir())
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json (training loads local checkpoints only)")
    return path


def load_processor(path: str | os.PathLike[str], config: TrainCommon) -> Any:
    """The checkpoint's processor with the config's pixel budget and the project's chat/response templates."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    if config.min_pixels is not None or config.max_pixels is not None:
        size = processor.image_processor.size
        budget = {
            "shortest_edge": int(config.min_pixels if config.min_pixels is not None else size["shortest_edge"]),
            "longest_edge": int(config.max_pixels if config.max_pixels is not None else size["longest_edge"]),
        }
        processor = AutoProcessor.from_pretrained(path, size=budget)
    return apply_templates(processor)


def load_model(path: str | os.PathLike[str], config: TrainCommon) -> Any:
    """The Qwen2.5-VL model in fp32 (bf16 when ``config.bf16``), vision tower frozen unless ``config.train_vision``."""
    import torch
    from transformers import AutoModelForImageTextToText

    check(config)
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    if not config.train_vision:
        freeze_vision(model)
    return model


def freeze_vision(model: Any) -> None:
    """Freeze the vision tower and its merger (the paper fine-tunes the language model only)."""
    for name, param in model.named_parameters():
        if ".visual." in f".{name}":
            param.requires_grad_(False)


def lora_config(settings: LoraSettings) -> Any:
    """peft ``LoraConfig`` for the language model's linear layers (``settings.target_modules``, a fullmatch regex)."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )


def count_lora_layers(model: Any) -> dict[str, int]:
    """Modules carrying a LoRA adapter, per tower: ``{"language": n, "vision": n, "other": n}``."""
    counts = {"language": 0, "vision": 0, "other": 0}
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or not getattr(module, "lora_A", None):
            continue
        if ".visual." in f".{name}":
            counts["vision"] += 1
        elif re.search(r"language_model\.layers\.", name):
            counts["language"] += 1
        else:
            counts["other"] += 1
    return counts


def save_policy(model: Any, processor: Any, out_dir: str | os.PathLike[str],
                observation: Mapping[str, Any] | None = None) -> Path:
    """Write a plain Hugging Face model directory (LoRA merged into the weights) with the processor and templates,
    and how the policy observes (``observation``: :data:`ibisagent.env.OBSERVATION_FIELDS` it was trained with, in
    :data:`ibisagent.env.OBSERVATION_FILE`; default: the environment's defaults); ``hf:out_dir`` loads it and runs it
    that way."""
    from ibisagent.env import write_observation

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(out)
    apply_templates(processor)
    processor.save_pretrained(out)
    write_observation(out, observation or {})
    return out


def last_checkpoint(out_dir: str | os.PathLike[str]) -> str | None:
    """The newest ``checkpoint-N`` under ``out_dir/checkpoints`` (the resume point), or ``None``."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = Path(out_dir) / CHECKPOINTS
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def training_arguments(config: Any, out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``TrainingArguments`` both stages take alike from a :class:`~ibisagent.train.config.TrainCommon` config
    (checkpoints under ``out_dir``; the schedule constant after the warm-up when ``time_decay`` drives it)."""
    return {
        "output_dir": str(Path(out_dir) / CHECKPOINTS),
        "gradient_accumulation_steps": config.grad_accum,
        "learning_rate": config.learning_rate,
        "num_train_epochs": config.epochs,
        "max_steps": config.max_steps,
        "warmup_steps": config.warmup_ratio,
        "weight_decay": config.weight_decay,
        "lr_scheduler_type": "constant_with_warmup" if config.time_decay else "linear",
        "logging_steps": config.logging_steps,
        "save_steps": config.save_steps,
        "save_total_limit": config.save_total_limit,
        "bf16": config.bf16,
        "gradient_checkpointing": config.gradient_checkpointing,
        "seed": config.seed,
        "report_to": [],
        "dataloader_num_workers": 0,
    }


def trainer_callbacks(out_dir: str | os.PathLike[str], max_seconds: float | None, metric: str,
                      time_decay: bool = False) -> list[Any]:
    """A callback that writes :data:`PROGRESS` after every log and stops training past ``max_seconds``; with
    ``time_decay`` it turns the trainer's (lambda) scheduler into ``learning_rate × (1 − elapsed / max_seconds)`` after
    the warm-up: a schedule over the time budget, for runs whose step count is not known in advance. The seconds
    spent are saved in every checkpoint (:data:`TIME_SPENT`); a run resumed from one continues its budget and its
    schedule where they were, instead of starting a new budget at the peak rate."""
    from transformers import TrainerCallback

    progress_file = Path(out_dir) / PROGRESS

    class Progress(TrainerCallback):
        def __init__(self) -> None:
            self.start = time.monotonic()
            self.best: float | None = None

        def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kw: Any):
            value = (logs or {}).get(metric)
            if isinstance(value, (int, float)) and (
                self.best is None or (value < self.best if metric == "loss" else value > self.best)
            ):
                self.best = float(value)
            seconds = int(time.monotonic() - self.start)
            record = {
                "epoch": round(float(state.epoch or 0.0), 4),
                "total_epochs": float(args.num_train_epochs) if args.max_steps <= 0 else None,
                "step": int(state.global_step),
                "max_steps": int(state.max_steps),
                "best_metric": self.best if self.best is not None else 0.0,
                "metric": metric,
                "total_time": f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}",
                "seconds": seconds,
            }
            progress_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = progress_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(record), encoding="utf-8")
            os.replace(tmp, progress_file)

        def on_train_begin(self, args: Any, state: Any, control: Any, lr_scheduler: Any = None, **kw: Any):
            if state.global_step > 0:  # resumed: the trainer restored the checkpoint's state before this call
                spent = Path(args.output_dir) / f"checkpoint-{state.global_step}" / TIME_SPENT
                try:
                    self.start = time.monotonic() - float(json.loads(spent.read_text(encoding="utf-8"))["seconds"])
                except (OSError, ValueError, KeyError, TypeError):
                    logger.warning("no readable %s in the checkpoint of step %d: the time budget starts again",
                                   TIME_SPENT, state.global_step)
            if time_decay:
                if not max_seconds or not hasattr(lr_scheduler, "lr_lambdas"):
                    raise ValueError(f"time_decay needs max_seconds (got {max_seconds}) and a lambda scheduler "
                                     f"(got {type(lr_scheduler).__name__})")
                warmup = args.get_warmup_steps(state.max_steps)

                def factor(step: int) -> float:
                    if step < warmup:
                        return step / warmup
                    return max(0.0, 1.0 - (time.monotonic() - self.start) / max_seconds)

                lr_scheduler.lr_lambdas = [factor for _ in lr_scheduler.lr_lambdas]
                # a resumed run's first step would train at the rate saved in the checkpoint's optimizer state
                self.resync = state.global_step > 0
            return control

        def on_step_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                          lr_scheduler: Any = None, **kw: Any):
            if getattr(self, "resync", False) and optimizer is not None and lr_scheduler is not None:
                self.resync = False
                for group, base, rate in zip(optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas):
                    group["lr"] = base * rate(state.global_step)
                # what the trainer logs as this step's rate (torch keeps it in ``_last_lr``)
                lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
            return control

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                atomic_write_text(folder / TIME_SPENT, json.dumps({"seconds": time.monotonic() - self.start}))
            return control

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any):
            if max_seconds is not None and time.monotonic() - self.start > max_seconds:
                logger.info("time budget of %.0f s reached at step %d", max_seconds, state.global_step)
                control.should_training_stop = True
                control.should_save = True
            return control

    return [Progress()]


def log_history(trainer: Any, out_dir: str | os.PathLike[str], name: str) -> Path:
    """The trainer's log history (loss, rewards per step) as ``out_dir/name``."""
    path = Path(out_dir) / name
    path.write_text(json.dumps(trainer.state.log_history, indent=1), encoding="utf-8")
    return path
