"""Agentic GRPO (paper §3.4) on trl's ``GRPOTrainer``: β = 0, the five rewards, two modes.

* ``rollout``: full multi-turn rollouts through trl's environment API — one :class:`SegmentationToolEnv` per
  rollout over :class:`ibisagent.env.SegmentationEnv` (history ``full``); each action turn is an ``act`` tool call,
  its overlay image comes back as the next turn's observation (masked out of the loss, fed to the forward pass).
* ``step``: one action from a recorded expert state (the authors' released recipe): the row replays the expert's
  earlier turns on the environment (history ``off``, as the released checkpoint was run), the policy writes one
  turn, the environment re-runs the tool on all clicks so far plus the new ones and the rewards read its record.

Both modes use the same chat template and grammar as SFT and inference (:mod:`ibisagent.train.template`), the same
five reward functions (:mod:`ibisagent.rewards`, weights from the config), and log each reward's mean per step
(``rewards/<name>_reward/mean`` in ``OUT/grpo_log.json``). vLLM generation (colocate or server) is a config switch
for GPUs.

Rows (:func:`build_rows`) come from a manifest: rollout rows one per case; step rows one per expert turn of the
oracle's trajectory on the same environment (its turns are the SFT data's turns).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ibisagent.clicks import DEFAULT_MAX_CLICKS, AnchorClicks
from ibisagent.data.manifest import expert_anchors
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
from ibisagent.train.config import GRPORunConfig, check, to_dict
from ibisagent.train.environment import EnvSettings, factory, make_env, to_content_blocks

logger = logging.getLogger(__name__)


def env_settings(config: GRPORunConfig, processor: Any, model_path: str | os.PathLike[str]) -> EnvSettings:
    """Rollout settings matching the processor's pixel budget (policy grid = what the model is fed) and the way the
    starting policy at ``model_path`` observes (:func:`ibisagent.env.read_observation`: GRPO continues a policy as
    it was trained, and saves it so)."""
    from ibisagent.env import read_observation

    ip = processor.image_processor
    return EnvSettings(
        show_points=bool(read_observation(model_path).get("show_points", False)),
        tool=config.tool,
        history="full" if config.mode == "rollout" else "off",
        max_steps=config.max_turns if config.mode == "rollout" else 10**6,
        min_pixels=int(ip.size["shortest_edge"]),
        max_pixels=int(ip.size["longest_edge"]),
        factor=int(ip.patch_size) * int(ip.merge_size),
        prompts=config.prompts,
    )


def prompt_of(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """An environment observation as a trl prompt: messages with ``{"type": "image"}`` placeholders and the images
    (PIL) in placeholder order."""
    prompt, images = [], []
    for message in messages:
        parts = []
        for block in to_content_blocks(message):
            if block["type"] == "image":
                images.append(block["image"])
                parts.append({"type": "image", "text": None})
            else:
                parts.append({"type": "text", "text": block["text"]})
        prompt.append({"role": message["role"], "content": parts})
    return prompt, images


def oracle_turns(env: Any, max_turns: int = DEFAULT_MAX_CLICKS, anchors: Mapping[str, Any] | None = None,
                 anchor_clicks: AnchorClicks = "first") -> list[str]:
    """The simulated expert's turns on a reset environment with ground truth, played to the end or to ``max_turns``
    turns (the simulator's click budget: step mode's environment has no step limit of its own, and an expert that
    never reaches its IoU stop — a thin ribbon — would otherwise click on without end). ``anchors`` /
    ``anchor_clicks``: the expert's click anchors (:class:`ibisagent.policies.oracle.OraclePolicy`), so that the
    states match those of the SFT data's expert."""
    from ibisagent.policies.base import GenerationOptions
    from ibisagent.policies.oracle import OraclePolicy

    oracle = OraclePolicy(env.ground_truth, anchors=anchors, anchor_clicks=anchor_clicks)
    observation = env.observation
    turns: list[str] = []
    while not env.done and len(turns) < max_turns:
        text = oracle.generate([observation.request], GenerationOptions())[0].text
        turns.append(text)
        result = env.step(text)
        if result.observation is not None:
            observation = result.observation
    return turns


def build_rows(manifest: str | os.PathLike[str], mode: str, settings: EnvSettings,
               case_ids: list[str] | None = None, progress: bool = True, anchors: Mapping[str, Any] | None = None,
               anchor_clicks: AnchorClicks = "first",
               max_clicks: int = DEFAULT_MAX_CLICKS) -> list[dict[str, Any]]:
    """GRPO rows for the cases of ``manifest`` (all, or ``case_ids``), from the simulated expert's turns (anchored by
    ``anchors`` / ``anchor_clicks``, at most ``max_clicks`` turns, as in :func:`oracle_turns`).

    Columns: ``prompt`` + ``images`` (the environment's observation for the state the policy acts from),
    ``manifest``, ``case_id``, ``history`` (JSON list of replayed expert turns; step mode), ``optimal_steps`` (the
    expert's turn count) and ``expected_answer`` (closed VQA, else empty). Closed-VQA cases without targets are left
    out (the environment needs a target).
    """
    from tqdm.auto import tqdm

    from ibisagent.data.manifest import read_cases

    manifest = str(Path(manifest).resolve())
    cases = [c for c in read_cases(manifest) if case_ids is None or c.id in set(case_ids)]
    rows: list[dict[str, Any]] = []
    for case in tqdm(cases, desc=f"GRPO rows ({mode})", disable=not progress):
        env = make_env(manifest, case.id, settings)
        if env is None:
            continue
        env.reset()
        expert = oracle_turns(env, max_clicks, anchors, anchor_clicks)
        common = {"manifest": manifest, "case_id": case.id, "optimal_steps": max(1, len(expert)),
                  "expected_answer": case.answer or ""}
        # one pass over the expert's turns: the state before turn k is a row (rollout: the first state only)
        env.reset()
        for k, text in enumerate(expert[:1] if mode == "rollout" else expert):
            if env.done:
                break
            prompt, images = prompt_of(env.observation.messages)
            rows.append({"prompt": prompt, "images": images, "history": json.dumps(expert[:k]), **common})
            if mode == "step":
                env.step(text)
    return rows


