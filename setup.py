from setuptools import find_packages, setup

from minstore import __version__  # noqa: E402  (a plain module: no imports of its own)

setup(
    name="minstore",
    version=__version__,
    description="A small replicated record store with a REST API, on Twisted.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["minstore", "minstore.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/minstore_plugin.py"]},
    install_requires=[
        "Twisted>=22.10.0",  # twistd plugin, services, endpoints, twisted.logger
        "klein>=21.8.0",  # the HTTP resource tree
        "treq>=22.1.0",  # every request to a peer, and StubTreq in tests
        "attrs>=21.3.0",  # small value classes
        "zope.interface>=5.0",  # IStorage, IProcess
        "prometheus_client>=0.14.0",  # GET /metrics
        "jsonschema>=4.0",  # the schema process
        "py3langid>=0.3.0",  # the lang process (0.3 on Python 3.9, 0.4 on 3.10+)
    ],
    extras_require={
        "test": [
            "openapi-spec-validator>=0.5.0",  # checks GET /openapi.json
            # Requests generated from /openapi.json (tests.test_fuzz, bench/fuzz.py).
            "schemathesis>=4.0; python_version >= '3.11'",
        ],
    },
    entry_points={},
    zip_safe=False,
)
