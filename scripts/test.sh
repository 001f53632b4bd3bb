#!/usr/bin/env bash
# Runs the test suite. The multi-node drill (tests/test_cluster.py: its own `ray start`
# cluster of three nodes) spends most of its time waiting on node starts and Ray's failure
# detection, so it runs beside the other tests, each with its own Ray cluster and temp
# folder; its output follows theirs. Exit status: non-zero when either run fails.
set -uo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
.venv/bin/python -m pytest -q -p no:cacheprovider --basetemp="$work/tmp" tests/test_cluster.py \
  >"$work/cluster.log" 2>&1 &
drill=$!
.venv/bin/python -m pytest -q -p no:cacheprovider --ignore=tests/test_cluster.py
rest=$?
wait "$drill"
cluster=$?
echo "=== tests/test_cluster.py (ran beside the tests above) ==="
cat "$work/cluster.log"
rm -rf "$work"
exit $(( rest != 0 || cluster != 0 ))
