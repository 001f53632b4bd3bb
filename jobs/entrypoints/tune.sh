#!/usr/bin/env bash
# Run a Ray Tune sweep as a Ray job on the cluster it is submitted to:
#   ray job submit --address http://localhost:8265 --working-dir . \
#     --entrypoint-resources '{"driver": 1}' -- bash jobs/entrypoints/tune.sh CONFIG [--set KEY=VALUE ...] [--resume]
# --resume continues the study of CONFIG (same run.name) where it stopped. Guide: docs/tune.md.
# Inside a Ray job, --address auto joins the job's own cluster; a later --address wins.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash jobs/entrypoints/tune.sh CONFIG [--set KEY=VALUE ...] [--resume]" >&2
  exit 2
fi
exec python -m ray_app tune --address auto "$@"
