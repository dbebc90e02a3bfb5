"""Run configurations for SFT and GRPO, loaded from YAML (``training/configs/*.yaml``).

Each config is a dataclass whose fields carry their help text (``field(metadata={"help": …})``), as trl's own
configs do. :func:`load_config` reads a YAML mapping into one; an unknown key (at any level) raises
:class:`ConfigError` naming it, before anything is loaded or trained. Paths in a YAML file are taken as written
(relative to the working directory).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from ibisagent.clicks import ANCHOR_CLICK_CHOICES, DEFAULT_MAX_CLICKS, AnchorClicks

#: LoRA targets: every linear layer of the *language model* only (vision tower and merger stay frozen). Anchored at
#: ``model.language_model.layers`` because the usual name list also hits the vision MLP (NOTES-trl).
LANGUAGE_LORA_TARGETS = (
    r".*model\.language_model\.layers\.\d+\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)"
)


class ConfigError(ValueError):
    """A configuration that cannot be used (unknown key, wrong type, bad value); the message names it."""


@dataclass
class LoraSettings:
    """LoRA on the language model (``enabled: false`` = full fine-tuning of the language model; vision frozen)."""

    enabled: bool = field(default=True, metadata={"help": "LoRA adapters (true) or full fine-tuning (false)"})
    r: int = field(default=16, metadata={"help": "LoRA rank"})
    alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    target_modules: str = field(default=LANGUAGE_LORA_TARGETS, metadata={"help": "regex of module names (fullmatch)"})


@dataclass
class TrainCommon:
    """Settings shared by both stages."""

    model: str = field(default="tiny", metadata={"help": "model directory, or 'tiny' for the offline tiny Qwen2.5-VL"})
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "LoRA settings"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps (-1: use epochs)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the data when max_steps is -1"})
    batch_size: int = field(default=1, metadata={"help": "per-device batch size"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "share of steps with linear warm-up"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay (transformers' "
                                                               "weight_decay; 0: none)"})
    min_pixels: int | None = field(default=None, metadata={"help": "image pixel budget (default: the model's own)"})
    max_pixels: int | None = field(default=None, metadata={"help": "image pixel budget (the authors used 262144)"})
    train_vision: bool = field(
        default=False,
        metadata={"help": "also train the vision tower and its merger (full fine-tuning only): for a model built from "
                          "scratch, whose tower is random; a pretrained tower stays frozen, as the paper trains it"},
    )
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (GPUs)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory"})
    save_steps: int = field(default=50, metadata={"help": "checkpoint every N steps (resume point)"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept"})
    logging_steps: int = field(default=1, metadata={"help": "log every N steps"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    max_seconds: float | None = field(default=None, metadata={"help": "stop training after this many seconds"})
    time_decay: bool = field(
        default=False,
        metadata={"help": "with max_seconds: the learning rate falls linearly to 0 over the time budget (after the "
                          "warm-up, counted in steps), instead of over the step count; a run resumed from a "
                          "checkpoint continues the budget and the schedule (the seconds spent are saved in it)"},
    )


@dataclass
class SFTRunConfig(TrainCommon):
    """Cold-start SFT (``ibisagent train sft``)."""

    max_length: int = field(
        default=4096,
        metadata={"help": "token limit of one row, images expanded; longer rows are reported and skipped"},
    )
    first_turn_repeats: int = field(
        default=1,
        metadata={"help": "times each row of an episode's first turn (step 0 in DATA/rows.jsonl) is trained per epoch: "
                          "the first click and the absent answer are decided there, about one row in eight"},
    )


@dataclass
class GRPORunConfig(TrainCommon):
    """Agentic GRPO (``ibisagent train grpo``); β = 0 (no reference model)."""

    mode: Literal["step", "rollout"] = field(
        default="rollout", metadata={"help": "step: one action from a recorded state; rollout: full multi-turn"}
    )
    loss_type: str = field(default="dapo", metadata={"help": "trl loss type: grpo, dapo, dr_grpo, bnpo, …"})
    num_generations: int = field(default=4, metadata={"help": "completions per prompt (the group)"})
    max_completion_length: int = field(
        default=1024, metadata={"help": "tokens after the prompt, observation images included"}
    )
    max_turns: int = field(default=6, metadata={"help": "most executed actions per rollout (rollout mode)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    beta: float = field(default=0.0, metadata={"help": "KL weight (the paper: 0)"})
    tool: str = field(default="embedded", metadata={"help": "segmenter spec for the environment"})
    prompts: str | None = field(
        default=None, metadata={"help": "prompt wording TOML (as `--prompts` at inference); default the project's"}
    )
    anchor_from: str | None = field(
        default=None,
        metadata={"help": "anchors of the simulated expert that makes the rows (its turns give step mode's states and "
                          "every row's optimal step count), as `simulate --anchor-from`: a manifest, or the anchors "
                          "JSON `train tiny` saves (DIR/anchor_modes.json); give what the SFT data's expert had. "
                          "Default: no anchor, the deepest point"},
    )
    anchor_modes: int = field(default=1, metadata={"help": "with anchor_from a manifest: most appearance modes per "
                                                           "target (as `simulate --anchor-modes`)"})
    anchor_clicks: AnchorClicks = field(
        default="first", metadata={"help": "with anchor_from: anchor each target's first click only, or every click"}
    )
    expert_max_clicks: int = field(
        default=DEFAULT_MAX_CLICKS,
        metadata={"help": "the rows' expert's click budget per target, as `simulate --max-clicks` (train tiny: 10)"},
    )
    optimal_steps: int = field(default=3, metadata={"help": "length reward: turns without penalty by default"})
    rewards: dict[str, float] = field(
        default_factory=lambda: {"format": 1.0, "answer": 1.0, "click": 1.0, "progress": 1.0, "length": 1.0},
        metadata={"help": "weight per reward (format, answer, click, progress, length)"},
    )
    use_vllm: bool = field(default=False, metadata={"help": "generate with vLLM (GPU)"})
    vllm_mode: Literal["colocate", "server"] = field(default="colocate", metadata={"help": "vLLM placement"})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "vLLM share of GPU memory"})


C = TypeVar("C")


def from_mapping(cls: type[C], values: dict[str, Any], where: str = "") -> C:
    """Build dataclass ``cls`` from a mapping; unknown keys raise :class:`ConfigError` naming ``where.key``."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(repr(f'{where}{k}') for k in unknown)} for {cls.__name__}; "
            f"known: {', '.join(sorted(known))}"
        )
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        f = known[key]
        if f.name == "lora":
            value = value if isinstance(value, LoraSettings) else from_mapping(LoraSettings, value, f"{where}lora.")
        elif f.name == "rewards":
            from ibisagent.rewards import RewardWeights

            try:
                RewardWeights.from_mapping(value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{where}rewards: {exc}") from exc
            value = {**GRPORunConfig().rewards, **{k: float(v) for k, v in value.items()}}
        kwargs[key] = value
    return check(cls(**kwargs), where)


def check(config: C, where: str = "") -> C:
    """Settings of a run config that cannot work together, checked alike for a YAML config (by
    :func:`from_mapping`, before anything is loaded) and for one built in code (when a trainer starts); raises
    :class:`ConfigError` naming them. Returns ``config``."""
    if getattr(config, "time_decay", False) and not getattr(config, "max_seconds", None):
        raise ConfigError(f"{where}time_decay needs max_seconds (the time budget the learning rate decays over)")
    if getattr(config, "weight_decay", 0.0) < 0:
        raise ConfigError(f"{where}weight_decay must be ≥ 0, got {config.weight_decay}")
    if getattr(config, "anchor_modes", 1) < 1:
        raise ConfigError(f"{where}anchor_modes must be ≥ 1, got {config.anchor_modes}")
    if getattr(config, "expert_max_clicks", 1) < 1:
        raise ConfigError(f"{where}expert_max_clicks must be ≥ 1, got {config.expert_max_clicks}")
    if getattr(config, "anchor_clicks", "first") not in ANCHOR_CLICK_CHOICES:
        raise ConfigError(f"{where}anchor_clicks must be 'first' or 'all', got {config.anchor_clicks!r}")
    if getattr(config, "anchor_from", None) and not Path(config.anchor_from).is_file():
        raise ConfigError(f"{where}anchor_from: no such file: {config.anchor_from}")
    if getattr(config, "first_turn_repeats", 1) < 1:
        raise ConfigError(f"{where}first_turn_repeats must be ≥ 1, got {config.first_turn_repeats}")
    if getattr(config, "train_vision", False) and config.lora.enabled:
        raise ConfigError(f"{where}train_vision needs full fine-tuning (lora: {{enabled: false}}): LoRA adapters "
                          "train the language model only")
    return config


def load_config(cls: type[C], path: str | os.PathLike[str] | None, overrides: dict[str, Any] | None = None) -> C:
    """Read ``path`` (YAML) into ``cls``, then apply ``overrides`` (already-typed values, ``None`` ones ignored)."""
    import yaml

    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: a config is a YAML mapping, got {type(loaded).__name__}")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_mapping(cls, values)


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data (for ``report.json`` and run records)."""
    return dataclasses.asdict(config)
