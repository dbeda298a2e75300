"""
The OpenAPI 3 document of every public route (``GET /openapi.json``): every
status code and content type each route can answer is declared
(``tests.test_fuzz`` checks it against generated requests).
"""

from minstore import __version__

#: Kept equal to minstore.api's limits (not imported: api imports this module).
MAX_JSON_DEPTH = 100
MAX_REQUEST_LINE = 16 * 1024
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 100


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
_CACHE = _flag(
    "cache",
    "1: the cache strategy, bounced to the dependants; 400 no_dependants on a node without any",
)
_LOCAL = _flag("local", "1: answer from this node's storage only")
_IF_MATCH = {"name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"}}
_IF_NONE_MATCH = {
    "name": "If-None-Match",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
}
#: What any route may answer before it is even reached.
_ANY = {
    "414": _error("uri_too_long: the request line is over %d bytes" % MAX_REQUEST_LINE),
    "431": _error(
        "headers_too_large: the headers are over %d bytes or %d lines" % (MAX_HEADER_BYTES, MAX_HEADERS)
    ),
}
_SYNC = _flag("sync", "1: answer once every peer stored the write, or --sync-timeout passed")
_BAD_PATH = "bad_path (an empty segment, not UTF-8), bad_collection, bad_uid"
_CACHE_ERRORS = {
    "502": _error("cache=1: no dependant could answer (bad_gateway)"),
}
_WRITE_ERRORS = dict(
    {
        "400": _error(
            "bad input (%s, invalid_json, a JSON body nested over %d deep, missing_value, uid_mismatch), "
            "record_exists, a process rejected the record, or cache=1 without dependants (no_dependants)"
            % (_BAD_PATH, MAX_JSON_DEPTH)
        ),
        "413": _error("the body is over --max-record-size"),
        "415": _error("unsupported content type"),
        "503": _error("the node is stopping (unavailable)"),
        "507": _error("the node's disk is full (insufficient_storage)"),
    },
    **_CACHE_ERRORS,
)


def _responses(*parts, **codes):
    """The responses of an operation: ``codes`` and ``parts``, and L{_ANY}."""
    merged = {}
    for part in parts:
        merged.update(part)
    merged.update((code.lstrip("_"), value) for code, value in codes.items())
    merged.update(_ANY)
    return dict(sorted(merged.items()))


