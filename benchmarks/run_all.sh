#!/usr/bin/env bash
# Run every synthmed benchmark with its small defaults (see benchmarks/README.md).
# Usage: benchmarks/run_all.sh [--only synthesis memory ...]
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_ALBUMENTATIONS_UPDATE=1
exec "${PYTHON:-python}" -m benchmarks.run_all "$@"
