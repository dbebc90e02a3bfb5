"""The agent's prompt wording, kept in one TOML file that users can override key by key.

The defaults live in ``default.toml`` next to this module. :func:`load_prompts` reads them and, when given a path,
a user file whose keys replace the defaults one by one. Every text key is a :meth:`str.format` template whose
placeholders are fixed (:data:`PLACEHOLDERS`): a user file that drops a required placeholder, adds an unknown
one or names an unknown key is rejected with a ``ValueError`` naming the key.
"""

from __future__ import annotations

import string
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

#: The placeholders each text template must contain — exactly these, no others.
PLACEHOLDERS: dict[str, frozenset[str]] = {
    "system": frozenset(),
    "first": frozenset({"instruction"}),
    "first_multi": frozenset({"instruction", "targets"}),
    "refine": frozenset({"instruction"}),
    "refine_multi": frozenset({"instruction", "legend"}),
    "legend_item": frozenset({"colour", "target"}),
    "points": frozenset({"points"}),
    "no_points": frozenset(),
    "repair": frozenset({"message"}),
}
#: Separator between legend items and between target names in a multi-target prompt.
LIST_SEPARATOR = "; "
DEFAULT_FILE = "default.toml"


@dataclass(frozen=True)
class Prompts:
    """The wording of every turn the agent writes.

    Attributes:
        system: the system prompt: the task, the action grammar (relative [0, 1] coordinates, four decimals, one
            action per line, ``Undo``, ``Reset``, ``Terminate`` + ``<answer>``), absent targets, target colours.
        first: first user turn of a single-target request, shown with the image; ``{instruction}``.
        first_multi: first user turn of a multi-target request; ``{instruction}``, ``{targets}`` (names joined).
        refine: user turn after each step, shown with the overlay of the current mask; ``{instruction}``.
        refine_multi: the same for several targets; ``{instruction}``, ``{legend}`` (``legend_item`` per target).
        legend_item: one target's colour in the legend; ``{colour}``, ``{target}``.
        points: the line listing the points placed so far (appended to a refinement turn when the environment lists
            them, :attr:`ibisagent.env.EnvConfig.show_points`); ``{points}`` (the action lines joined).
        no_points: that line when no point is placed.
        repair: user turn after malformed output; ``{message}`` is :func:`ibisagent.protocol.repair_message`.
        colour_names: names of the overlay colours in :data:`ibisagent.render.TARGET_COLOURS` order.
    """

    system: str
    first: str
    first_multi: str
    refine: str
    refine_multi: str
    legend_item: str
    points: str
    no_points: str
    repair: str
    colour_names: tuple[str, ...]

    def first_turn(self, instruction: str, targets: tuple[str, ...]) -> str:
        """Text of the first user turn (shown with the plain image)."""
        if len(targets) > 1:
            return self.first_multi.format(instruction=instruction, targets=LIST_SEPARATOR.join(targets))
        return self.first.format(instruction=instruction)

    def refine_turn(self, instruction: str, targets: tuple[str, ...]) -> str:
        """Text of a refinement user turn (shown with the overlay); lists each target's colour when several."""
        if len(targets) > 1:
            legend = LIST_SEPARATOR.join(
                self.legend_item.format(colour=self.colour(i), target=name) for i, name in enumerate(targets)
            )
            return self.refine_multi.format(instruction=instruction, legend=legend)
        return self.refine.format(instruction=instruction)

    def points_line(self, points: Sequence[str]) -> str:
        """The line listing the points placed so far: ``points`` are action lines
        (:func:`ibisagent.protocol.format_action`), joined with :data:`LIST_SEPARATOR`."""
        return self.points.format(points=LIST_SEPARATOR.join(points)) if points else self.no_points

    def repair_turn(self, message: str) -> str:
        """Text of the repair user turn; ``message`` from :func:`ibisagent.protocol.repair_message`."""
        return self.repair.format(message=message)

    def colour(self, index: int) -> str:
        """Name of the overlay colour of target ``index`` (0-based; colours cycle like the overlay's)."""
        return self.colour_names[index % len(self.colour_names)]


def load_prompts(path: str | Path | None = None) -> Prompts:
    """The default prompts, with the keys of the TOML file at ``path`` (if given) replacing them.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not TOML, names an unknown key, gives a key the wrong type, or a template lacks a
            required placeholder / has an unknown one (the message names the key).
    """
    values = _read_toml(resources.files(__package__).joinpath(DEFAULT_FILE).read_text(encoding="utf-8"), DEFAULT_FILE)
    if path is not None:
        path = Path(path).expanduser()
        values.update(_read_toml(path.read_text(encoding="utf-8"), str(path)))
    return _build(values)


def _read_toml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{origin}: not a valid TOML prompt file ({exc})") from exc
    known = {f.name for f in fields(Prompts)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{origin}: unknown prompt key(s) {', '.join(unknown)}; "
                         f"known keys: {', '.join(sorted(known))}")
    for key, value in data.items():
        if key in PLACEHOLDERS:
            if not isinstance(value, str):
                raise ValueError(f"{origin}: prompt key {key!r} must be a string, got {type(value).__name__}")
            _check_placeholders(key, value, origin)
        elif key == "colour_names":
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"{origin}: prompt key 'colour_names' must be a non-empty list of names")
    return dict(data)


def _check_placeholders(key: str, template: str, origin: str) -> None:
    try:
        found = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"{origin}: prompt key {key!r} is not a valid template ({exc})") from exc
    required = PLACEHOLDERS[key]
    missing, extra = sorted(required - found), sorted(found - required)
    if missing:
        raise ValueError(f"{origin}: prompt key {key!r} lacks placeholder(s) "
                         f"{', '.join('{' + m + '}' for m in missing)}")
    if extra:
        raise ValueError(f"{origin}: prompt key {key!r} has unknown placeholder(s) "
                         f"{', '.join('{' + e + '}' for e in extra)}; allowed: "
                         f"{', '.join('{' + r + '}' for r in sorted(required)) or 'none'}")


def _build(values: dict[str, Any]) -> Prompts:
    missing = [f.name for f in fields(Prompts) if f.name not in values]
    if missing:
        raise ValueError(f"prompt key(s) {', '.join(missing)} missing from the defaults")
    return Prompts(**{**values, "colour_names": tuple(values["colour_names"])})
