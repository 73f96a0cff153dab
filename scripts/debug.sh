#!/usr/bin/env bash
# ecloud's debug.sh: find out why a worker does not come up.
#
# Not written yet: the worker's startup script and its `worker run` command
# have not landed. When they do, this script will, on the worker machine:
#   1. re-run the worker's startup script with `set -x` tracing, so every step
#      (install, settings, key, start of `worker run`) is shown as it runs;
#   2. print the boss connection check: the SSH connection to the boss machine
#      (host key pinned), the tunnel to the boss's RPC port, and `hello` with the
#      worker's token, each with its result.
set -euo pipefail

cat >&2 <<'MSG'
debug.sh: not available yet. It will re-run a worker's startup script with
`set -x` tracing and print the boss connection check (SSH, tunnel, hello),
once the worker commands exist. Nothing was done.
MSG
exit 0
