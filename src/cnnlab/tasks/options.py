"""A task's prediction options, declared once (``Option``): the predict and eval flags, the
web API's form fields with their OpenAPI schema, and ``Run.predict``/``Run.evaluate``'s
keyword checks are all generated from the declarations in ``cnnlab.tasks.TASKS``.

Light on purpose (no torch): the command line builds its parser from these.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cnnlab.errors import CnnlabError

COMMANDS = ("predict", "eval", "serve")  # where an option can apply


@dataclass(frozen=True)
class Option:
    """One prediction option: ``--NAME`` on the task's ``commands``, a form field of
    ``POST /api/predict`` when ``"serve"`` is among them, a keyword of ``Run.predict`` /
    ``Run.evaluate`` (or of ``load_run`` when ``at_load``)."""

    name: str  # the keyword; the flag is --name with dashes
    type: type  # int, float or bool (a switch, off by default)
    default: Any
    help: str
    commands: tuple[str, ...]
    minimum: float | None = None
    maximum: float | None = None
    # A command whose default differs (detection scores every box for mAP: 0.001 in eval).
    defaults: dict[str, Any] = field(default_factory=dict)
    at_load: bool = False  # changes the loaded model (test-time augmentation), not the call

    def __post_init__(self) -> None:
        unknown = set(self.commands) - set(COMMANDS)
        if unknown or not self.commands:
            raise ValueError(f"{self.name}: commands must be among {COMMANDS}")
        if self.type not in (int, float, bool):
            raise ValueError(f"{self.name}: type must be int, float or bool")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def default_in(self, command: str) -> Any:
        """The value a ``command`` uses when the option is not given."""
        return self.defaults.get(command, self.default)

    def range_text(self) -> str:
        """``"at least 1"``, ``"between 0 and 1"`` or ``""``."""
        low, high = self.minimum, self.maximum
        if low is not None and high is not None:
            return f"between {low:g} and {high:g}"
        if low is not None:
            return f"at least {low:g}"
        return f"at most {high:g}" if high is not None else ""

    def check(self, value: Any) -> Any:
        """``value`` as the option's type, or CnnlabError naming the option and the range."""
        wanted = {int: "a whole number", float: "a number", bool: "true or false"}[self.type]
        if self.type is bool:
            if not isinstance(value, bool):
                raise CnnlabError(f"{self.name} must be {wanted}, got {value!r}")
            return value
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise CnnlabError(f"{self.name} must be {wanted}, got {value!r}")
        if self.type is int and value != int(value):
            raise CnnlabError(f"{self.name} must be {wanted}, got {value!r}")
        value = self.type(value)
        inside = (self.minimum is None or value >= self.minimum) and (
            self.maximum is None or value <= self.maximum
        )
        if not inside:
            raise CnnlabError(f"{self.name} must be {self.range_text() or wanted}, got {value!r}")
        return value

    def parse(self, text: str) -> Any:
        """A command-line value; ValueError says what is wrong in one line."""
        try:
            value = self.type(text)
        except ValueError:
            value = text  # ``check`` names what it should have been
        try:
            return self.check(value)
        except CnnlabError as error:
            raise ValueError(str(error)) from None


def options_for(options: Iterable[Option], command: str) -> list[Option]:
    """The options that apply to ``command``, in declaration order."""
    return [option for option in options if command in option.commands]


def resolve_options(
    options: Sequence[Option], command: str, given: dict[str, Any], task: str
) -> dict[str, Any]:
    """``given`` checked against ``task``'s options for ``command``, with every unset one
    at its default. An option of another task or command is a one-line CnnlabError."""
    known = {option.name: option for option in options_for(options, command)}
    for name in given:
        if name not in known:
            takes = ", ".join(known) or "none"
            raise CnnlabError(
                f"{name} does not apply to {command} of a {task} run (takes: {takes})"
            )
    return {
        name: option.check(given[name])
        if given.get(name) is not None
        else option.default_in(command)
        for name, option in known.items()
    }
