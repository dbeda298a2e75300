"""
Requests generated from ``GET /openapi.json`` by schemathesis, valid and
invalid, sent to a node in memory (L{tests.fuzzing}): none may get a 5xx,
and every answer's status code and content type must be declared in the
document.  ``bench/fuzz.py`` runs the same for a time budget.
"""

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.fuzzing import run

try:
    import schemathesis  # noqa: F401  (Python 3.11+: the test extra installs it there)
except ImportError:
    schemathesis = None

#: Examples per operation and generation mode: ~20 s on the project's machine.
EXAMPLES = 60


class OpenAPIFuzzTests(SynchronousTestCase):
    def test_generated_requests(self):
        """No 5xx and nothing undeclared, for every operation of the document."""
        if schemathesis is None:
            raise SkipTest("schemathesis needs Python 3.11+")
        failures, sent = run(max_examples=EXAMPLES, report=lambda text: None)
        self.assertEqual(failures, [], "\n\n".join("%s: %s" % f for f in failures))
        self.assertGreater(sent, 400)

    def test_limits_declared_like_the_api(self):
        """The document states the limits the API applies."""
        import minstore.api as api
        import minstore.openapi as openapi

        for name in ("MAX_JSON_DEPTH", "MAX_REQUEST_LINE", "MAX_HEADER_BYTES", "MAX_HEADERS"):
            self.assertEqual(getattr(openapi, name), getattr(api, name), name)
