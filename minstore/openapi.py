"""The OpenAPI 3 document of every public route (``GET /openapi.json``)."""

from minstore import __version__


def _error(description):
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _record(description):
    return {
        "description": description,
        "headers": {"ETag": {"schema": {"type": "string"}, "description": "the version, quoted"}},
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Record"}}},
    }


_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/RecordBody"}},
        "application/x-www-form-urlencoded": {"schema": {"$ref": "#/components/schemas/RecordForm"}},
        "multipart/form-data": {"schema": {"$ref": "#/components/schemas/RecordForm"}},
    },
}


def _flag(name, description):
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": {"type": "string", "enum": ["0", "1"]},
    }


_COLLECTION = {
    "name": "collection",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"},
}
_UID = {
    "name": "uid",
    "in": "path",
    "required": True,
    "description": "any non-empty UTF-8 string up to 255 bytes, percent-encoded",
    "schema": {"type": "string", "minLength": 1},
}
_CACHE = _flag("cache", "1: the cache strategy, bounced to the dependants")
_LOCAL = _flag("local", "1: answer from this node's storage only")
_IF_MATCH = {"name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"}}
_IF_NONE_MATCH = {
    "name": "If-None-Match",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
}
_WRITE_ERRORS = {
    "400": _error("bad input, record_exists, or a process rejected the record"),
    "413": _error("the body is over --max-record-size"),
    "415": _error("unsupported content type"),
}


def _base_document():
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "minstore",
            "version": __version__,
            "description": "A small replicated record store with a REST API.",
        },
        "paths": {
            "/": {
                "get": {
                    "summary": "Node info (JSON) or the HTML console (Accept: text/html)",
                    "responses": {
                        "200": {
                            "description": "node info",
                            "content": {
                                "application/json": {"schema": {"type": "object"}},
                                "text/html": {"schema": {"type": "string"}},
                            },
                        }
                    },
                }
            },
            "/_node/health": {
                "get": {
                    "summary": "Liveness",
                    "responses": {
                        "200": {
                            "description": "the node answers",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
            "/_node/status": {
                "get": {
                    "summary": "Node id, version, uptime, record count, peers",
                    "responses": {
                        "200": {
                            "description": "status",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
            "/_node/sync": {
                "post": {
                    "summary": "Compare and synchronise with one peer, or every peer in turn",
                    "parameters": [
                        {
                            "name": "peer",
                            "in": "query",
                            "required": False,
                            "description": "one of the node's peers (http://host:port); none: every peer in turn",
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "both sides hold the newer version of every uid either held;"
                            " per peer: round_trips, metadata_bytes, record_bytes, pulled, pushed, seconds",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        "400": _error("unknown_peer: not one of the node's peers"),
                        "502": _error("sync_failed: a peer did not answer in time or answered nonsense (with peers)"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3 document",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
            "/{collection}/": {
                "parameters": [_COLLECTION],
                "get": {
                    "summary": "List records in uid order",
                    "parameters": [
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                        },
                        {
                            "name": "after",
                            "in": "query",
                            "description": "the cursor from a previous page's next",
                            "schema": {"type": "string"},
                        },
                        {"name": "prefix", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": {
                            "description": "a page of records",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Page"}}},
                        },
                        "400": _error("bad parameters"),
                    },
                },
                "post": {
                    "summary": "Create a record; the uid comes from the body or is generated",
                    "parameters": [_CACHE],
                    "requestBody": _BODY,
                    "responses": dict({"200": _record("the stored record")}, **_WRITE_ERRORS),
                },
            },
            "/{collection}/{uid}": {
                "parameters": [_COLLECTION, _UID],
                "get": {
                    "summary": "Read a record, asking the peers when missing here",
                    "parameters": [_CACHE, _LOCAL, _IF_NONE_MATCH],
                    "responses": {
                        "200": _record("the record"),
                        "304": {"description": "If-None-Match matched"},
                        "404": _error("no node holds the record"),
                        "502": _error("cache=1 and no dependant answered"),
                    },
                },
                "post": {
                    "summary": "Create a record",
                    "parameters": [_CACHE],
                    "requestBody": _BODY,
                    "responses": dict({"200": _record("the stored record")}, **_WRITE_ERRORS),
                },
                "put": {
                    "summary": "Replace a record's value",
                    "parameters": [_CACHE, _IF_MATCH],
                    "requestBody": _BODY,
                    "responses": dict(
                        {
                            "200": _record("the stored record"),
                            "404": _error("no such record"),
                            "412": _error("If-Match failed"),
                        },
                        **_WRITE_ERRORS,
                    ),
                },
                "delete": {
                    "summary": "Delete a record (a tombstone stays)",
                    "parameters": [_CACHE, _LOCAL, _IF_MATCH],
                    "responses": {
                        "200": {
                            "description": "deleted",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Deleted"}}},
                        },
                        "404": _error("no node holds the record"),
                        "412": _error("If-Match failed"),
                    },
                },
            },
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "message"],
                    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
                },
                "Record": {
                    "type": "object",
                    "required": ["uid", "collection", "value", "version", "timestamp", "check_sum", "size"],
                    "properties": {
                        "uid": {"type": "string"},
                        "collection": {"type": "string"},
                        "value": {},
                        "version": {"type": "string"},
                        "timestamp": {"type": "number"},
                        "check_sum": {"type": "string"},
                        "size": {"type": "integer"},
                        "lang": {"type": "string", "nullable": True},
                    },
                    "additionalProperties": True,
                },
                "RecordBody": {
                    "type": "object",
                    "required": ["value"],
                    "properties": {"value": {}, "uid": {"type": "string"}},
                },
                "RecordForm": {
                    "type": "object",
                    "required": ["value"],
                    "properties": {"value": {"type": "string"}, "uid": {"type": "string"}},
                },
                "Page": {
                    "type": "object",
                    "required": ["items", "next"],
                    "properties": {
                        "items": {"type": "array", "items": {"$ref": "#/components/schemas/Record"}},
                        "next": {"type": "string", "nullable": True},
                    },
                },
                "Deleted": {
                    "type": "object",
                    "properties": {
                        "deleted": {"type": "boolean"},
                        "collection": {"type": "string"},
                        "uid": {"type": "string"},
                        "version": {"type": "string"},
                    },
                },
            }
        },
    }


def openapi_document():
    """The document, with the bearer scheme and the 401 and 403 of DESIGN section 7."""
    document = _base_document()
    document["components"]["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "With --tokens: Authorization: Bearer TOKEN, whose scopes "
            "(read:GLOB, write:GLOB, admin) cover the route. Without --tokens the node "
            "answers loopback clients only (403 protected_mode) unless --insecure.",
        }
    }
    document["security"] = [{"bearer": []}]
    for path, operations in document["paths"].items():
        for operation in operations.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue  # the path's parameters
            if path == "/_node/health":
                operation["security"] = []
                continue
            if path == "/":
                operation["security"] = [{"bearer": []}, {}]  # the HTML console is open
            responses = operation["responses"]
            responses.setdefault("401", _error("unauthorized: no token, or not one of --tokens (WWW-Authenticate: Bearer)"))
            responses.setdefault(
                "403",
                _error("forbidden (the token lacks the scope named), protected_mode, or forbidden_origin"),
            )
    return document
