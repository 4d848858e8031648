#!/bin/sh
# Install the pole gateway where deploy/citynode-gateway.service expects it
# (`sudo make install-gateway` on the Pi; README, "Gateway").
#
#   /opt/citynode/                      the program, in a virtualenv of its own
#                                       (Debian's Python is externally managed)
#   /usr/local/bin/citynode-gateway     -> /opt/citynode/bin/citynode-gateway
#   /etc/citynode/gateway.toml          kept if there (edit it: id, upstream)
#   /etc/citynode/registry/             the fleet registry (records 0644: public keys)
#   /etc/citynode/pole-broker.secret    the gateway's pole-broker secret, made once, 0600
#   /etc/mosquitto/conf.d/citynode.conf kept if there (its access-point address)
#   /etc/mosquitto/citynode/acl         the ACL, root:mosquitto 0640
#   /etc/chrony/conf.d/citynode.conf    the nodes' time server (kept if there: its subnet)
#   /etc/systemd/system/citynode-gateway.service
#
# Then it writes the broker's password file and starts both services. Re-running it
# upgrades the program and the unit and keeps the configuration and the secret.
# DESTDIR=DIR stages the whole install under DIR without touching the system (no apt,
# no systemctl; the tests use it). SOURCE is what pip installs (default: this checkout).
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
root=${DESTDIR:-}
source=${SOURCE:-$here}
python=${PYTHON:-python3}
venv=$root/opt/citynode

say() { echo "install-gateway: $*"; }

if [ -z "$root" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        say "run it as root: sudo make install-gateway" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        mosquitto chrony python3-venv
fi

say "the program into $venv"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade "$source[gateway]"
install -d "$root/usr/local/bin"
ln -sfn /opt/citynode/bin/citynode-gateway "$root/usr/local/bin/citynode-gateway"

say "configuration into $root/etc/citynode (an existing gateway.toml is kept)"
install -d -m 0755 "$root/etc/citynode" "$root/etc/citynode/registry"
[ -e "$root/etc/citynode/gateway.toml" ] ||
    install -m 0644 "$here/deploy/gateway.toml" "$root/etc/citynode/gateway.toml"
secret=$root/etc/citynode/pole-broker.secret
if [ ! -e "$secret" ]; then
    say "a new pole-broker secret for the gateway ($secret, 0600)"
    "$venv/bin/python" -c 'import sys; from pathlib import Path
from citynode import pole_broker
pole_broker.write_secret(Path(sys.argv[1]), pole_broker.new_secret())' "$secret"
fi

say "the pole broker's configuration and ACL"
group=root
getent group mosquitto >/dev/null 2>&1 && group=mosquitto
install -d -m 0755 "$root/etc/mosquitto/conf.d"
[ -e "$root/etc/mosquitto/conf.d/citynode.conf" ] ||
    install -m 0644 "$here/deploy/mosquitto.conf" "$root/etc/mosquitto/conf.d/citynode.conf"
install -d -m 0750 -g "$group" "$root/etc/mosquitto/citynode"
install -m 0640 -g "$group" "$here/deploy/mosquitto.acl" "$root/etc/mosquitto/citynode/acl"

say "the nodes' time server (chrony)"
install -d -m 0755 "$root/etc/chrony/conf.d"
[ -e "$root/etc/chrony/conf.d/citynode.conf" ] ||
    install -m 0644 "$here/deploy/chrony.conf" "$root/etc/chrony/conf.d/citynode.conf"

say "the systemd unit (and the README it names as its documentation)"
install -d "$root/usr/share/doc/citynode" "$root/etc/systemd/system"
install -m 0644 "$here/README.md" "$root/usr/share/doc/citynode/README.md"
install -m 0644 "$here/deploy/citynode-gateway.service" \
    "$root/etc/systemd/system/citynode-gateway.service"

if [ -n "$root" ]; then
    say "staged under $root (nothing started)"
    exit 0
fi
/usr/local/bin/citynode-gateway broker-accounts --config /etc/citynode/gateway.toml \
    --out /etc/mosquitto/citynode/passwd
systemctl daemon-reload
systemctl enable mosquitto chrony citynode-gateway
# Mosquitto cannot start while the access point's address in conf.d/citynode.conf is not
# this Pi's (a hotspot other than 10.42.0.1): say what to fix instead of stopping here
systemctl restart mosquitto ||
    say "Mosquitto did not start: put this Pi's access-point address in" \
        "/etc/mosquitto/conf.d/citynode.conf (listener 1883 ADDRESS), then restart it"
systemctl restart chrony || say "chrony did not start: see journalctl -u chrony"
systemctl restart citynode-gateway
say "running; edit /etc/citynode/gateway.toml (id, [upstream]), the access-point address"
say "in /etc/mosquitto/conf.d/citynode.conf and its subnet in /etc/chrony/conf.d/citynode.conf,"
say "then: systemctl restart mosquitto chrony citynode-gateway"
say "status: citynode-gateway status --config /etc/citynode/gateway.toml"
