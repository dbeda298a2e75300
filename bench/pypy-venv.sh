#!/bin/sh
# Make a PyPy virtualenv with minstore (from this checkout) and everything it
# needs, for `bench/run.py --python VENV/bin/python` or `--compare-pypy`.
#
#   sh bench/pypy-venv.sh [VENV]        (default: /tmp/pypy-venv)
#
# Needs Debian's pypy3 and pypy3-venv (apt-get install pypy3 pypy3-venv).
# Every dependency of minstore installs from a wheel on PyPy 3.9 (Debian 12's
# pypy3 7.3.11), no compiler needed: rpds-py 0.27.1 has a pp39 wheel,
# cryptography 43.0.3 (via pyOpenSSL, for treq) too; prometheus_client,
# klein, treq, Twisted 25.5 are pure Python.  pip picks the newest release
# whose requires-python admits 3.9.  No numpy, no py3langid: on PyPy the lang
# process scores the py3langid 0.4.0 model minstore ships in pure Python.
set -eu

VENV=${1:-/tmp/pypy-venv}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PYPY=${PYPY:-pypy3}

if ! command -v "$PYPY" >/dev/null 2>&1; then
    echo "pypy-venv.sh: no $PYPY on PATH (apt-get install pypy3 pypy3-venv)" >&2
    exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYPY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
# --only-binary for the compiled dependencies: fail loudly rather than start a
# long source build; drop it (PYPY_ALLOW_BUILD=1) to allow building them.
if [ "${PYPY_ALLOW_BUILD:-0}" = 1 ]; then
    BINARY=""
else
    BINARY="--only-binary=numpy,rpds-py,cffi,cryptography"
fi
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install $BINARY "$HERE"

# Smoke test: every import the node makes, and the lang model loads (from the
# installed copy: run it outside the checkout) and scores without numpy.
cd /
"$VENV/bin/python" - <<'EOF'
import platform, sys
from importlib.metadata import version
import jsonschema, rpds, prometheus_client, klein, treq, twisted
from minstore.process.lang import _get_identifier, detect_language
assert detect_language("the quick brown fox jumps over the lazy dog") == "en"
print("%s %s: %s: imports ok, lang ok (%s%s)" % (
    platform.python_implementation(), platform.python_version(),
    ", ".join("%s %s" % (n, version(n)) for n in (
        "jsonschema", "rpds-py", "prometheus_client", "klein", "treq", "Twisted")),
    type(_get_identifier()).__name__, ", numpy imported" if "numpy" in sys.modules else ", no numpy"))
EOF
echo "PyPy venv ready: $VENV/bin/python"
