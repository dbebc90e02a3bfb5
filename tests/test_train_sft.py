"""SFT on the tiny Qwen2.5-VL: the project chat template, trained-token masks, LoRA per tower, bad rows, reload."""

from __future__ import annotations

import json

import numpy as np
import pytest

from train_data import STOP, conversation, square_image, turn, write_sft_dataset

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ibisagent.policies.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def processor(tiny):
    from ibisagent.train.common import load_processor
    from ibisagent.train.config import SFTRunConfig

    return load_processor(tiny, SFTRunConfig())


def test_template_renders_stock_qwen_turns_and_is_tool_ready(processor, tiny):
    from transformers import AutoProcessor
    from trl.chat_template_utils import is_chat_template_prefix_preserving, supports_tool_calling

    stock = AutoProcessor.from_pretrained(tiny)
    msgs = [{k: v for k, v in m.items() if k != "train"} for m in conversation(wrong=True)]
    assert processor.apply_chat_template(msgs, tokenize=False) == stock.apply_chat_template(msgs, tokenize=False)
    assert supports_tool_calling(processor) and is_chat_template_prefix_preserving(processor)


def test_response_template_turns_action_turns_into_act_calls(processor):
    from trl.chat_template_utils import parse_response

    tok = processor.tokenizer
    click = turn(0.25, 0.75)
    parsed = parse_response(tok, tok(click + "<|im_end|>")["input_ids"], prefix=[])
    assert parsed["tool_calls"] == [{"type": "function", "function": {"name": "act", "arguments": {"turn": click}}}]
    # Terminate calls no tool: the rollout ends; the text stays whole
    parsed = parse_response(tok, tok(STOP + "<|im_end|>")["input_ids"], prefix=[])
    assert "tool_calls" not in parsed and parsed["content"] == STOP
    # the act call renders back to exactly the generated text
    rendered = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "q"}]},
         {"role": "assistant", "content": [], "tool_calls": parsed_calls(click)}], tokenize=False)
    assert f"<|im_start|>assistant\n{click}<|im_end|>\n" in rendered


def parsed_calls(text):
    return [{"type": "function", "function": {"name": "act", "arguments": {"turn": text}}}]


