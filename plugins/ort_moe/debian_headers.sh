#!/usr/bin/env bash
# onnxruntime's C/C++ API headers for building the MoE op library, from Debian's own package:
#
#   plugins/ort_moe/debian_headers.sh DEST    # prints the include folder, DEST/usr/include/onnxruntime
#
# Debian 13 (trixie) ships them as libonnxruntime-dev (onnxruntime 1.21: new enough, the library
# needs 1.17). The package is downloaded from this machine's own Debian mirrors, their suites
# moved to trixie, through a private apt state in DEST: nothing is installed, the system's apt
# configuration and lists are untouched, and the .deb is only unpacked into DEST.
set -euo pipefail

dest="${1:?usage: debian_headers.sh DEST}"
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"
include="$dest/usr/include/onnxruntime"
if [[ -f "$include/onnxruntime_cxx_api.h" ]]; then
    echo "$include"
    exit 0
fi
command -v apt-get >/dev/null 2>&1 || { echo "error: apt-get not found: not a Debian system" >&2; exit 1; }
state="$dest/apt"
mkdir -p "$state/lists/partial" "$state/cache/archives/partial"
sources=/etc/apt/sources.list.d/debian.sources
[[ -f "$sources" ]] || { echo "error: $sources not found (a deb822 Debian sources file)" >&2; exit 1; }
# This machine's Debian suites, moved to trixie (bookworm -> trixie, bookworm-security -> trixie-security).
codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
[[ -n "$codename" ]] || { echo "error: /etc/os-release names no VERSION_CODENAME" >&2; exit 1; }
sed -E "/^Suites:/ s/\b${codename}(-[a-z]+)?\b/trixie\1/g" "$sources" > "$state/trixie.sources"
apt_opts=(-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts=/dev/null
          -o Dir::Etc::sourcelist="$state/trixie.sources" -o Dir::State::Lists="$state/lists"
          -o Dir::Cache="$state/cache" -o APT::Sandbox::User=root -o Debug::NoLocking=1)
apt-get "${apt_opts[@]}" -q update >"$state/update.log" 2>&1 \
    || { echo "error: apt-get update of the trixie suites failed (see $state/update.log)" >&2; exit 1; }
(cd "$state" && apt-get "${apt_opts[@]}" -q download libonnxruntime-dev >"$state/download.log" 2>&1) \
    || { echo "error: apt-get download libonnxruntime-dev failed (see $state/download.log)" >&2; exit 1; }
dpkg-deb -x "$state"/libonnxruntime-dev_*.deb "$dest"
[[ -f "$include/onnxruntime_cxx_api.h" ]] || { echo "error: the package holds no $include/onnxruntime_cxx_api.h" >&2; exit 1; }
echo "$include"
