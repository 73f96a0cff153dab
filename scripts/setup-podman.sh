#!/usr/bin/env bash
# Make rootful podman usable on this kind of host (Debian 12, cgroups v1 hybrid).
#
# podman 4.3 with its default crun fails here ("cgroups in hybrid mode not
# supported"); workers therefore run it with `--runtime runc` (the default of
# [worker] container_args), and containers.conf needs two keys:
#   [containers] default_ulimits = []       (the default ulimits are refused)
#   [engine]     cgroup_manager = "cgroupfs" (there is no systemd to ask)
#
# Idempotent: creates the file or patches the two keys in place, keeping every
# other line. Run as root. Exits 0 with a message when podman is not installed.
set -euo pipefail

CONF="${CONTAINERS_CONF_PATH:-/etc/containers/containers.conf}"

if ! command -v podman >/dev/null 2>&1; then
    echo "setup-podman: podman is not installed; nothing to do (apt-get install podman runc)" >&2
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "setup-podman: run as root (it edits $CONF)" >&2
    exit 1
fi

mkdir -p "$(dirname "$CONF")"
touch "$CONF"

# set_key SECTION KEY VALUE: replace KEY inside [SECTION], or add it right after
# the section header, or append the section when it is missing.
set_key() {
    local section=$1 key=$2 value=$3 tmp
    tmp=$(mktemp "$CONF.XXXXXX")
    awk -v section="$section" -v key="$key" -v value="$value" '
        function flush() { if (in_section && !done) { print key " = " value; done = 1 } }
        /^[[:space:]]*\[[^]]*\][[:space:]]*$/ {
            flush()
            name = $0; gsub(/^[[:space:]]*\[|\][[:space:]]*$/, "", name)
            in_section = (name == section)
            print; next
        }
        in_section && $0 ~ "^[[:space:]]*#?[[:space:]]*" key "[[:space:]]*=" {
            if (!done) { print key " = " value; done = 1 }
            next
        }
        { print }
        END {
            flush()
            if (!done) { if (NR > 0) print ""; print "[" section "]"; print key " = " value }
        }
    ' "$CONF" >"$tmp"
    chmod 644 "$tmp"
    mv "$tmp" "$CONF"
}

set_key containers default_ulimits "[]"
set_key engine cgroup_manager '"cgroupfs"'

echo "setup-podman: $CONF has default_ulimits = [] and cgroup_manager = \"cgroupfs\"" >&2
