"""
``schema``: validate a record's value against the JSON Schema of its
collection, read at start from ``--schemas DIR/{collection}.json``.
"""

import json
import os

import jsonschema
from zope.interface import implementer

from minstore.errors import BadRequest
from minstore.interfaces import IProcess


class SchemaError(ValueError):
    """A schema file that cannot be used; the message names the file."""


class SchemaViolation(BadRequest):
    error = "schema_violation"


def json_path(path):
    out = "$"
    for part in path:
        out += "[%d]" % part if isinstance(part, int) else ".%s" % part
    return out


def load_schemas(directory):
    """{collection: validator} for every ``*.json`` file of the directory."""
    validators = {}
    if not directory:
        return validators
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".json"):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                schema = json.loads(f.read())
            cls = jsonschema.validators.validator_for(schema)
            cls.check_schema(schema)
        except (OSError, ValueError) as e:
            raise SchemaError("%s: not a JSON document: %s" % (path, e))
        except jsonschema.SchemaError as e:
            raise SchemaError("%s: not a valid JSON Schema: %s" % (path, e.message))
        validators[name[: -len(".json")]] = cls(schema)
    return validators


@implementer(IProcess)
class SchemaValidation:
    name = "schema"
    #: Validation is CPU and thread-safe: after lang, it runs in the
    #: writer thread with the rest of the batch (see L{minstore.node}).
    threaded = True

    def __init__(self, options=None):
        self.validators = load_schemas((options or {}).get("schemas"))

    def __call__(self, record):
        validator = self.validators.get(record["collection"])
        if validator is not None:
            error = jsonschema.exceptions.best_match(validator.iter_errors(record["value"]))
            if error is not None:
                raise SchemaViolation(
                    message="value does not match the schema of %r at %s: %s"
                    % (record["collection"], json_path(error.absolute_path), error.message)
                )
        return record
