"""CLI options generated from pydantic models: each setting is declared once, as a field.

``@with_options(Group(ScanSettings, "settings", "scan setting"))`` gives a command one option
per field (``max_units`` -> ``--max-units``, its default and its description as help) and
calls it with ``settings=ScanSettings(...)`` built from them. A bad value is a one-line error
naming the flag.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from memaudit.errors import MemauditError, first_problem


@dataclass(frozen=True)
class Group:
    """The fields of ``model`` as options; the command's parameter ``param`` gets the model."""

    model: type[BaseModel]
    param: str
    what: str  # in messages: "invalid {what} ..."
    skip: tuple[str, ...] = ()
    flags: Mapping[str, str] = field(default_factory=dict)  # field -> flag, e.g. "--method"
    notes: Mapping[str, str] = field(default_factory=dict)  # field -> more help, e.g. choices

    def fields(self) -> list[tuple[str, FieldInfo]]:
        return [(n, f) for n, f in self.model.model_fields.items() if n not in self.skip]

    def flag(self, name: str) -> str:
        return self.flags.get(name, "--" + name.replace("_", "-"))

    def parameters(self) -> list[inspect.Parameter]:
        return [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=info.get_default(call_default_factory=True),
                annotation=self._annotation(name, info),
            )
            for name, info in self.fields()
        ]

    def build(self, values: dict[str, Any]) -> BaseModel:
        """The model from the options' values (taken out of ``values``); flag-named errors."""
        given = {name: values.pop(name) for name, _ in self.fields()}
        try:
            return self.model.model_validate(given)
        except ValidationError as err:
            loc, what = first_problem(err)
            where = self.flag(loc[0]) if loc else self.what
            raise MemauditError(f"invalid {self.what} {where}: {what}") from None

    def _annotation(self, name: str, info: FieldInfo) -> Any:
        kind, choices = _cli_type(info.annotation)
        help_text = (info.description or "").rstrip(".")
        if choices:
            help_text += f" (one of: {', '.join(choices)})"
        if name in self.notes:
            help_text += f" ({self.notes[name]})"
        flag = self.flag(name)
        decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
        return Annotated[kind, typer.Option(*decls, help=help_text or None)]


def _cli_type(annotation: Any) -> tuple[Any, list[str]]:
    """The type typer parses for a field (Literals become str) and the Literal's choices."""
    origin = get_origin(annotation)
    if origin is Literal:
        return str, [str(a) for a in get_args(annotation)]
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(annotation) if a is not type(None)]
        kind, choices = _cli_type(inner[0]) if len(inner) == 1 else (str, [])
        return kind | None, choices
    return annotation, []


def with_options(*groups: Group) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Replace a command's parameters named by ``groups`` with the groups' options."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(command, include_extras=True)
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in inspect.signature(command).parameters.values()
            if p.name not in {g.param for g in groups}
        ]
        params = [*own, *(p for g in groups for p in g.parameters())]

        @functools.wraps(command)
        def run(**values: Any) -> Any:
            for group in groups:
                values[group.param] = group.build(values)
            return command(**values)

        del run.__wrapped__  # typer must read the new signature, not the command's
        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return decorate
