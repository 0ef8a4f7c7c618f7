#!/usr/bin/env bash
# Make sure the Debian/Ubuntu packages named on the command line are installed.
# As root: installs the missing ones with apt. Otherwise: names them and fails,
# so nobody is left guessing why a server binary is missing.
#   deploy/system-packages.sh nginx-light redis-server
set -o errexit -o pipefail -o nounset

missing=()
for package in "$@"; do
    if ! dpkg-query --show --showformat='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "missing system packages: ${missing[*]}" >&2
    echo "install them with: sudo apt-get install ${missing[*]}" >&2
    exit 1
fi
echo "installing system packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
