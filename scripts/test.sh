#!/usr/bin/env bash
# Run every check of ecloud: ruff, mypy and the whole pytest suite.
#
#   scripts/test.sh [PYTEST ARGS...]      e.g. scripts/test.sh -x tests/unit
#
# Works from a clean clone on Debian 12. As root it first installs what the
# integration tests use (sshd, PostgreSQL, podman with runc, busybox-static),
# only the packages that are missing, and configures podman
# (scripts/setup-podman.sh). Not as root it skips that, and the tests that need
# those programs skip themselves with a reason.
#
# Then it makes .venv (when missing) and installs the package with its test
# extra. The install is skipped when pyproject.toml has not changed since the
# last one (the package is installed in editable mode, so code changes need no
# reinstall); set ECLOUD_REINSTALL=1 to force it.
#
# Exits non-zero when any check fails; pytest collecting no test is a failure.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
VENV=$ROOT/.venv
APT_PACKAGES=(openssh-server postgresql podman runc busybox-static uidmap iproute2 python3 python3-venv chromium rabbitmq-server redis-server parallel)

say() { printf 'test.sh: %s\n' "$*" >&2; }

missing_packages() {
    local pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            printf '%s\n' "$pkg"
        fi
    done
}

install_system_packages() {
    if ! command -v dpkg-query >/dev/null 2>&1; then
        say "not a Debian system: install ${APT_PACKAGES[*]} yourself"
        return
    fi
    local missing log
    mapfile -t missing < <(missing_packages)
    if [[ $(id -u) -ne 0 ]]; then
        say "not root: skipping apt-get and scripts/setup-podman.sh"
        if ((${#missing[@]})); then
            say "missing packages (their tests will skip): ${missing[*]}"
        fi
        return
    fi
    if ((${#missing[@]})); then
        say "installing ${missing[*]} (apt-get)"
        log=$(mktemp)
        export DEBIAN_FRONTEND=noninteractive
        if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
                -o Dpkg::Use-Pty=0 "${missing[@]}"; } >"$log" 2>&1; then
            tail -n 30 "$log" >&2
            rm -f "$log"
            say "apt-get failed"
            exit 1
        fi
        rm -f "$log"
    fi
    "$ROOT/scripts/setup-podman.sh"
}

install_python_package() {
    if [[ ! -x $VENV/bin/python ]]; then
        say "creating $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp=$VENV/.ecloud-installed-test want
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [[ ${ECLOUD_REINSTALL:-0} != 1 && -f $stamp && $(cat "$stamp") == "$want" ]]; then
        return
    fi
    say "pip install -e .[test,bench]"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test,bench]"
    printf '%s\n' "$want" >"$stamp"
}

install_system_packages
install_python_package

# Tests and their subprocesses find `boss`, `worker`, ruff, mypy here.
export PATH="$VENV/bin:$PATH"

failed=()
step() {
    local name=$1 rc=0
    shift
    say "== $name"
    "$@" || rc=$?
    if ((rc == 5)) && [[ $name == pytest ]]; then
        say "pytest collected no tests: that is a failure"
    fi
    if ((rc != 0)); then
        failed+=("$name (exit $rc)")
    fi
}

step ruff ruff check .
step mypy mypy
step pytest pytest "$@"

if ((${#failed[@]})); then
    say "FAILED: ${failed[*]}"
    exit 1
fi
say "all checks passed"
