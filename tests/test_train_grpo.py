"""GRPO on a tiny Qwen2.5-VL taught the grammar by a short SFT: both modes, the five rewards per step, observation
images reaching the forward pass, loss and rewards moving, the saved policy reloading."""

from __future__ import annotations

import json

import pytest

from train_data import oracle_sft_dataset, short_prompts, write_manifest

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    """A tiny model fine-tuned until it writes the oracle's turns (short prompts keep it fast)."""
    from ibisagent.policies.tiny import ensure_tiny_model
    from ibisagent.train.config import LoraSettings, SFTRunConfig
    from ibisagent.train.environment import EnvSettings
    from ibisagent.train.sft import run_sft

    root = tmp_path_factory.mktemp("grpo")
    manifest = write_manifest(root / "data", cases=2)
    prompts = short_prompts(root)
    data = oracle_sft_dataset(manifest, root / "sft_data", EnvSettings(max_steps=6, prompts=prompts), repeat=4)
    config = SFTRunConfig(model=str(ensure_tiny_model(root / "cache")), lora=LoraSettings(enabled=False),
                          learning_rate=1e-2, max_steps=300, save_steps=1000)
    result = run_sft(config, data, root / "sft")
    return root, manifest, prompts, result.policy


def _weights(path):
    from safetensors.numpy import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["rollout", "step"])
def test_grpo_moves_loss_and_rewards_and_reloads(taught, mode):
    import numpy as np

    from ibisagent.policies import load_policy
    from ibisagent.rewards import REWARD_NAMES
    from ibisagent.train.config import GRPORunConfig, LoraSettings
    from ibisagent.train.grpo import run_grpo

    root, manifest, prompts, sft_policy = taught
    config = GRPORunConfig(model=str(sft_policy), mode=mode, lora=LoraSettings(enabled=False), max_steps=3,
                           num_generations=4, max_turns=3, max_completion_length=300, learning_rate=1e-3,
                           prompts=prompts, save_steps=1000)
    policy, history = run_grpo(config, manifest, root / f"grpo_{mode}", progress=False)
    steps = [h for h in history if "reward" in h]
    assert len(steps) == 3
    for h in steps:  # each reward's mean is logged per step
        assert all(f"rewards/{name}_reward/mean" in h for name in REWARD_NAMES)
    assert any(h["reward_std"] > 0 for h in steps)  # the group saw different rewards …
    assert any(abs(h["loss"]) > 0 for h in steps)  # … so the policy gradient was not zero
    assert any(h["rewards/format_reward/mean"] > 0 for h in steps)
    before, after = _weights(sft_policy), _weights(policy)
    assert any(not np.array_equal(before[k], after[k]) for k in before)  # the weights moved
    assert json.loads((root / f"grpo_{mode}" / "grpo_log.json").read_text())
    reloaded = load_policy(f"hf:{policy}", device="cpu")  # the saved policy reloads as an hf: policy
    assert reloaded.observation_settings() == {"show_points": False}  # observing as the policy it started from


@pytest.mark.slow
def test_rollout_observation_images_reach_the_forward_pass(taught):
    """Every executed action returns an overlay image; all of them (plus the prompt image) are in the training
    forward pass of the rollouts that produced them."""
    import torch

    from ibisagent.train.common import load_processor
    from ibisagent.train.config import GRPORunConfig, LoraSettings
    from ibisagent.train.grpo import build_rows, env_settings, make_trainer

    root, manifest, prompts, sft_policy = taught
    # a low temperature makes the taught model replay its turns, so the rollouts take actions
    config = GRPORunConfig(model=str(sft_policy), mode="rollout", lora=LoraSettings(enabled=False), max_steps=1,
                           num_generations=4, max_turns=3, max_completion_length=600, prompts=prompts,
                           temperature=0.2, save_steps=1000)
    processor = load_processor(sft_policy, config)
    rows = [r for r in build_rows(manifest, "rollout", env_settings(config, processor, sft_policy), progress=False)
            if r["case_id"] != "absent"]
    trainer = make_trainer(config, rows, root / "images", sft_policy, processor)
    seen: list[int] = []

    def count_images(module, args, kwargs):
        if torch.is_grad_enabled() and kwargs.get("image_grid_thw") is not None:
            seen.append(int(kwargs["image_grid_thw"].shape[0]))

    trainer.model.register_forward_pre_hook(count_images, with_kwargs=True)
    trainer.train()
    calls = [env.calls for env in trainer.environments]
    assert sum(calls) > 0, "the taught model should take at least one action"
    images = [env.images for env in trainer.environments]
    assert sum(images) > 0 and all(i <= c for i, c in zip(images, calls))
    # the prompt image of each rollout plus every overlay its actions returned (an action that ended the episode, or a
    # malformed one answered with a repair prompt, returns no image)
    assert seen and seen[-1] == sum(1 + i for i in images)


