"""Training: cold-start SFT and agentic GRPO on trl + peft (``ibisagent train sft|grpo|tiny``).

Modules: :mod:`~ibisagent.train.template` (the one chat/response template), :mod:`~ibisagent.train.config` (YAML
run configs), :mod:`~ibisagent.train.sft`, :mod:`~ibisagent.train.grpo`, :mod:`~ibisagent.train.environment` (the
trl environment adapter over :mod:`ibisagent.env`). Importing this package imports no heavy library.
"""
