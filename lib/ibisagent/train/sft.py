"""Cold-start SFT (paper §3.3) on trl's ``SFTTrainer``.

Data: a ``datasets.save_to_disk`` folder from ``ibisagent build-sft`` with columns ``messages`` (role, content as
``{"type": "text"}`` / ``{"type": "image"}`` parts, a per-message ``train`` flag) and ``images`` (PIL, placeholder
order). The loss is on assistant turns only, and not on turns with ``train: false`` (the project chat template opens
``{% generation %}`` only for trained turns; trl's ``assistant_only_loss`` turns the rest into -100 labels).

Before training every row is checked (:func:`check_rows`): a row whose image placeholders do not match its images,
or whose tokens with every image expanded exceed ``max_length`` (the image tokens would be cut), is reported in
``OUT/skipped.jsonl`` and left out — never trained with dropped images.

LoRA goes on the language model's linear layers only (:data:`ibisagent.train.config.LANGUAGE_LORA_TARGETS`); the
vision tower is frozen either way, unless ``train_vision`` (full fine-tuning of a model built from scratch).
``first_turn_repeats`` trains each first-turn row (``DATA/rows.jsonl``, step 0) that many times per epoch. The
result is ``OUT/policy`` (LoRA merged), loadable by ``hf:OUT/policy``;
``OUT/checkpoints`` holds the resume points and ``OUT/sft_log.json`` the loss per step.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ibisagent.train.common import (
    POLICY,
    last_checkpoint,
    load_model,
    load_processor,
    log_history,
    lora_config,
    resolve_model,
    save_policy,
    trainer_callbacks,
    training_arguments,
)
from ibisagent.train.config import SFTRunConfig, check, to_dict

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SkippedRow:
    """A dataset row left out of training and why."""

    index: int
    reason: str


@dataclass(frozen=True)
class SFTResult:
    """What an SFT run produced.

    Attributes:
        policy: the saved policy directory.
        rows: trainable rows of the dataset (after :func:`check_rows`); ``skipped`` holds the others.
        skipped: the rows left out, with the reason.
        log_history: the trainer's log history.
        steps: optimizer steps the model has taken (a resumed run counts its checkpoint's steps too).
        rows_fed: training rows those steps went through, repeats over epochs counted
            (:func:`rows_fed`; ``min(rows_fed, rows)`` distinct rows were seen).
    """

    policy: Path
    rows: int
    skipped: tuple[SkippedRow, ...]
    log_history: list[dict[str, Any]]
    steps: int = 0
    rows_fed: int = 0

    def summary(self) -> str:
        """One line of what was trained: ``3 rows (2 trainable, 1 skipped); 4 steps over 4 rows (2 distinct)``."""
        total = self.rows + len(self.skipped)
        return (f"{total} rows ({self.rows} trainable, {len(self.skipped)} skipped); {self.steps} steps over "
                f"{self.rows_fed} rows ({min(self.rows_fed, self.rows)} distinct)")


def rows_fed(steps: int, rows: int, batch_size: int, grad_accum: int, world_size: int = 1) -> int:
    """Rows ``steps`` optimizer steps of a transformers ``Trainer`` go through on ``rows`` training rows: each step
    takes ``grad_accum`` batches of ``batch_size`` rows per device on ``world_size`` devices, and the last step of
    an epoch takes what is left of it (the data loader keeps its last, short batch)."""
    if rows <= 0 or steps <= 0:
        return 0
    per_step = batch_size * grad_accum * world_size
    per_epoch = -(-rows // per_step)  # steps in one pass over the rows
    epochs, rest = divmod(steps, per_epoch)
    return epochs * rows + min(rest * per_step, rows)


def image_tokens(processor: Any, image: Any) -> int:
    """Tokens one image expands to for this processor (its smart resize, patch 14, merge 2 for Qwen2.5-VL)."""
    from ibisagent.observation import qwen_grid

    ip = processor.image_processor
    factor = int(ip.patch_size) * int(ip.merge_size)
    width, height = image.size
    h, w = qwen_grid(int(height), int(width), int(ip.size["shortest_edge"]), int(ip.size["longest_edge"]),
                     factor=factor)
    return (h // factor) * (w // factor)


def _placeholders(messages: list[dict[str, Any]]) -> int:
    count = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            count += sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image")
    return count


def row_problem(row: dict[str, Any], processor: Any, max_length: int) -> str | None:
    """Why ``row`` cannot be trained (``None`` when it can): placeholder/image mismatch, too long with its images
    expanded, or no trained assistant turn."""
    messages, images = row.get("messages") or [], row.get("images") or []
    n = _placeholders(messages)
    if n != len(images):
        return f"{n} image placeholder(s) but {len(images)} image(s)"
    if not any(m.get("role") == "assistant" and m.get("train") is not False for m in messages):
        return "no assistant turn to train on"
    text = processor.apply_chat_template(messages, tokenize=False)
    length = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    length += sum(image_tokens(processor, image) - 1 for image in images)
    if length > max_length:
        return f"{length} tokens with images expanded > max_length {max_length} (image tokens would be cut)"
    return None


def check_rows(dataset: Any, processor: Any, max_length: int) -> tuple[list[int], list[SkippedRow]]:
    """Indices of trainable rows and the skipped ones with their reasons (see :func:`row_problem`)."""
    keep: list[int] = []
    skipped: list[SkippedRow] = []
    for i in range(len(dataset)):
        problem = row_problem(dataset[i], processor, max_length)
        if problem is None:
            keep.append(i)
        else:
            skipped.append(SkippedRow(i, problem))
    return keep, skipped


def load_sft_dataset(data_dir: str | os.PathLike[str]) -> Any:
    """The SFT dataset at ``data_dir`` (``datasets.load_from_disk``), checked for its two columns."""
    from datasets import load_from_disk

    path = Path(data_dir)
    if not path.exists():
        raise FileNotFoundError(f"SFT data not found: {path}")
    dataset = load_from_disk(str(path))
    missing = {"messages", "images"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"{path}: SFT data needs columns 'messages' and 'images'; missing {sorted(missing)}")
    return dataset


def first_turn_rows(data_dir: str | os.PathLike[str], rows: int) -> set[int]:
    """Indices of the rows of an episode's first turn (``step`` 0 in ``data_dir/rows.jsonl``, which
    ``ibisagent build-sft`` writes one line per dataset row). Raises ``ValueError`` when the file is missing or does
    not match the dataset's ``rows``."""
    path = Path(data_dir) / "rows.jsonl"
    if not path.is_file():
        raise ValueError(f"first_turn_repeats needs {path} (written by ibisagent build-sft)")
    meta = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(meta) != rows:
        raise ValueError(f"{path} describes {len(meta)} rows, the dataset has {rows}")
    return {i for i, m in enumerate(meta) if m.get("step") == 0}