def test_generation_never_writes_vision_placeholders(tmp_path):
    """A sampled <|video_pad|> (or any vision placeholder) no longer matches the rollout's images and broke the
    training forward pass (seen in a recipe run); every vision placeholder is suppressed in GRPO's generation."""
    from ibisagent.policies.tiny import ensure_tiny_model
    from ibisagent.train.common import load_processor
    from ibisagent.train.config import GRPORunConfig
    from ibisagent.train.grpo import grpo_args, vision_token_ids

    model = ensure_tiny_model(tmp_path / "cache")
    processor = load_processor(model, GRPORunConfig())
    tok = processor.tokenizer
    expected = {tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                       "<|vision_end|>")}
    assert set(vision_token_ids(processor)) == expected and len(expected) == 4
    args = grpo_args(GRPORunConfig(model=str(model), max_steps=1), tmp_path / "out", processor)
    assert set(args.generation_kwargs["suppress_tokens"]) == expected


def test_fewer_rows_than_prompts_per_step_is_a_clear_error(tmp_path):
    """trl would stop with "max_steps must be set … if dataloader does not have a length" (seen in a recipe run on a
    small manifest); the run names the numbers instead, before loading the model."""
    from ibisagent.policies.tiny import ensure_tiny_model
    from ibisagent.train.config import GRPORunConfig
    from ibisagent.train.grpo import run_grpo

    manifest = write_manifest(tmp_path / "data", cases=2)
    config = GRPORunConfig(model=str(ensure_tiny_model(tmp_path / "cache")), batch_size=8, max_steps=1)
    with pytest.raises(ValueError, match=r"takes 8 prompts per step \(batch_size=8 × grad_accum=1 × devices\) but "
                                         r".* gave 3 row\(s\)"):
        run_grpo(config, manifest, tmp_path / "out", progress=False)


def test_step_rows_are_the_states_before_each_expert_turn_within_the_click_budget(tmp_path):
    """Step mode: one row per expert turn, the row of turn k carrying the k turns before it (built in one pass, not
    k replays); the expert stops at the simulator's click budget, since step mode's environment has no step limit
    (an expert that never reaches its IoU stop hung the row building on a real-MRI manifest)."""
    from ibisagent.train.environment import EnvSettings, make_env
    from ibisagent.train.grpo import build_rows, oracle_turns

    manifest = write_manifest(tmp_path / "data", cases=2)
    settings = EnvSettings(history="off", max_steps=10**6)
    rows = build_rows(manifest, "step", settings, progress=False)
    by_case: dict[str, list] = {}
    for row in rows:
        by_case.setdefault(row["case_id"], []).append(json.loads(row["history"]))
    assert set(by_case) == {"c0", "c1", "absent"}
    for case_id, histories in by_case.items():
        env = make_env(str(manifest), case_id, settings)
        env.reset()
        expert = oracle_turns(env)
        assert histories == [expert[:k] for k in range(len(expert))]
    env = make_env(str(manifest), "c0", settings)
    env.reset()
    assert len(oracle_turns(env, max_turns=1)) == 1 and not env.done



