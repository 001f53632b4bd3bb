#!/usr/bin/env bash
# Read, validate and tokenize the data as a Ray job on the cluster it is submitted to:
#   ray job submit --address http://localhost:8265 --working-dir . \
#     --entrypoint-resources '{"driver": 1}' -- bash jobs/entrypoints/data.sh CONFIG [--set KEY=VALUE ...]
# Inside a Ray job, --address auto joins the job's own cluster; a later --address wins.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash jobs/entrypoints/data.sh CONFIG [--set KEY=VALUE ...]" >&2
  exit 2
fi
exec python -m ray_app data --address auto "$@"
