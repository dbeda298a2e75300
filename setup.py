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
    package_data={
        "twisted": ["plugins/minstore_plugin.py"],
        "minstore.process": ["data/py3langid-0.4.0-model.npz.xz", "data/py3langid-LICENSE"],
    },
    install_requires=[
        "Twisted>=22.10.0",  # twistd plugin, services, endpoints, twisted.logger
        "klein>=21.8.0",  # the HTTP resource tree
        "treq>=22.1.0",  # every request to a peer, and StubTreq in tests
        "attrs>=21.3.0",  # small value classes
        "zope.interface>=5.0",  # IStorage, IProcess
        "prometheus_client>=0.14.0",  # GET /metrics
        "jsonschema>=4.0",  # the schema process
        # The lang process: py3langid 0.4.0's model ships in minstore/process/data
        # and minstore scores it in pure Python; on CPython 3.10+ py3langid 0.4's
        # numpy scoring is faster (pip has only 0.3, another model, for 3.9).
        "py3langid>=0.4.0,<0.5; python_version >= '3.10' and platform_python_implementation == 'CPython'",
    ],
    extras_require={
        "test": [
            "openapi-spec-validator>=0.5.0",  # checks GET /openapi.json
            # Requests generated from /openapi.json (tests.test_fuzz, bench/fuzz.py).
            "schemathesis>=4.0; python_version >= '3.11'",
        ],
        "tls": ["Twisted[tls]>=22.10.0"],  # https:// peers, --peer-ca, --client-ca (pyOpenSSL, service_identity)
        # --storage postgresql: psycopg 3 (libpq, binary wheel) on CPython; on
        # PyPy psycopg's pure-Python mode fails (PyPy's ctypes), pg8000 works.
        "postgresql": [
            "psycopg[binary]>=3.1; platform_python_implementation == 'CPython'",
            "pg8000>=1.30; platform_python_implementation != 'CPython'",
        ],
    },
    entry_points={},
    zip_safe=False,
)