def config_rows(config: GRPORunConfig, manifest: str | os.PathLike[str], settings: EnvSettings,
                case_ids: list[str] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """:func:`build_rows` for a run config: its mode, and its expert as the SFT data's — anchored by ``anchor_from``
    (:func:`ibisagent.data.manifest.expert_anchors`, fitted with seed 0 as ``simulate --anchor-from`` fits them),
    ``anchor_modes``, ``anchor_clicks``, within ``expert_max_clicks``."""
    anchors = expert_anchors(config.anchor_from, config.anchor_modes) if config.anchor_from else None
    return build_rows(manifest, config.mode, settings, case_ids, progress, anchors, config.anchor_clicks,
                      config.expert_max_clicks)


def reward_functions() -> list[Any]:
    """The five trl reward functions in :data:`ibisagent.rewards.REWARD_NAMES` order."""
    from ibisagent.rewards import REWARD_FUNCTIONS

    return list(REWARD_FUNCTIONS)


def vision_token_ids(processor: Any) -> list[int]:
    """Ids of the vision placeholder tokens (``<|image_pad|>``, ``<|video_pad|>``, ``<|vision_start|>``,
    ``<|vision_end|>``) a policy must never write: one sampled into a rollout no longer matches the images and breaks
    the training forward pass (trl suppresses only the image pad)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    names = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    ids = [tokenizer.convert_tokens_to_ids(name) for name in names]
    return sorted({int(i) for i in ids if i is not None and i != tokenizer.unk_token_id})


def grpo_args(config: GRPORunConfig, out: Path, processor: Any = None) -> Any:
    """trl ``GRPOConfig`` for a run config (with ``processor``: its vision tokens are suppressed in generation)."""
    from trl import GRPOConfig

    from ibisagent.rewards import RewardWeights

    kwargs: dict[str, Any] = {}
    if not config.use_vllm and processor is not None:
        kwargs["generation_kwargs"] = {"suppress_tokens": vision_token_ids(processor)}
    if config.use_vllm:
        kwargs.update(use_vllm=True, vllm_mode=config.vllm_mode,
                      vllm_gpu_memory_utilization=config.vllm_gpu_memory_utilization)
    return GRPOConfig(
        beta=config.beta,
        loss_type=config.loss_type,
        num_generations=config.num_generations,
        per_device_train_batch_size=config.batch_size * config.num_generations,
        max_completion_length=config.max_completion_length,
        max_tool_calling_iterations=(config.max_turns - 1) if config.mode == "rollout" else 0,
        temperature=config.temperature,
        reward_weights=RewardWeights.from_mapping(config.rewards).as_list(),
        remove_unused_columns=False,
        **training_arguments(config, out),
        **kwargs,
    )


def make_trainer(config: GRPORunConfig, rows: list[dict[str, Any]], out: Path, model_path: Path,
                 processor: Any) -> Any:
    """The ``GRPOTrainer`` over ``rows`` (not yet trained)."""
    from datasets import Dataset
    from trl import GRPOTrainer

    settings = env_settings(config, processor, model_path)
    model = load_model(model_path, config)
    return GRPOTrainer(
        model=model,
        reward_funcs=reward_functions(),
        args=grpo_args(config, out, processor),
        train_dataset=Dataset.from_list(rows),
        processing_class=processor,
        peft_config=lora_config(config.lora) if config.lora.enabled else None,
        environment_factory=factory(settings),
        callbacks=trainer_callbacks(out, config.max_seconds, "reward", config.time_decay),
    )


def run_grpo(
    config: GRPORunConfig,
    manifest: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    case_ids: list[str] | None = None,
    resume: bool = True,
    progress: bool = True,
) -> tuple[Path, list[dict[str, Any]]]:
    """Build the rows, train, save ``out_dir/policy``; returns the policy path and the log history (with the mean of
    every reward per logged step). Resumes from the newest checkpoint in ``out_dir/checkpoints`` when ``resume``."""
    check(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(config.model)
    processor = load_processor(model_path, config)
    settings = env_settings(config, processor, model_path)
    rows = config_rows(config, manifest, settings, case_ids, progress)
    if not rows:
        raise ValueError(f"no GRPO rows from {manifest} (no case with a target?)")
    prompts = config.batch_size * config.grad_accum * int(os.environ.get("WORLD_SIZE", "1"))
    if len(rows) < prompts:
        raise ValueError(f"GRPO takes {prompts} prompts per step (batch_size={config.batch_size} × grad_accum="
                         f"{config.grad_accum} × devices) but {manifest} gave {len(rows)} row(s): lower batch_size")
    (out / "grpo_config.json").write_text(json.dumps(to_dict(config), indent=1), encoding="utf-8")
    trainer = make_trainer(config, rows, out, model_path, processor)
    checkpoint = last_checkpoint(out) if resume else None
    if checkpoint:
        logger.info("GRPO: resuming from %s", checkpoint)
    trainer.train(resume_from_checkpoint=checkpoint)
    log_history(trainer, out, "grpo_log.json")
    policy = save_policy(trainer.model, processor, out / POLICY, observation={"show_points": settings.show_points})
    return policy, list(trainer.state.log_history)
