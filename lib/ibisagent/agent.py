"""Drivers over the segmentation environment (:mod:`ibisagent.env`): one trajectory, or several in lockstep.

A driver asks the policy for each unfinished episode's next turn and hands the text to
:meth:`SegmentationEnv.step`; everything a step means (parsing, routing, the tool, the overlay, the stop rules) lives
in the environment, so inference, the simulated expert (the oracle policy), training rollouts and the app produce the
same turns. See :mod:`ibisagent.env` for the state, the grids, the history modes and the stop reasons; the drivers
add ``time_limit`` (checked before each policy call) and ``policy_error`` (the backend raised :class:`PolicyError`,
which stops every episode of that call).

* **Batching**: :func:`run_agents` steps several episodes in lockstep, one ``policy.generate`` call per round for
  every unfinished episode. An episode whose tool fails stops alone (``tool_error``); the others finish. Nothing in
  the loop is shared between calls or threads: one policy and one tool session may serve many agents at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from ibisagent.env import (
    AgentTrajectory,
    ClickResult,
    EnvConfig,
    EnvState,
    HistoryMode,
    SegmentationEnv,
    StepResult,
    StepTimings,
    StopReason,
    TargetState,
    absent_targets,
)
from ibisagent.observation import IMAGE_RESAMPLING, resize_image, resize_mask
from ibisagent.policies.base import GenerationOptions, Policy, PolicyError
from ibisagent.prompts import Prompts, load_prompts
from ibisagent.tools.base import ImageSession, check_image

#: Former names of the environment's records (one type each; kept for callers of the agent API).
AgentStep = StepResult
AgentClick = ClickResult
AgentState = EnvState


@dataclass(frozen=True)
class AgentConfig:
    """Settings of the loop.

    Attributes:
        max_steps: most policy steps per trajectory (a step's repair retries do not count as steps).
        history: ``"off"``: each step sees the system prompt + the current overlay + the refinement prompt (how the
            released checkpoint was run). ``"full"``: the whole interleaved history — first image, every assistant
            turn, every observation overlay.
        repeat_limit: stop with ``repeated_click`` when the same click (same target, pixel and polarity) is
            requested this many times in a row (``Undo``/``Reset`` break the run).
        time_limit: wall-clock seconds per trajectory (checked before each policy call, and the deadline of a call in
            progress: a call the deadline cuts stops the run with ``time_limit``); ``None`` = no limit.
        repair_retries: repair turns (the error and the expected format, :func:`protocol.repair_message`) after
            malformed output before stopping with ``unparseable``.
        options: decoding settings passed to the policy.
        show_points: list the points placed so far in each refinement turn (:attr:`EnvConfig.show_points`);
            ``None`` = as the policy was trained (:meth:`Policy.observation_settings`, off when it records nothing).
    """

    max_steps: int = 10
    history: HistoryMode = "off"
    repeat_limit: int = 3
    time_limit: float | None = None
    repair_retries: int = 1
    options: GenerationOptions = field(default_factory=GenerationOptions)
    show_points: bool | None = None

    def __post_init__(self) -> None:
        self.env  # noqa: B018 - validates the episode settings
        if self.time_limit is not None and not (self.time_limit >= 0 and math.isfinite(self.time_limit)):
            raise ValueError(f"time_limit must be a non-negative number of seconds or None, got {self.time_limit}")

    @property
    def env(self) -> EnvConfig:
        """The episode settings of the environment."""
        return EnvConfig(max_steps=self.max_steps, history=self.history, repeat_limit=self.repeat_limit,
                         repair_retries=self.repair_retries, show_points=bool(self.show_points))

    def env_for(self, policy: Policy) -> EnvConfig:
        """The episode settings for ``policy``: :attr:`env`, with the observation settings the policy was trained
        with (:meth:`Policy.observation_settings`) wherever this config leaves them ``None``."""
        recorded = policy.observation_settings()
        show_points = self.show_points if self.show_points is not None else recorded.get("show_points", False)
        return replace(self.env, show_points=bool(show_points))


@dataclass(frozen=True)
class AgentJob:
    """One trajectory to run.

    Attributes:
        session: the tool's encoding of ``image`` (may be shared with other jobs and threads).
        image: (H, W, 3) uint8 RGB, the original image (the grid of the session and of all returned masks).
        instruction: the user's request, e.g. "Segment the left kidney."
        targets: target names in request order (one colour each in the overlay).
        initial_masks: target name → (H, W) bool mask to refine (refinement mode); targets left out start empty.
        ground_truth: target name → (H, W) bool mask (``None`` = absent) when known: the steps then carry IoU
            before/after and click placement (:class:`ibisagent.env.StepResult`).
    """

    session: ImageSession
    image: np.ndarray
    instruction: str
    targets: tuple[str, ...]
    initial_masks: Mapping[str, np.ndarray] | None = None
    ground_truth: Mapping[str, np.ndarray | None] | None = None


def policy_grid(policy: Policy, grid: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) ``policy`` wants an image of ``grid`` = (H, W) resized to (:meth:`Policy.image_size`), checked.

    Raises:
        ValueError: the policy asked for an empty grid.
    """
    ph, pw = policy.image_size(*grid)
    if int(ph) < 1 or int(pw) < 1:
        raise ValueError(f"policy {getattr(policy, 'name', type(policy).__name__)} asked for an image size of "
                         f"{ph}x{pw} for a {grid[0]}x{grid[1]} image")
    return int(ph), int(pw)


def make_env(policy: Policy, job: AgentJob, config: AgentConfig | None = None,
             prompts: Prompts | None = None) -> SegmentationEnv:
    """The environment a driver steps for ``job`` with ``policy`` (its policy grid, the config's episode settings).

    Raises:
        ValueError: a bad job (image, targets, masks) or policy grid.
    """
    config = config or AgentConfig()
    image = check_image(job.image)
    return SegmentationEnv(image, job.instruction, job.targets, job.session,
                           policy_grid=policy_grid(policy, (int(image.shape[0]), int(image.shape[1]))),
                           initial_masks=job.initial_masks, ground_truth=job.ground_truth,
                           config=config.env_for(policy), prompts=prompts or load_prompts())


def run_agent(
    policy: Policy,
    session: ImageSession,
    image: np.ndarray,
    instruction: str,
    targets: Sequence[str] | str,
    *,
    config: AgentConfig | None = None,
    prompts: Prompts | None = None,
    initial_masks: Mapping[str, np.ndarray] | None = None,
    ground_truth: Mapping[str, np.ndarray | None] | None = None,
) -> AgentTrajectory:
    """Run one trajectory: :func:`run_agents` with a single job.

    Args:
        policy: any :class:`Policy`.
        session: the tool's encoding of ``image``.
        image: (H, W, 3) uint8 RGB.
        instruction: the request text.
        targets: target name(s) in order.
        config: loop settings (default :class:`AgentConfig`).
        prompts: wording (default :func:`load_prompts`).
        initial_masks: target name → (H, W) bool to refine; ``None`` starts empty.
        ground_truth: target name → (H, W) bool (``None`` = absent) when known, for the steps' scores.
    """
    names = (targets,) if isinstance(targets, str) else tuple(targets)
    job = AgentJob(session=session, image=image, instruction=instruction, targets=names, initial_masks=initial_masks,
                   ground_truth=ground_truth)
    return run_agents(policy, [job], config, prompts)[0]


def run_agents(
    policy: Policy,
    jobs: Sequence[AgentJob],
    config: AgentConfig | None = None,
    prompts: Prompts | None = None,
) -> list[AgentTrajectory]:
    """Run several independent trajectories in lockstep: each round makes one batched ``policy.generate`` call for
    every unfinished trajectory (including those retrying after malformed output). Returns one trajectory per job,
    in order. Raises ``ValueError`` only for bad jobs (image, targets, initial masks), never for model output."""
    config = config or AgentConfig()
    prompts = prompts or load_prompts()
    envs = [make_env(policy, job, config, prompts) for job in jobs]
    started = [time.perf_counter()] * len(envs)
    for i, env in enumerate(envs):
        started[i] = time.perf_counter()
        env.reset()
    while True:
        if config.time_limit is not None:
            now = time.perf_counter()
            for env, t0 in zip(envs, started):
                if not env.done and now - t0 >= config.time_limit:
                    env.stop("time_limit")
        active = [env for env in envs if not env.done]
        if not active:
            break
        requests = [env.observation.request for env in active]
        start = time.perf_counter()
        options = _call_options(config, [t0 for env, t0 in zip(envs, started) if not env.done])
        try:
            generations = policy.generate(requests, options)
            if len(generations) != len(requests):
                raise PolicyError(f"policy {getattr(policy, 'name', type(policy).__name__)} returned "
                                  f"{len(generations)} replies for {len(requests)} requests")
        except PolicyError as exc:
            # a call cut by the time limit's deadline is the time limit, not a failing backend; the deadline is the
            # earliest-started trajectory's, so a batch cut by it stops with the time limit as a whole (a trajectory
            # started a few milliseconds later has not reached its own limit yet)
            deadline = options.deadline
            cut = config.time_limit is not None and deadline is not None and time.monotonic() >= deadline
            now = time.perf_counter()
            for env, t0 in zip(envs, started):
                if not env.done:
                    out_of_time = config.time_limit is not None and (cut or now - t0 >= config.time_limit)
                    env.stop("time_limit" if out_of_time else "policy_error", str(exc))
            continue
        wall = time.perf_counter() - start
        for env, generation in zip(active, generations, strict=True):
            env.step(generation.text, timings=StepTimings(policy=wall, prefill=generation.prefill_seconds,
                                                          decode=generation.decode_seconds))
    return [env.trajectory() for env in envs]


def _call_options(config: AgentConfig, started: Sequence[float]) -> GenerationOptions:
    """``config.options`` with a deadline at the earliest time limit of the active trajectories (``started``: their
    start times, ``time.perf_counter``), so that the time limit also bounds a policy call in progress (policies that
    honour :attr:`GenerationOptions.deadline`)."""
    if config.time_limit is None:
        return config.options
    left = min(config.time_limit - (time.perf_counter() - t0) for t0 in started)
    return replace(config.options, deadline=time.monotonic() + max(0.0, left))


__all__ = [
    "IMAGE_RESAMPLING", "AgentClick", "AgentConfig", "AgentJob", "AgentState", "AgentStep", "AgentTrajectory",
    "HistoryMode", "StepTimings", "StopReason", "TargetState", "absent_targets", "make_env", "policy_grid",
    "resize_image", "resize_mask", "run_agent", "run_agents",
]