def test_grpo_rows_replay_the_expert_anchored_as_the_sft_data_was(tmp_path):
    """The rows' expert is the SFT data's: the run config's ``anchor_from`` (the JSON ``train tiny`` saves, or a
    manifest as ``simulate --anchor-from`` takes), ``anchor_clicks`` and ``expert_max_clicks``, so step mode's states
    and every row's optimal step count are the ones SFT trained on; without them, the deepest point."""
    import numpy as np

    from ibisagent.clicks import LAYOUT_GRID, AnchorMode
    from ibisagent.data.manifest import expert_anchors
    from ibisagent.protocol import parse_response
    from ibisagent.train.config import ConfigError, GRPORunConfig, from_mapping
    from ibisagent.train.environment import EnvSettings
    from ibisagent.train.grpo import config_rows

    manifest = write_manifest(tmp_path / "data", cases=1)
    saved = tmp_path / "anchor_modes.json"
    corner = AnchorMode(anchor=(0.0, 0.0), prototype=np.zeros((LAYOUT_GRID, LAYOUT_GRID), np.float32))
    saved.write_text(json.dumps({"Lesion": [corner.to_json()]}))
    settings = EnvSettings(history="off", max_steps=10**6)

    def rows(**keys):
        return config_rows(from_mapping(GRPORunConfig, {"mode": "step", **keys}), manifest, settings, ["c0"],
                           progress=False)

    def first_click(found):
        return parse_response(json.loads(found[1]["history"])[0]).clicks[0]

    anchored, deepest = first_click(rows(anchor_from=str(saved))), first_click(rows())
    # the 12-px square of c0 spans x 10–21, y 22–33 (of 56 px): the anchored click is in its upper-left part, the
    # deepest point at its centre
    assert anchored.x < deepest.x and anchored.y < deepest.y
    assert len(rows(expert_max_clicks=1)) == 1 < len(rows())  # the expert's click budget: one turn, one row
    # a manifest: the anchor where the target is most often found (c0's square is centred at (16, 28) of 56 px)
    assert expert_anchors(manifest)["lesion"][0].anchor == pytest.approx((16 / 56, 28 / 56), abs=0.03)
    for broken in ("[1, 2]", '{"lesion": []}'):
        saved.write_text(broken)
        with pytest.raises(ValueError, match="anchor_modes.json"):
            expert_anchors(saved)
    for keys, named in (({"anchor_from": str(tmp_path / "missing.json")}, "anchor_from"),
                        ({"anchor_modes": 0}, "anchor_modes"), ({"anchor_clicks": "some"}, "anchor_clicks"),
                        ({"expert_max_clicks": 0}, "expert_max_clicks")):
        with pytest.raises(ConfigError, match=named):
            from_mapping(GRPORunConfig, keys)


def test_grpo_observes_as_the_policy_it_starts_from(tmp_path):
    """A policy trained with the points listed keeps them in GRPO: the rollouts and the step rows list them."""
    import shutil

    from ibisagent.env import write_observation
    from ibisagent.policies.tiny import ensure_tiny_model
    from ibisagent.protocol import format_action, parse_response
    from ibisagent.train.common import load_processor
    from ibisagent.train.config import GRPORunConfig
    from ibisagent.train.grpo import build_rows, env_settings

    start = tmp_path / "policy"
    shutil.copytree(ensure_tiny_model(tmp_path / "cache"), start)
    config = GRPORunConfig(model=str(start), mode="step")
    assert not env_settings(config, load_processor(start, config), start).show_points
    write_observation(start, {"show_points": True})
    settings = env_settings(config, load_processor(start, config), start)
    assert settings.show_points
    manifest = write_manifest(tmp_path / "data", cases=1)
    later = [row for row in build_rows(manifest, "step", settings, progress=False) if json.loads(row["history"])]
    assert later
    for row in later:
        clicks = [format_action(a) for turn in json.loads(row["history"]) for a in parse_response(turn).clicks]
        assert row["prompt"][-1]["content"][-1]["text"].splitlines()[-1] == f"Points so far: {'; '.join(clicks)}."