def _json_ok(description, schema=None):
    return {
        "description": description,
        "content": {"application/json": {"schema": schema or {"type": "object"}}},
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
                    "summary": "Node info (JSON) or the HTML console (Accept: text/html); Vary: Accept",
                    "parameters": [
                        _flag("cache", "1: the collections are a dependant's (a front stores nothing)")
                    ],
                    "responses": _responses(
                        _CACHE_ERRORS,
                        _200={
                            "description": "node info, or the console",
                            "headers": {"Vary": {"schema": {"type": "string"}, "description": "Accept"}},
                            "content": {
                                "application/json": {"schema": {"type": "object"}},
                                "text/html": {"schema": {"type": "string"}},
                            },
                        },
                        _400=_error("cache=1 on a node without dependants (no_dependants)"),
                    ),
                }
            },
            "/_node/health": {
                "get": {
                    "summary": "Liveness, and whether the storage can be reached",
                    "responses": _responses(
                        _200=_json_ok("the node answers"),
                        _503=_error("the storage cannot be reached (a postgresql engine's database is down)"),
                    ),
                }
            },
            "/_node/status": {
                "get": {
                    "summary": "Node id, version, uptime, record count, peers",
                    "responses": _responses(_200=_json_ok("status")),
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
                    "responses": _responses(
                        _200={
                            "description": "Prometheus text format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    ),
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": _responses(_200=_json_ok("OpenAPI 3 document")),
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
                        _LOCAL,
                        _CACHE,
                    ],
                    "responses": _responses(
                        _CACHE_ERRORS,
                        _200=_json_ok("a page of records", {"$ref": "#/components/schemas/Page"}),
                        _400=_error(
                            "bad parameters (bad_parameter: limit of ASCII digits, 1 to 1000; a bad cursor), "
                            "%s, or cache=1 without dependants (no_dependants)" % _BAD_PATH
                        ),
                    ),
                },
                "post": {
                    "summary": "Create a record; the uid comes from the body or is generated",
                    "parameters": [_CACHE, _SYNC],
                    "requestBody": _BODY,
                    "responses": _responses(_WRITE_ERRORS, _200=_record("the stored record")),
                },
            },
            "/{collection}/{uid}": {
                "parameters": [_COLLECTION, _UID],
                "get": {
                    "summary": "Read a record, asking the peers when missing here",
                    "parameters": [_CACHE, _LOCAL, _IF_NONE_MATCH],
                    "responses": _responses(
                        _CACHE_ERRORS,
                        _200=_record("the record"),
                        _304={"description": "If-None-Match matched"},
                        _400=_error("%s, or cache=1 without dependants (no_dependants)" % _BAD_PATH),
                        _404=_error("no node holds the record"),
                    ),
                },
                "post": {
                    "summary": "Create a record",
                    "parameters": [_CACHE, _SYNC],
                    "requestBody": _BODY,
                    "responses": _responses(_WRITE_ERRORS, _200=_record("the stored record")),
                },
                "put": {
                    "summary": "Replace a record's value",
                    "parameters": [_CACHE, _SYNC, _IF_MATCH],
                    "requestBody": _BODY,
                    "responses": _responses(
                        _WRITE_ERRORS,
                        _200=_record("the stored record"),
                        _404=_error("no such record"),
                        _412=_error("If-Match failed"),
                    ),
                },
                "delete": {
                    "summary": "Delete a record (a tombstone stays)",
                    "parameters": [_CACHE, _LOCAL, _SYNC, _IF_MATCH],
                    "responses": _responses(
                        _CACHE_ERRORS,
                        _200={
                            "description": "deleted",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Deleted"}}},
                        },
                        _400=_error("%s, or cache=1 without dependants (no_dependants)" % _BAD_PATH),
                        _404=_error("no node holds the record"),
                        _412=_error("If-Match failed"),
                        _503=_error("the node is stopping (unavailable)"),
                        _507=_error("the node's disk is full (insufficient_storage)"),
                    ),
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
                    "description": "value: any JSON, arrays and objects nested at most %d deep" % MAX_JSON_DEPTH,
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


def _add_indexes(document, indexes):
    """The filters of a listing (the declared --indexes named) and GET /_changes."""
    listing = document["paths"]["/{collection}/"]["get"]
    declared = ", ".join(str(d) for d in indexes) or "none"
    listing["summary"] = "List records in uid order, or filtered on an indexed field in (value, uid) order"
    listing["description"] = (
        "Filters on one field declared with --indexes (here: %s): FIELD=v (equal), min_FIELD=v (>=), "
        "max_FIELD=v (<=), gt_FIELD=v (>), lt_FIELD=v (<), several operators on one field combined. "
        "v is read as JSON when it parses (1965 a number, \"1965\" a string, true, null), else as a "
        "string; values order null < false < true < numbers < strings < arrays < objects. "
        "Records without the field are not in the index." % declared
    )
    listing["x-minstore-indexes"] = [str(d) for d in indexes]
    parameters = listing["parameters"]
    by_field = {}
    for d in indexes:
        by_field.setdefault(d.field, []).append(d.collection)
    for field, collections in by_field.items():
        where = "every collection" if "*" in collections else ", ".join(collections)
        for prefix, meaning in (("", "equal to"), ("min_", ">="), ("max_", "<="), ("gt_", ">"), ("lt_", "<")):
            parameters.append(
                {
                    "name": prefix + field,
                    "in": "query",
                    "required": False,
                    "description": "records whose %s is %s this value (indexed in %s)" % (field, meaning, where),
                    "schema": {"type": "string"},
                }
            )
    listing["responses"]["400"] = _error("bad parameters, or field_not_indexed (a filter on a field not declared)")
    listing["responses"]["503"] = dict(
        _error("index_building: the field's index is still being built"),
        headers={"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
    )
    document["paths"]["/_changes"] = {
        "get": {
            "summary": "This node's changes after a sequence number, oldest first, each uid once at its newest",
            "description": "Follow it by polling with since = the last answer's last_seq.",
            "parameters": [
                {"name": "since", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0, "default": 0}},
                {
                    "name": "limit",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                },
                dict(_COLLECTION, **{"in": "query", "required": False}),
            ],
            "responses": {
                "200": {
                    "description": "a page of changes",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Changes"}}},
                },
                "400": _error("bad parameters"),
            },
        }
    }
    document["components"]["schemas"]["Changes"] = {
        "type": "object",
        "required": ["changes", "last_seq"],
        "properties": {
            "changes": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["seq", "collection", "uid", "version", "deleted"],
                    "properties": {
                        "seq": {"type": "integer"},
                        "collection": {"type": "string"},
                        "uid": {"type": "string"},
                        "version": {"type": "string"},
                        "deleted": {"type": "boolean"},
                    },
                },
            },
            "last_seq": {"type": "integer", "description": "the since of the next poll"},
        },
    }


def openapi_document(indexes=()):
    """
    The document, with the bearer scheme and the 401 and 403 of DESIGN
    section 7, and the filters of the declared ``indexes``.
    """
    document = _base_document()
    _add_indexes(document, indexes)
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