def test_trained_tokens_are_exactly_the_trained_assistant_turns(processor):
    """Through trl's own vision collator: labels != -100 only on assistant turns whose train flag is not false."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    msgs = conversation(wrong=True)
    n_images = sum(1 for m in msgs for p in m["content"] if p["type"] == "image")
    images = [square_image(56, 28, 28, seed=i) for i in range(n_images)]
    collator = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)
    batch = collator([{"messages": msgs, "images": images}])
    labels = batch["labels"][0]
    trained = labels[labels != -100].tolist()
    tok = processor.tokenizer
    expected = []
    for m in msgs:
        if m["role"] == "assistant" and m["train"] is not False:
            expected += tok(m["content"][0]["text"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert trained == expected
    wrong = tok(turn(0.05, 0.05), add_special_tokens=False)["input_ids"]
    assert len(trained) == len(expected) and len(wrong) > 0
    # the image tokens of all four images reach the batch
    assert int(batch["image_grid_thw"].shape[0]) == n_images


def test_rows_with_mismatched_or_cut_images_are_reported_and_skipped(processor, tmp_path):
    from datasets import load_from_disk

    from ibisagent.train.sft import check_rows

    data = load_from_disk(str(write_sft_dataset(tmp_path / "d", rows=2, bad_rows=True)))
    keep, skipped = check_rows(data, processor, max_length=4096)
    assert keep == [0, 1] and [s.index for s in skipped] == [2] and "placeholder" in skipped[0].reason
    keep, skipped = check_rows(data, processor, max_length=60)
    assert keep == [] and all("max_length" in s.reason or "placeholder" in s.reason for s in skipped)


def test_lora_targets_the_language_model_only(tiny):
    from peft import get_peft_model

    from ibisagent.train.common import count_lora_layers, load_model, lora_config
    from ibisagent.train.config import LoraSettings, SFTRunConfig

    model = get_peft_model(load_model(tiny, SFTRunConfig()), lora_config(LoraSettings()))
    # 2 language layers × (q, k, v, o, gate, up, down)
    assert count_lora_layers(model) == {"language": 14, "vision": 0, "other": 0}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "visual" not in n for n in trainable)


def test_full_finetuning_freezes_vision(tiny):
    from ibisagent.train.common import load_model
    from ibisagent.train.config import SFTRunConfig

    model = load_model(tiny, SFTRunConfig())
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(".visual." in f".{n}" for n in frozen)
    assert any(p.requires_grad for n, p in model.named_parameters() if "language_model" in n)


def test_train_vision_trains_the_tower_of_a_model_built_from_scratch(tmp_path, tiny):
    """``train_vision`` (the recipe's setting for its from-scratch model): the saved tower differs from the random
    one it started from; without it the saved tower is the starting one, bit for bit."""
    from safetensors.torch import load_file

    from ibisagent.train.config import LoraSettings, SFTRunConfig
    from ibisagent.train.sft import run_sft

    data = write_sft_dataset(tmp_path / "data", rows=2)
    start = {k: v for k, v in load_file(str(tiny / "model.safetensors")).items() if ".visual." in f".{k}"}
    assert start
    for train_vision in (False, True):
        config = SFTRunConfig(model=str(tiny), max_steps=2, learning_rate=5e-3, save_steps=10,
                              lora=LoraSettings(enabled=False), train_vision=train_vision)
        result = run_sft(config, data, tmp_path / f"run_{train_vision}")
        saved = load_file(str(result.policy / "model.safetensors"))
        changed = [k for k, v in start.items() if not bool((saved[k] == v).all())]
        if train_vision:
            assert any("merger" in k for k in changed) and any("blocks" in k for k in changed)
        else:
            assert changed == []


def test_first_turn_rows_are_trained_that_many_times(tmp_path, tiny):
    """``first_turn_repeats``: the rows ``rows.jsonl`` marks as an episode's first turn (step 0) are fed that many
    times per epoch — one step of a large batch goes through 3 rows + 2 × 1 first-turn row = 5 rows, not 3; a
    missing or mismatched ``rows.jsonl`` is an error naming the file."""
    from ibisagent.train.config import SFTRunConfig
    from ibisagent.train.sft import first_turn_rows, run_sft

    data = write_sft_dataset(tmp_path / "data", rows=3)
    config = SFTRunConfig(model=str(tiny), max_steps=1, batch_size=8, save_steps=10, first_turn_repeats=3)
    with pytest.raises(ValueError, match="rows.jsonl"):
        run_sft(config, data, tmp_path / "run0")
    # a history "full" dataset: one row per episode, no first-turn row
    (data / "rows.jsonl").write_text("".join(json.dumps({"step": -1}) + "\n" for _ in range(3)))
    with pytest.raises(ValueError, match="no first-turn row"):
        run_sft(config, data, tmp_path / "run_full")
    steps = [0, 1, 5]
    (data / "rows.jsonl").write_text("".join(json.dumps({"id": "c", "kind": "expert", "step": k}) + "\n"
                                             for k in steps))
    assert first_turn_rows(data, 3) == {0}
    with pytest.raises(ValueError, match="describes 3 rows, the dataset has 4"):
        first_turn_rows(data, 4)
    result = run_sft(config, data, tmp_path / "run")
    assert result.rows == 3 and result.rows_fed == 5
    plain = run_sft(SFTRunConfig(model=str(tiny), max_steps=1, batch_size=8, save_steps=10), data, tmp_path / "run1")
    assert plain.rows_fed == 3


def test_train_vision_with_lora_is_refused(tiny):
    from ibisagent.train.common import load_model
    from ibisagent.train.config import ConfigError, SFTRunConfig, from_mapping

    with pytest.raises(ConfigError, match="train_vision needs full fine-tuning"):
        from_mapping(SFTRunConfig, {"train_vision": True})
    with pytest.raises(ValueError, match="train_vision needs full fine-tuning"):  # a config built in code
        load_model(tiny, SFTRunConfig(train_vision=True))
    assert from_mapping(SFTRunConfig, {"train_vision": True, "lora": {"enabled": False}}).train_vision


def test_sft_steps_lower_the_loss_and_the_policy_reloads(tmp_path, tiny, monkeypatch):
    from ibisagent.agent import AgentConfig, run_agent
    from ibisagent.policies import load_policy
    from ibisagent.tools import load_tool
    from ibisagent.train.config import SFTRunConfig
    from ibisagent.train.sft import run_sft

    from ibisagent.env import write_observation

    data = write_sft_dataset(tmp_path / "data", rows=2, bad_rows=True)
    write_observation(data, {"show_points": True})  # as `build-sft --show-points` records it
    config = SFTRunConfig(model=str(tiny), max_steps=4, learning_rate=5e-3, save_steps=2)
    result = run_sft(config, data, tmp_path / "run")
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert result.rows == 2 and [s.index for s in result.skipped] == [2]
    # 4 steps of one row each over 2 trainable rows: 4 rows fed, 2 distinct (not "3 rows trained")
    assert result.steps == 4 and result.rows_fed == 4
    assert result.summary() == "3 rows (2 trainable, 1 skipped); 4 steps over 4 rows (2 distinct)"
    assert json.loads((tmp_path / "run" / "skipped.jsonl").read_text().splitlines()[0])["row"] == 2
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert progress["step"] == 4 and progress["best_metric"] == pytest.approx(min(losses))
    policy = load_policy(f"hf:{result.policy}", device="cpu")
    assert "generation" in policy.processor.chat_template  # the training template travels with the checkpoint
    assert policy.observation_settings() == {"show_points": True}  # and so does the way its data observed
    image = np.asarray(square_image(56, 28, 28))
    tool = load_tool("embedded")
    traj = run_agent(policy, tool.encode(image), image, "Segment the lesion.", "lesion",
                     config=AgentConfig(max_steps=1))
    assert len(traj.steps) >= 1


@pytest.mark.parametrize(("steps", "rows", "batch", "accum", "world", "fed"), [
    (2, 100, 1, 1, 1, 2),     # --max-steps 2 on a big dataset sees 2 rows, not 100
    (2, 100, 2, 4, 1, 16),
    (3, 10, 4, 1, 1, 10),     # the third step takes the 2 rows left of the epoch
    (4, 10, 4, 1, 1, 14),     # then a new epoch starts
    (1, 10, 4, 1, 2, 8),      # two devices
    (0, 10, 1, 1, 1, 0),
])
def test_rows_fed_counts_what_the_steps_went_through(steps, rows, batch, accum, world, fed):
    from ibisagent.train.sft import rows_fed

    assert rows_fed(steps, rows, batch, accum, world) == fed


def test_time_decay_lowers_the_learning_rate_over_the_budget(tmp_path, tiny):
    from ibisagent.train.config import SFTRunConfig
    from ibisagent.train.sft import run_sft

    data = write_sft_dataset(tmp_path / "data", rows=2)
    config = SFTRunConfig(model=str(tiny), max_steps=4, learning_rate=5e-3, save_steps=10, max_seconds=600,
                          time_decay=True)
    result = run_sft(config, data, tmp_path / "run")
    rates = [h["learning_rate"] for h in result.log_history if "learning_rate" in h]
    assert len(rates) == 4 and all(0 < b < a <= 5e-3 for a, b in zip(rates, rates[1:]))
    # the clock, not the step count, sets the rate: 4 steps of a 4-step run in seconds of a 600 s budget
    assert rates[-1] > 0.9 * 5e-3


def test_a_resumed_run_continues_its_time_budget(tmp_path, tiny):
    """Each checkpoint records the seconds spent; a run resumed from it continues the budget and the time schedule
    (here: killed with 10 s of a 600 s budget left → the resumed steps train at < 2 % of the peak rate, not at the
    peak)."""
    import dataclasses

    from ibisagent.train.config import SFTRunConfig
    from ibisagent.train.sft import run_sft

    data = write_sft_dataset(tmp_path / "data", rows=2)
    config = SFTRunConfig(model=str(tiny), max_steps=2, learning_rate=5e-3, save_steps=2, max_seconds=600,
                          time_decay=True)
    run_sft(config, data, tmp_path / "run")
    spent = tmp_path / "run" / "checkpoints" / "checkpoint-2" / "time_spent.json"
    assert 0 < json.loads(spent.read_text())["seconds"] < 600
    spent.write_text(json.dumps({"seconds": 590.0}))  # as if killed near the end of its budget
    resumed = run_sft(dataclasses.replace(config, max_steps=4), data, tmp_path / "run")
    rates = [h["learning_rate"] for h in resumed.log_history if "learning_rate" in h and h["step"] > 2]
    assert len(rates) == 2 and all(0 <= r < 0.02 * 5e-3 for r in rates)
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert progress["step"] == 4 and progress["seconds"] >= 590


def test_time_decay_without_a_budget_is_refused():
    from ibisagent.train.config import ConfigError, SFTRunConfig, from_mapping

    with pytest.raises(ConfigError, match="time_decay needs max_seconds"):
        from_mapping(SFTRunConfig, {"time_decay": True})
