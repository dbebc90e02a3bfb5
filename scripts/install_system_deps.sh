#!/usr/bin/env bash
# System packages for the slow PACS test (tests/test_pacs.py): Orthanc and its DICOMweb plugin, from Debian/Ubuntu.
# Idempotent: does nothing when both are installed; runs `apt-get update` only when the package lists are missing or
# stale (no candidate, or the download fails). The test starts its own Orthanc on free loopback ports, so the
# distribution's orthanc service is kept from starting during the install and stopped/disabled afterwards.
# Needs root (or passwordless sudo).
set -euo pipefail

PKGS=(orthanc orthanc-dicomweb)
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "install_system_deps.sh: needs root or sudo" >&2; exit 1; }
    SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }
has_candidate() { apt-cache policy "$1" 2>/dev/null | grep -q 'Candidate: [^(]'; }

stop_service() {
    # Leave no Orthanc daemon on the default ports (8042/4242), whatever the init system.
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
        "${SUDO[@]}" systemctl disable --now orthanc >/dev/null 2>&1 || true
    else
        if command -v service >/dev/null; then "${SUDO[@]}" service orthanc stop >/dev/null 2>&1 || true; fi
        if command -v update-rc.d >/dev/null; then "${SUDO[@]}" update-rc.d orthanc disable >/dev/null 2>&1 || true; fi
    fi
}

missing=()
for p in "${PKGS[@]}"; do installed "$p" || missing+=("$p"); done
if [ "${#missing[@]}" -eq 0 ]; then
    stop_service
    echo "orthanc $(dpkg-query -W -f='${Version}' orthanc), orthanc-dicomweb $(dpkg-query -W -f='${Version}' orthanc-dicomweb): already installed"
    exit 0
fi

# Keep services from starting during the install (the Docker convention), unless a policy is already in place.
POLICY=/usr/sbin/policy-rc.d
added_policy=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
    "${SUDO[@]}" chmod 755 "$POLICY"
    added_policy=1
fi
cleanup() { if [ "$added_policy" -eq 1 ]; then "${SUDO[@]}" rm -f "$POLICY"; fi; }
trap cleanup EXIT

need_update=0
for p in "${missing[@]}"; do has_candidate "$p" || need_update=1; done
if [ "$need_update" -eq 1 ]; then "${SUDO[@]}" apt-get update -q; fi

install() { "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"; }
if ! install; then
    # stale lists: the versions they name are gone from the mirror
    [ "$need_update" -eq 1 ] && exit 1
    "${SUDO[@]}" apt-get update -q
    install
fi

stop_service
echo "installed orthanc $(dpkg-query -W -f='${Version}' orthanc), orthanc-dicomweb $(dpkg-query -W -f='${Version}' orthanc-dicomweb)"