def run_sft(
    config: SFTRunConfig,
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = True,
) -> SFTResult:
    """Train, save ``out_dir/policy`` and return an :class:`SFTResult`. Resumes from the newest checkpoint in
    ``out_dir/checkpoints`` when ``resume``. Raises ``ValueError`` when no row is trainable."""
    from trl import SFTConfig, SFTTrainer

    from ibisagent.env import read_observation

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(config.model)
    processor = load_processor(model_path, config)
    dataset = load_sft_dataset(data_dir)
    keep, skipped = check_rows(dataset, processor, config.max_length)
    with open(out / "skipped.jsonl", "w", encoding="utf-8") as fh:
        for s in skipped:
            fh.write(json.dumps({"row": s.index, "reason": s.reason}) + "\n")
    if skipped:
        logger.warning("SFT: %d of %d rows skipped (see %s)", len(skipped), len(dataset), out / "skipped.jsonl")
    if not keep:
        raise ValueError(f"no trainable row in {data_dir} ({len(skipped)} skipped, see {out / 'skipped.jsonl'})")
    if check(config).first_turn_repeats > 1:
        first = first_turn_rows(data_dir, len(dataset))
        if not first:
            raise ValueError(f"first_turn_repeats: {data_dir} has no first-turn row (rows.jsonl step 0; a history "
                             "'full' dataset has one row per episode)")
        keep = keep + [i for i in keep if i in first] * (config.first_turn_repeats - 1)
    train = dataset.select(keep) if keep != list(range(len(dataset))) else dataset
    (out / "sft_config.json").write_text(json.dumps(to_dict(config), indent=1), encoding="utf-8")

    model = load_model(model_path, config)
    args = SFTConfig(
        assistant_only_loss=True,
        max_length=None,  # rows are checked above; trl would otherwise truncate through image tokens
        per_device_train_batch_size=config.batch_size,
        disable_tqdm=False,
        **training_arguments(config, out),
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=processor,
        peft_config=lora_config(config.lora) if config.lora.enabled else None,
        callbacks=trainer_callbacks(out, config.max_seconds, "loss", config.time_decay),
    )
    checkpoint = last_checkpoint(out) if resume else None
    if checkpoint:
        logger.info("SFT: resuming from %s", checkpoint)
    trainer.train(resume_from_checkpoint=checkpoint)
    log_history(trainer, out, "sft_log.json")
    policy = save_policy(trainer.model, processor, out / POLICY, observation=read_observation(data_dir))
    steps = int(trainer.state.global_step)
    return SFTResult(policy=policy, rows=len(set(keep)), skipped=tuple(skipped),
                     log_history=list(trainer.state.log_history),
                     steps=steps, rows_fed=rows_fed(steps, len(train), config.batch_size, config.grad_accum,
                                                    int(trainer.args.world_size)))
