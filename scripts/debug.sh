#!/usr/bin/env bash
# ecloud's debug.sh: find out why a worker does not come up.
#
# Not written yet: it needs the worker startup script (run on a VM's boot),
# which has not landed. When it does, this script will, on the worker machine:
#   1. re-run the worker's startup script with `set -x` tracing, so every step
#      (install, settings, key, start of `worker run`) is shown as it runs;
#   2. print the boss connection check (`worker check`: SSH connection with the
#      boss's host key pinned, tunnel to the RPC port, hello with the token).
set -euo pipefail

cat >&2 <<'MSG'
debug.sh: not available yet (there is no worker startup script to re-run).
It will re-run a worker's startup script with `set -x` tracing and print the
boss connection check. The check alone already exists:
    worker check --boss URL --token-file FILE [--key KEY --known-hosts FILE]
Nothing was done.
MSG
exit 0
