#!/usr/bin/env bash
# Quickstart 1: set up, build and run the main job. Extra arguments go to the main job.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
jdlora demo "$@"
