#!/usr/bin/env bash
# Set up a virtual environment (once) and run the test suite.  Usage: bash test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
exec .venv/bin/python -m pytest -q "$@" tests
