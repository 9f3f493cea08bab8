#!/usr/bin/env bash
# The test command: installs what is missing and builds (scripts/setup.sh), then runs every test
# with ctest. Arguments are passed to ctest, e.g. `scripts/test.sh -R Journal` or `-L fault`.
# Exits with ctest's status.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh

echo "test: ctest --test-dir build --output-on-failure -j2 --timeout 300${*:+ $*}"
start=$(date +%s)
rc=0
ctest --test-dir build --output-on-failure -j2 --timeout 300 "$@" || rc=$?
echo "ctest took $(($(date +%s) - start)) s"
exit "$rc"
