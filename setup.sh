#!/usr/bin/env bash
# Set up image-proxy on a fresh Debian machine.
#   ./setup.sh          the daemon and its Python dependencies, in .venv/
#   ./setup.sh --test   also the test tools: pytest & co. in .venv/, Debian skopeo, docker-registry, nginx and prometheus
set -euo pipefail
cd "$(dirname "$0")"

with_tests=false
[ "${1:-}" = "--test" ] && with_tests=true

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup.sh: Python >= 3.11 is required ($python is $("$python" --version 2>&1))" >&2
    exit 1
fi

if $with_tests; then
    missing=()
    command -v skopeo >/dev/null || missing+=(skopeo)
    command -v docker-registry >/dev/null || missing+=(docker-registry)
    # signature policy: gpgv verifies, gpg + gpg-agent make the throwaway test keys and let skopeo sign
    command -v gpgv >/dev/null || missing+=(gpgv)
    command -v gpg >/dev/null || missing+=(gpg)
    command -v gpg-agent >/dev/null || missing+=(gpg-agent)
    command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
    # tests/metrics: a real Prometheus server scrapes the daemon's /metrics
    command -v prometheus >/dev/null || [ -x /usr/bin/prometheus ] || missing+=(prometheus)
    # tests/fleet: hosts are network namespaces joined by veth pairs (ip netns, ip link)
    command -v ip >/dev/null || [ -x /usr/sbin/ip ] || missing+=(iproute2)
    # daemon mode: systemd-analyze verify on contrib/systemd/, systemd-socket-activate --seqpacket
    { command -v systemd-analyze && command -v systemd-socket-activate; } >/dev/null || missing+=(systemd)
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "$(id -u)" != 0 ]; then
            echo "setup.sh: the tests need ${missing[*]}: run 'sudo apt-get install ${missing[*]}'" >&2
            exit 1
        fi
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
if $with_tests; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
else
    .venv/bin/python -m pip install -q --disable-pip-version-check -e .
fi
# Byte-compile the sources now: an editable install does not, and where PYTHONDONTWRITEBYTECODE is set (as on the
# CI machine) or the tree is read-only, every spawned proxy compiled them again: 307 ms from spawn to the
# Initialize reply without .pyc files, 207 ms with them (median of 15 alternated spawns).
.venv/bin/python -m compileall -q -j 0 proxy protocol >/dev/null
