#!/usr/bin/env bash
# Installs the Debian packages ASR Fleet needs, then configures and builds it in build/.
#
#   scripts/setup.sh               install what is missing, then build
#   scripts/setup.sh --no-build    install only
#   scripts/setup.sh --no-install  build only
#
# Packages already installed are skipped (checked with dpkg-query); apt-get update runs only when
# something is missing. Installing needs root, or sudo when run as another user.
#
# Environment:
#   ASRF_JOBS        parallel build jobs (default 2)
#   ASRF_WITH_CUDA   AUTO, ON or OFF: passed to CMake as -DASRF_WITH_CUDA when set
set -euo pipefail

PACKAGES=(
    build-essential cmake pkg-config ccache git
    libtorch-dev libgloo-dev
    cppzmq-dev libzmq3-dev libmsgpack-cxx-dev librocksdb-dev libpq-dev
    libboost-program-options-dev nlohmann-json3-dev libcpp-httplib-dev
    libgtest-dev libgmock-dev
    libsndfile1-dev libsoxr-dev libespeak-ng-dev espeak-ng flite1-dev flite
    festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts
    postgresql python3-yaml
    chromium curl fortunes fortunes-min
    libopenblas0-openmp
)
# libopenblas0-pthread must never come in beside libopenblas0-openmp: its higher alternatives
# priority makes it the libblas.so.3 that libtorch loads, and its threads fight torch's OpenMP.
FORBIDDEN=libopenblas0-pthread

usage() {
    sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

say() { echo "setup: $*"; }
die() { echo "setup: error: $*" >&2; exit 1; }

do_install=1
do_build=1
for arg in "$@"; do
    case "$arg" in
        --no-build) do_build=0 ;;
        --no-install) do_install=0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "setup: unknown option: $arg" >&2; usage >&2; exit 2 ;;
    esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."

is_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == installed ]]
}

install_packages() {
    command -v dpkg-query >/dev/null 2>&1 || die "dpkg-query not found: this script needs Debian or Ubuntu"
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        is_installed "$p" || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        say "all ${#PACKAGES[@]} packages already installed"
    else
        local sudo=()
        if [[ "$(id -u)" -ne 0 ]]; then
            command -v sudo >/dev/null 2>&1 ||
                die "not root and sudo is not installed; as root run: apt-get install -y --no-install-recommends ${missing[*]}"
            # Without a terminal sudo cannot ask for a password: fail at once instead of hanging.
            if [[ -t 0 ]]; then sudo=(sudo); else sudo=(sudo -n); fi
        fi
        local apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300)
        # "pkg-" tells apt not to pull it in; only added when it is absent, so nothing is removed.
        local exclude=()
        is_installed "$FORBIDDEN" || exclude=("${FORBIDDEN}-")
        say "missing ${#missing[@]} package(s): ${missing[*]}"
        say "running apt-get update"
        "${apt[@]}" -q update
        say "installing ${missing[*]}"
        "${apt[@]}" -q install -y --no-install-recommends "${missing[@]}" "${exclude[@]}"
    fi
    if is_installed "$FORBIDDEN"; then
        echo "setup: warning: $FORBIDDEN is installed; libtorch may load it instead of libopenblas0-openmp" \
             "and oversubscribe the CPU (remove it, or set OPENBLAS_NUM_THREADS=1)" >&2
    fi
}

build() {
    local jobs="${ASRF_JOBS:-2}"
    local cmake_args=(-S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo)
    if [[ -n "${ASRF_WITH_CUDA:-}" ]]; then cmake_args+=("-DASRF_WITH_CUDA=${ASRF_WITH_CUDA}"); fi
    say "configuring: cmake ${cmake_args[*]}"
    cmake "${cmake_args[@]}"
    say "building: cmake --build build -j${jobs}"
    cmake --build build -j"${jobs}"
    say "build done: build/broker/asr-broker build/worker/asr-worker build/client/asr-submit"
}

if ((do_install)); then install_packages; fi
if ((do_build)); then build; fi
say "done"
