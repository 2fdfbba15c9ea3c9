"""Does a real answer match what /openapi.json says of it? A small JSON Schema validator for what FastAPI and
pydantic emit ($ref, anyOf, type, enum, const, properties, required, items, additionalProperties, length
bounds), stricter than JSON Schema on one point: an object may carry only the properties its schema names, so
an undocumented (or leaked internal) field fails as surely as a missing one."""

from __future__ import annotations

from typing import Any

REF_PREFIX = "#/components/schemas/"

_TYPES: dict[str, Any] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}
_IGNORED = {"title", "description", "default", "examples"}
_KNOWN = _IGNORED | {"$ref", "anyOf", "type", "enum", "const", "properties", "required", "items",
                     "additionalProperties", "minItems", "maxItems", "minLength", "maxLength"}


def ref(name: str) -> dict[str, Any]:
    """The schema that points at the component `name`."""
    return {"$ref": REF_PREFIX + name}


def problems(value: Any, schema: dict[str, Any], openapi: dict[str, Any], path: str = "$") -> list[str]:
    """Every way `value` departs from `schema` (refs resolved in `openapi`), as 'path: what'; [] when it fits."""
    unknown = set(schema) - _KNOWN
    if unknown:  # a keyword this checker would silently ignore: say so rather than pass
        return [f"{path}: the schema uses {sorted(unknown)}, which this checker does not know"]
    if "$ref" in schema:
        name = schema["$ref"].removeprefix(REF_PREFIX)
        return problems(value, openapi["components"]["schemas"][name], openapi, path)
    if "anyOf" in schema:
        found = [problems(value, option, openapi, path) for option in schema["anyOf"]]
        return [] if any(not f for f in found) else [f"{path}: fits none of anyOf: {found}"]
    if "type" in schema and not _TYPES[schema["type"]](value):
        return [f"{path}: {value!r} is not of type {schema['type']}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {value!r} is not one of {schema['enum']}"]
    if "const" in schema and value != schema["const"]:
        return [f"{path}: {value!r} is not {schema['const']!r}"]
    if isinstance(value, str) and not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
        return [f"{path}: length {len(value)} out of bounds"]
    if isinstance(value, list):
        return _array_problems(value, schema, openapi, path)
    if isinstance(value, dict):
        return _object_problems(value, schema, openapi, path)
    return []


def _array_problems(value: list[Any], schema: dict[str, Any], openapi: dict[str, Any], path: str) -> list[str]:
    if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
        return [f"{path}: {len(value)} items, out of bounds"]
    items = schema.get("items", {})
    return [p for i, item in enumerate(value) for p in problems(item, items, openapi, f"{path}[{i}]")]


def _object_problems(value: dict[str, Any], schema: dict[str, Any], openapi: dict[str, Any], path: str) -> list[str]:
    properties = schema.get("properties", {})
    found = [f"{path}: lacks required {key!r}" for key in schema.get("required", []) if key not in value]
    extra = schema.get("additionalProperties", False)
    for key, item in value.items():
        if key in properties:
            found += problems(item, properties[key], openapi, f"{path}.{key}")
        elif isinstance(extra, dict):
            found += problems(item, extra, openapi, f"{path}.{key}")
        else:
            found.append(f"{path}: {key!r} is not in the schema")
    return found


def assert_fits(value: Any, openapi: dict[str, Any], schema: dict[str, Any]) -> None:
    found = problems(value, schema, openapi)
    assert not found, "\n".join(found[:20])


def response_schema(openapi: dict[str, Any], path: str, method: str, status: int | str,
                    media: str = "application/json") -> dict[str, Any]:
    """What /openapi.json says route `method path` answers with `status`."""
    schema: dict[str, Any] = openapi["paths"][path][method]["responses"][str(status)]["content"][media]["schema"]
    return schema
