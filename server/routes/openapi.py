"""What /openapi.json says a route answers besides its success: every error is an OpenAI error
object (`ErrorBody`), whatever its status, so clients generated from the schema parse them all.

`api_errors(...)` is a route decorator's `responses=`: the statuses the route itself can answer,
plus those every API route can (401 with an API key set, 500). Litestar would otherwise document
400 as its own `{status_code, detail}`, which this server never sends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
from litestar._openapi.schema_generation.plugins import StructSchemaPlugin
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Schema
from litestar.typing import FieldDefinition

from server.schemas.common import ErrorBody

if TYPE_CHECKING:
    from litestar._openapi.schema_generation import SchemaCreator

_WHAT = {
    400: "Invalid request: `param` names the field at fault",
    401: "Missing or wrong API key (only when the server has one)",
    404: "No such object (model, adapter, file, job) or route",
    409: "Conflicts with the object's state (e.g. a finished job, a name in use)",
    413: "Request body over `--max-body-mb` (JSON) or `--max-upload-mb` (uploads)",
    415: "Body in a media type the route does not take",
    429: "Request queue full: retry after `Retry-After` seconds",
    500: "Server error: the server log has the details",
    503: "The model is loading, failed to load, or the server is shutting down",
}
# A request body in JSON can be malformed (400), too large (413) or not JSON (415).
JSON_BODY = (400, 413, 415)


def errors(*statuses: int) -> dict[int, ResponseSpec]:
    """`responses=` documenting `statuses` as OpenAI error objects."""
    return {
        status: ResponseSpec(ErrorBody, description=_WHAT[status], generate_examples=False)
        for status in sorted(set(statuses))
    }


def api_errors(*statuses: int) -> dict[int, ResponseSpec]:
    """`responses=` for a /v1 route: `statuses`, plus what any of them can answer: 400 (a bad
    path or query parameter, a malformed header), 401 (API key) and 500."""
    return errors(*statuses, 400, 401, 500)


@dataclass
class StreamingOperation(Operation):
    """A completion route's 200: one JSON object, or with `stream: true` server-sent events.

    Each event is documented as OpenAPI 3.2 describes SSE items (an object whose `data` is a
    string); the chunk shapes themselves are left to the description, since OpenAPI 3.1 has no
    way to say "this string holds that JSON" that clients and validators agree on.
    """

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse) and ok.content is not None:
            event = Schema(
                type=OpenAPIType.OBJECT,
                required=["data"],
                properties={
                    "data": Schema(
                        type=OpenAPIType.STRING,
                        description="one chunk as JSON (the response's shape, with `delta` for "
                        "chat), an OpenAI error object if generation fails mid-stream, then "
                        "`[DONE]`",
                    ),
                    "event": Schema(type=OpenAPIType.STRING),
                    "id": Schema(type=OpenAPIType.STRING),
                    "retry": Schema(type=OpenAPIType.INTEGER),
                },
                description="with `stream: true`: one server-sent event",
            )
            ok.content["text/event-stream"] = OpenAPIMediaType(schema=event)


class ClosedStructSchemaPlugin(StructSchemaPlugin):
    """Litestar's Struct schemas, plus `additionalProperties: false` for a Struct that forbids
    unknown fields (every request body): the server answers 400 naming such a field, and the
    schema says so, rather than promising that extra fields are ignored."""

    def to_openapi_schema(
        self, field_definition: FieldDefinition, schema_creator: SchemaCreator
    ) -> Schema:
        schema = super().to_openapi_schema(field_definition, schema_creator)
        info = msgspec.inspect.type_info(field_definition.type_)
        if isinstance(info, msgspec.inspect.StructType) and info.forbid_unknown_fields:
            schema.additional_properties = False
        return schema
