"""Models with keys owned by protocols: a point's ``modbus:``, a device entry's ``opcua:``.

The profile schema and the agent config never name a protocol. A key that a registered
protocol owns is split off the input, validated by that protocol's model (its errors
keep their place, e.g. ``points.3.modbus.table``), and kept as a typed *part*:
``obj.part("modbus")``, or ``obj.modbus`` for short. Dumping puts the parts back under
their keys, so a dumped model validates again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ModelWrapValidatorHandler,
    PrivateAttr,
    SerializationInfo,
    ValidationError,
    model_serializer,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError
from pydantic_core.core_schema import ErrorType, SerializerFunctionWrapHandler

from protocols import registry

__all__ = ["ProtocolParts", "validate_parts"]

_Kind = Literal["address", "settings", "connection"]
_ERROR_TYPES = frozenset(get_args(ErrorType))


def _details(err: ErrorDetails, prefix: tuple[str, ...] = ()) -> InitErrorDetails:
    """One reported error again, under ``prefix``, to merge several validations' findings."""
    loc = (*prefix, *err["loc"])
    if err["type"] in _ERROR_TYPES:
        return InitErrorDetails(
            type=err["type"],
            loc=loc,
            input=err["input"],
            ctx=err.get("ctx", {}),
        )
    return InitErrorDetails(
        type=PydanticCustomError(err["type"], err["msg"]), loc=loc, input=err["input"]
    )


def _protocol_parts(
    data: dict[str, Any], kind: _Kind, declared: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, BaseModel], list[InitErrorDetails]]:
    """Split the keys owned by a registered protocol off ``data`` and validate each one."""
    rest: dict[str, Any] = {}
    parts: dict[str, BaseModel] = {}
    errors: list[InitErrorDetails] = []
    known = registry.names()
    for key, value in data.items():
        if key in declared or key not in known:
            rest[key] = value  # an unknown key stays for extra="forbid" to report
            continue
        model = getattr(registry.get(key), kind)
        if model is None:
            rest[key] = value
            continue
        try:
            parts[key] = model.model_validate(value)
        except ValidationError as exc:
            errors.extend(_details(e, (key,)) for e in exc.errors())
    return rest, parts, errors


def validate_parts(
    cls: type[ProtocolParts],
    data: Any,
    handler: ModelWrapValidatorHandler[Any],
    kind: _Kind,
    after: Callable[[Any], list[str]] | None = None,
) -> Any:
    """Validate ``data`` as ``cls`` with the keys named after protocols as typed parts.

    ``kind`` says which model of each protocol's spec validates its key; ``after`` runs
    on the built object and returns problems raised together as one ValueError.
    """
    if not isinstance(data, dict):
        return handler(data)
    rest, parts, errors = _protocol_parts(data, kind, cls.model_fields)
    try:
        obj = handler(rest)
    except ValidationError as exc:
        if not errors:
            raise
        errors = [_details(e) for e in exc.errors()] + errors
        raise ValidationError.from_exception_data(cls.__name__, errors) from None
    if errors:
        raise ValidationError.from_exception_data(cls.__name__, errors)
    obj.__pydantic_private__["_parts"] = parts
    if after is not None:
        found = after(obj)
        if found:
            raise ValueError("; ".join(found))
    return obj


class ProtocolParts(BaseModel):
    """A model with typed parts owned by protocols, each under the protocol's name."""

    _parts: dict[str, BaseModel] = PrivateAttr(default_factory=dict)

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Any:
        out = handler(self)
        if isinstance(out, dict):
            for key, part in self._parts.items():
                out[key] = part.model_dump(mode=info.mode, exclude_none=info.exclude_none)
        return out

    def __getattr__(self, name: str) -> Any:
        """``point.modbus``, ``profile.opcua``: the part a protocol owns, or None."""
        if not name.startswith("_") and name in registry.names():
            return self._parts.get(name)
        return super().__getattr__(name)  # type: ignore[misc]

    def part(self, protocol: str) -> BaseModel | None:
        """What this object gives under ``protocol``'s key, if anything."""
        return self._parts.get(protocol)

    @property
    def parts(self) -> Mapping[str, BaseModel]:
        """Every protocol-owned part, by protocol name."""
        return dict(self._parts)
