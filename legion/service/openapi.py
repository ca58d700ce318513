"""The OpenAPI schema the ingress serves: FastAPI's, plus the streamed chunks' schemas and bearer
authentication where the replica has API keys."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from legion.service.api import ChatCompletionChunk
from legion.service.security import SecurityPolicy


def openapi_schema(api: FastAPI, security: SecurityPolicy) -> dict:
    """FastAPI's schema, the streamed chunks' schemas, and bearer authentication where this
    replica has API keys."""
    if api.openapi_schema is None:
        schema = get_openapi(
            title=api.title, version=api.version, description=api.description, routes=api.routes
        )
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        chunk = ChatCompletionChunk.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(chunk.pop("$defs", {}))
        schemas[ChatCompletionChunk.__name__] = chunk
        stream = schema["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
        stream["text/event-stream"]["schema"] = {
            "$ref": f"#/components/schemas/{ChatCompletionChunk.__name__}"
        }
        completions = schema["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]
        completions["text/event-stream"]["schema"] = {"$ref": "#/components/schemas/Completion"}
        if security.keys.enabled:
            schema["components"]["securitySchemes"] = {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "An API key."}
            }
            schema["security"] = [{"bearerAuth": []}]
            for public in ("/healthz",):
                for op in schema["paths"].get(public, {}).values():
                    op["security"] = []  # open, for load balancers
        api.openapi_schema = schema
    return api.openapi_schema
