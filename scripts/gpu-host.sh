#!/usr/bin/env bash
# Builds and checks the GPU path on a GPU host that has CUDA, a CUDA PyTorch (python3 -c 'import
# torch') and a compiler, but none of the project's Debian libraries and no network.
#
#   scripts/gpu-host.sh prepare [DIR]     on a Debian 12 machine set up by scripts/setup.sh: puts
#                                         the Debian packages the GPU host lacks (.deb files,
#                                         slimmed: see slim_deb) and the test speech (asr-synth)
#                                         in DIR (default .gpu-host/)
#   scripts/gpu-host.sh run OUT [DIR]     on the GPU host, from the repository root: unpacks DIR's
#                                         packages into DIR/root (never into /), builds build-gpu/
#                                         against python3's CUDA libtorch without asr-synth, runs
#                                         the GPU tests, the front-end benchmark, transcription
#                                         throughput (one GPU worker with the broker's default and
#                                         smaller batches, two workers on GPU 0, a CPU worker, the
#                                         GPU's transcripts against the CPU's) and 40 training steps
#                                         on cuda:0; writes OUT/gpu-host.log and OUT/summary.md
#   scripts/gpu-host.sh prepare --train [DIR]
#                                         as prepare, for train: adds the speech engines and texts
#                                         (espeak-ng, flite, fortunes), leaves out the test packages
#                                         and the test speech
#   scripts/gpu-host.sh train OUT [DIR]   on the GPU host: builds the fleet and asr-synth there,
#                                         synthesises a corpus on every core, continues
#                                         models/en-small.pt on cuda:0 for a time budget through a
#                                         broker and one GPU worker, measures it (greedy) beside
#                                         the shipped model on the README corpus's valid sets;
#                                         writes the model in parts under 16 MB to OUT
#
# Options for run (environment): ASRF_GPU_ARCH (default 90: one nvcc pass for an H100/H200),
# ASRF_GPU_JOBS (default nproc), ASRF_GPU_FILES (long files in the throughput set, default 200),
# ASRF_GPU_TRAIN=0 (skip the training check), ASRF_GPU_BUILD_DIR (default build-gpu),
# ASRF_GPU_DRY_RUN=1 (rehearse the steps without a GPU: the existing build in ASRF_GPU_BUILD_DIR,
# CPU workers, no cmake).
# Options for train (environment): ASRF_TRAIN_SECONDS (training budget, default 240; the steps are
# that over the seconds per step of a 15-step calibration), ASRF_TRAIN_UTTERANCES (corpus size,
# default 48000), ASRF_TRAIN_SEED (default 2050), ASRF_TRAIN_SINGLE_WORDS (share of single-word
# utterances, default 0.1), ASRF_TRAIN_RESIDUAL (residual blocks to grow to, default 0: keep the
# model's), ASRF_TRAIN_BATCH_S (default 384), ASRF_TRAIN_LR (default 4e-4), ASRF_TRAIN_MAX_STEPS,
# ASRF_TRAIN_README_UTTERANCES (default 12000: the README corpus; smaller only to rehearse).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mode="${1:-}"
die() { echo "gpu-host: $*" >&2; exit 1; }

# Headers, CMake and pkg-config files, and the shared libraries they point at, for every library
# of the top-level CMakeLists.txt except libtorch and CUDA (which the GPU host brings).
PACKAGES=(
    cppzmq-dev libzmq3-dev libmsgpack-cxx-dev librocksdb-dev libpq-dev libboost-program-options-dev
    nlohmann-json3-dev libcpp-httplib-dev libgtest-dev libgmock-dev libsndfile1-dev libsoxr-dev libgloo-dev
)
# What `train` adds: asr-synth's speech engines (espeak-ng, flite) and its texts (fortune files).
TRAIN_PACKAGES=(libespeak-ng-dev flite1-dev fortunes fortunes-min)
# Never taken along: the C library, the compiler's runtime and toolchain (the host's are newer) and
# packages only the Debian installer uses.
SKIP='^(libc6|libc6-dev|libc-dev-bin|libgcc|libstdc\+\+|gcc|g\+\+|cpp(-[0-9]+)?$|linux-libc-dev|lib(a|l|t|ub|hwa)san|libitm|libatomic|libquadmath|libcc1|libcrypt|rpcsvc-proto|libnsl|libtirpc|libisl|libmpc|libmpfr|libgmp|binutils|libbinutils|libctf|libgprofng|libjansson|libicu|icu-devtools|debconf|cdebconf|libdebian-installer|libnewt|libslang|libtextwrap|install-info|dpkg|perl|tar|base-files|libselinux1|libpcre2|zlib1g$|libzstd1|liblzma5|libbz2-1.0|libsystemd0|libcap2|libgcrypt20|libgpg-error0|libdb5.3|libunistring2|libidn2-0|libp11-kit0|libtasn1-6|libffi8|libgnutls30|libnettle8|libhogweed6|libsqlite3-0|libaudit|libpam|libmd0|libbsd0|libtinfo6|libncurses|readline-common|libreadline8|debianutils|coreutils|sensible-utils|mawk|libacl1|libattr1|libseccomp2|libudev1|libexpat1|libblkid1|libmount1|libuuid1|util-linux|login|passwd|adduser|lsb-base|init-system-helpers|libxml2)'

# The carried folder travels with the tree, 64 MiB at most together, so each package is slimmed:
# a static archive whose shared library the same package ships is emptied (nothing here links it,
# and CMake's target files only check that it exists), and Boost's headers are cut to the
# directories that <boost/program_options.hpp> and <msgpack.hpp> (its Boost adaptors) reach (whole,
# so another compiler's choices are there too) and the top-level headers.
slim_deb() {
    local deb="$1" x changed=0 a
    x=$(mktemp -d /tmp/asrf-slim.XXXXXX)  # no spaces: the header list below is split on them
    trap 'rm -rf "$x"; trap - RETURN' RETURN  # once: a RETURN trap outlives the function that set it
    dpkg-deb -R "$deb" "$x/p"
    chmod 0755 "$x/p/DEBIAN"  # dpkg-deb -b refuses what a strict umask made of it
    while IFS= read -r a; do
        compgen -G "${a%.a}.so*" >/dev/null || continue
        [[ -s "$a" ]] && { : >"$a"; changed=1; }
    done < <(find "$x/p" -name 'lib*.a')
    local inc="$x/p/usr/include"
    if [[ "$(basename "$deb")" == libboost1.*-dev_* && -d "$inc/boost/program_options" ]]; then
        printf '#include <boost/program_options.hpp>\n#include <msgpack.hpp>\n' >"$x/t.cc"
        mkdir -p "$x/keep/boost"
        c++ -std=c++20 -M -I "$inc" "$x/t.cc" | tr ' \\' '\n\n' | grep "^$inc/boost/.*/" | sed "s|^$inc/||" |
            cut -d/ -f1-2 | sort -u | while read -r d; do cp -a "$inc/$d" "$x/keep/boost/"; done
        cp -a "$inc"/boost/*.hpp "$x/keep/boost/"
        rm -rf "$inc/boost"
        mv "$x/keep/boost" "$inc/boost"
        changed=1
    fi
    # The speech engines' data for English alone: espeak-ng's English dictionary and voices (not
    # those of 100 other languages), and the flite voices asr-synth registers.
    local ed="$x/p/usr/lib/x86_64-linux-gnu/espeak-ng-data"
    if [[ "$(basename "$deb")" == espeak-ng-data_* && -d "$ed" ]]; then
        find "$ed" -maxdepth 1 -name '*_dict' ! -name en_dict -delete
        find "$ed/lang" -mindepth 1 -maxdepth 1 ! -name gmw -exec rm -rf {} +
        rm -rf "$ed/mbrola_ph"
        changed=1
    fi
    if [[ "$(basename "$deb")" == libflite1_* ]]; then
        find "$x/p" -name 'libflite_*.so*' ! -name 'libflite_cmu_us_kal16.*' ! -name 'libflite_cmu_us_awb.*' \
            ! -name 'libflite_cmu_us_rms.*' ! -name 'libflite_cmu_us_slt.*' ! -name 'libflite_usenglish.*' \
            ! -name 'libflite_cmulex.*' -delete
        changed=1
    fi
    if ((changed)); then
        rm -f "$x/p/DEBIAN/md5sums"
        dpkg-deb --root-owner-group -Zxz -b "$x/p" "$deb" >/dev/null
    fi
}

prepare() {
    local dir=.gpu-host for_train=0 a
    for a in "$@"; do
        case "$a" in
            --train) for_train=1 ;;
            -*) die "unknown option $a" ;;
            *) dir="$a" ;;
        esac
    done
    local packages=("${PACKAGES[@]}") p
    if ((for_train)); then
        # Training synthesises its corpus there: the speech engines, their data and the texts; but
        # no GoogleTest or test speech (the folder must stay small).
        packages=("${TRAIN_PACKAGES[@]}")
        for p in "${PACKAGES[@]}"; do
            [[ "$p" == libgtest-dev || "$p" == libgmock-dev ]] || packages+=("$p")
        done
    fi
    rm -rf "$dir/debs" "$dir/root"
    mkdir -p "$dir/debs"
    local closure
    closure=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
        --no-enhances "${packages[@]}" | grep -v '^ ' | grep -v '^<' | sort -u | grep -Ev "$SKIP")
    echo "gpu-host: downloading $(wc -w <<<"$closure") packages into $dir/debs"
    (cd "$dir/debs" && apt-get download $closure >/dev/null)
    local before deb
    before=$(du -sm "$dir/debs" | cut -f1)
    for deb in "$dir"/debs/*.deb; do slim_deb "$deb"; done
    echo "gpu-host: packages slimmed from $before MB to $(du -sm "$dir/debs" | cut -f1) MB"
    if ((for_train)); then
        rm -rf "$dir/speech" "$dir/pool"
        du -sh "$dir"
        echo "gpu-host: carry $dir (and nothing under build/) to the GPU host, then: scripts/gpu-host.sh train OUT $dir"
        return 0
    fi
    [[ -x build/scripts/synth/asr-synth ]] || die "build asr-synth first (scripts/setup.sh)"
    # infer_test's speech (the options its suite uses), with paths relative to the directory.
    rm -rf "$dir/speech"
    build/scripts/synth/asr-synth --out "$dir/speech" --utterances 12 --seed 29 --numbers-fraction 1 \
        --valid-fraction 0 --heldout-fraction 0 >/dev/null 2>>"$dir/synth.log"
    local abs
    abs="$(cd "$dir/speech" && pwd)/"
    sed -i "s|$abs||g" "$dir/speech/train.jsonl"
    # The throughput set's raw material: 64 varied utterances (the carried folder must stay small) (also relative paths).
    rm -rf "$dir/pool"
    build/scripts/synth/asr-synth --out "$dir/pool" --utterances 64 --seed 515 --valid-fraction 0 \
        --heldout-fraction 0 >/dev/null 2>>"$dir/synth.log"
    abs="$(cd "$dir/pool" && pwd)/"
    sed -i "s|$abs||g" "$dir/pool/train.jsonl"
    du -sh "$dir"
    echo "gpu-host: carry $dir (and nothing under build/) to the GPU host, then: scripts/gpu-host.sh run OUT $dir"
}

# The GPU host's facts, Debian's packages unpacked into a private root (DIR/root, never /), the
# environment CMake, pkg-config and the loader need to find them, and configure(): cmake for a
# build in $b against python3's CUDA libtorch (logs in $out/cmake.log). Uses run()'s row and step.
host_env() {
    local dir="$1"
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu: /'
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())'
    local abi torch_inc
    torch_prefix=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
    torch_inc=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')
    abi=$(python3 -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
    [[ "$abi" == 1 ]] || die "this torch uses the old C++ ABI; Debian's libraries need _GLIBCXX_USE_CXX11_ABI=1"
    echo "compilers: $(c++ --version | head -1); $(nvcc --version | tail -1); $(cmake --version | head -1)"
    echo "torch headers: gloo $([[ -d "$torch_inc/gloo" ]] && echo shipped || echo 'not shipped')"
    row "host" "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(nproc) cores ($(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | xargs)), torch $(python3 -c 'import torch; print(torch.__version__)'), $(c++ --version | head -1)"

    # Debian's packages into a private root; CMake and pkg-config look there.
    root="$dir/root"  # root, lib, torch_prefix, nccl and hints stay set for configure()
    if [[ ! -d "$root/usr" ]]; then
        for d in "$dir"/debs/*.deb; do
            if command -v dpkg-deb >/dev/null; then
                dpkg-deb -x "$d" "$root"
            else  # no dpkg: a .deb is an ar archive holding data.tar.*
                local x; x=$(mktemp -d)
                (cd "$x" && ar x "$d" && mkdir -p "$root" && tar -xf data.tar.* -C "$root")
                rm -rf "$x"
            fi
        done
        # Some of Debian's CMake files name their libraries by absolute /usr paths (Snappy's
        # targets, RocksDB's link interface): make those the private root's.
        find "$root" -name '*.cmake' -exec sed -i -E "s#(^|[\";[:space:]])/usr/#\\1$root/usr/#g" {} +
    fi
    lib="$root/usr/lib/x86_64-linux-gnu"
    # The -dev packages' lib*.so links of libraries this host brings (zlib, zstd, bzip2, ...:
    # the runtime packages were left behind) point nowhere: point them at the host's copy.
    local l t d
    for l in "$lib"/*.so; do
        [[ -L "$l" && ! -e "$l" ]] || continue
        t=$(basename "$(readlink "$l")")
        while [[ "$t" == *.so.* ]]; do
            for d in /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib64 /usr/lib64; do
                [[ -e "$d/$t" ]] && { ln -sfn "$d/$t" "$l"; echo "private root: $(basename "$l") -> $d/$t"; continue 3; }
            done
            t=${t%.*}
        done
        echo "private root: $(basename "$l") points nowhere, and this host has no such library"
    done
    export PKG_CONFIG_LIBDIR="$lib/pkgconfig:$root/usr/share/pkgconfig"
    export PKG_CONFIG_SYSROOT_DIR="$root"
    # The fleet's processes see Debian's libraries and nothing more (as when a GPU worker first
    # trained here). asr-synth alone also needs pulseaudio/ (libpulse's private library, which
    # espeak-ng's audio output pulls in and libpulse finds by an absolute RUNPATH into /usr) and
    # /lib (libdbus, and elogind's libsystemd.so.0, which must not shadow the host's for the rest):
    # synth_ld is its loader and linker path (the linker also searches it for what a shared
    # library needs).
    export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    synth_ld="$lib/pulseaudio:$root/lib/x86_64-linux-gnu:$LD_LIBRARY_PATH"
    # Debian's libraries load here? (the host's OS is newer)
    local missing
    missing=$(for so in "$lib"/librocksdb.so.* "$lib"/libzmq.so.5 "$lib"/libpq.so.5 "$lib"/libsndfile.so.1; do
        ldd "$so" | grep 'not found' || true; done | sort -u)
    [[ -z "$missing" ]] || die "Debian libraries miss: $missing"

    # nccl.h: the toolkit's, or the one the torch wheel depends on (nvidia-nccl-*).
    nccl=()
    local nccl_inc
    nccl_inc=$(python3 -c 'import os, nvidia.nccl as n; print(os.path.join(list(n.__path__)[0], "include"))' 2>/dev/null || true)
    [[ -n "$nccl_inc" && -f "$nccl_inc/nccl.h" && ! -f /usr/local/cuda/include/nccl.h ]] && nccl=(-DASRF_NCCL_INCLUDE_DIR="$nccl_inc")
    # Every CMake package config of the private root, named directly (<Name>_DIR): the host's
    # CMake need not search a private prefix the way Debian's does.
    hints=()
    local cfg name
    while read -r cfg; do
        name=$(basename "$cfg"); name=${name%Config.cmake}; name=${name%-config.cmake}
        [[ " ${hints[*]} " == *" -D${name}_DIR="* ]] || hints+=("-D${name}_DIR=$(dirname "$cfg")")
    done < <(find "$root" \( -name '*Config.cmake' -o -name '*-config.cmake' \) | sort)
    echo "private root: $(ls "$root/usr/lib/x86_64-linux-gnu" | wc -l) files in its lib; ${#hints[@]} package configs"
    env | grep -E '^(CMAKE|CC|CXX|CUDA|LD_|PKG)' || true
    configure() {
        # -include cstdint, a precaution: the host's compiler is newer than Debian 12's, and newer libstdc++
        # headers stopped including it along the way.
        step 300 cmake -S . -B "$b" "${nccl[@]}" -G "$(command -v ninja >/dev/null && echo Ninja || echo 'Unix Makefiles')" \
            -DCMAKE_BUILD_TYPE=RelWithDebInfo -DASRF_BUILD_SYNTH=OFF -DASRF_WITH_CUDA=ON \
            -DCMAKE_CXX_FLAGS="-include cstdint" -DCMAKE_CUDA_ARCHITECTURES="${ASRF_GPU_ARCH:-90}" \
            -DCMAKE_PREFIX_PATH="$torch_prefix;$root/usr;$lib/cmake;$root/usr/share/cmake" \
            -DCMAKE_INCLUDE_PATH="$root/usr/include" -DCMAKE_LIBRARY_PATH="$lib" \
            -DPostgreSQL_ROOT="$root/usr" "${hints[@]}" "$@" >>"$out/cmake.log" 2>&1 || {
            tail -40 "$out/cmake.log"; die "cmake failed"; }
    }
}

# A row of OUT/summary.md (also printed).
row() { echo "| $1 | $2 |" | tee -a "$summary"; }
# Each step has a time limit, so that one that hangs leaves time for the rest.
step() { local limit="$1"; shift; timeout --kill-after=5 "$limit" "$@"; }
# The start of run and train, which declare out, dir, summary, dry and b (set here): OUT made
# absolute, everything printed also into OUT/gpu-host.log, the summary table begun, DIR checked
# for the packages that `scripts/gpu-host.sh MODE` (the argument) puts there.
begin() {
    mkdir -p "$out"
    out="$(cd "$out" && pwd)"
    exec > >(tee "$out/gpu-host.log") 2>&1
    summary="$out/summary.md" dry="${ASRF_GPU_DRY_RUN:-0}" b="${ASRF_GPU_BUILD_DIR:-build-gpu}"
    printf '| check | result |\n|---|---|\n' >"$summary"
    [[ -d "$dir/debs" ]] || die "no $dir/debs: run 'scripts/gpu-host.sh $1' on a Debian 12 machine and carry it"
    dir="$(cd "$dir" && pwd)"
}

run() {
    local out="${1:?usage: scripts/gpu-host.sh run OUT [DIR]}" dir="${2:-.gpu-host}" summary dry b
    begin prepare
    local t0=$SECONDS
    if [[ "$dry" == 1 ]]; then
        # A rehearsal of the steps on a machine without a GPU: the existing build ($b), CPU workers.
        row "host" "dry run (no GPU): $(nproc) cores"
    else
        host_env "$dir"
        configure -DASRF_GLOO=ON -DASRF_NCCL=ON  # explicitly: a fallback of an earlier run stays in the cache
        grep -E "ASR Fleet|Caffe2|Torch|CUDA" "$out/cmake.log" | head -20 || true
    fi
    local targets=(asr-broker asr-worker asr-submit cuda_kernels_test infer_test frontend_bench)
    build() {
        local keep=(); [[ -f "$b/build.ninja" ]] && keep=(-- -k 0)
        step 400 cmake --build "$b" -j "${ASRF_GPU_JOBS:-$(nproc)}" --target "${targets[@]}" "${keep[@]}" >>"$out/build.log" 2>&1
    }
    if ! build; then
        grep -m12 -A6 'error' "$out/build.log" || true
        if [[ "$dry" != 1 ]]; then
            # The gang backends are the parts that lean on c10d's headers matching Gloo's and NCCL's:
            # without them the worker does everything but gangs.
            row "build" "failed with the gang backends; again with -DASRF_GLOO=OFF -DASRF_NCCL=OFF (see build.log)"
            echo "=== again without the gang backends" >>"$out/build.log"
            configure -DASRF_GLOO=OFF -DASRF_NCCL=OFF
        fi
        # What did build is still run below.
        build || row "build" "FAILED: $(grep -m4 'error' "$out/build.log" | cut -c1-240 | tr '\n' ' ')"
    fi
    # A crashed binary again under cuda-gdb (the host has no gdb), for its backtrace.
    backtrace() {
        local rc="$1" name="$2" bin="$3"
        ((rc >= 128 && rc != 137)) && command -v cuda-gdb >/dev/null || return 0
        step 120 cuda-gdb -q -batch -ex run -ex bt -ex 'info threads' --args "$b/$bin" >"$out/$name.backtrace" 2>&1 || true
        row "$name backtrace" "$(grep -m8 -E '^#[0-9]' "$out/$name.backtrace" | cut -c1-160 | tr '\n' ' ')"
    }
    have() { [[ -x "$b/$1" ]] || { row "$1" "not built: skipped"; return 1; }; }
    row "build (cmake + compile)" "$((SECONDS - t0)) s; $(grep -ho 'NCCL gangs: [a-z]*' "$out/cmake.log" 2>/dev/null | tail -1)"

    local rc=0 t1
    t1=$SECONDS
    if have tests/cuda_kernels_test; then
        step 120 stdbuf -oL "$b"/tests/cuda_kernels_test >"$out/cuda_kernels_test.log" 2>&1 || rc=$?
        row "cuda_kernels_test" "rc $rc, $((SECONDS - t1)) s; $(grep -cE '^\[       OK' "$out/cuda_kernels_test.log") OK; $(grep -E '^\[  (PASSED|SKIPPED|FAILED) +\] [0-9]+ test' "$out/cuda_kernels_test.log" | tr '\n' ' ')"
        backtrace "$rc" cuda_kernels_test tests/cuda_kernels_test
    fi
    rc=0 t1=$SECONDS
    if have tests/infer_test; then
        ASRF_TEST_SPEECH="$dir/speech" step 240 stdbuf -oL "$b"/tests/infer_test >"$out/infer_test.log" 2>&1 || rc=$?
        row "infer_test (GpuMatchesCpu among them)" "rc $rc, $((SECONDS - t1)) s; $(grep -cE '^\[       OK' "$out/infer_test.log") OK; $(grep -E '^\[  (PASSED|SKIPPED|FAILED) +\] [0-9]+ test' "$out/infer_test.log" | tr '\n' ' ')"
        ASRF_TEST_SPEECH="$dir/speech" backtrace "$rc" infer_test tests/infer_test
    fi
    if [[ "$dry" != 1 ]] && have bench/frontend_bench; then
        step 120 "$b"/bench/frontend_bench >"$out/frontend_bench.txt" 2>&1 || true
        sed 's/^/    /' "$out/frontend_bench.txt" >>"$summary"
    fi
    have worker/asr-worker && have broker/asr-broker && have client/asr-submit || die "no fleet binaries: see build.log"

    # Throughput: long files (30 utterances with pauses, different ones in each file) through the
    # fleet: broker and one GPU worker, greedy and with the LM; two workers on GPU 0; one CPU worker
    # on a fifth of the set. Audio and fleet state stay out of OUT (which is copied back).
    local work="$b/gpu-host-work"
    rm -rf "$work"
    mkdir -p "$work"
    local set="$work/set" files="${ASRF_GPU_FILES:-200}"
    python3 - "$dir/pool" "$set" "$files" <<'PY2'
import json, random, sys, wave, os
pool, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [json.loads(l) for l in open(os.path.join(pool, "train.jsonl"))]
os.makedirs(out, exist_ok=True)
rng = random.Random(7)
for k in range(n):
    frames = b""
    for r in rng.sample(rows, 30):
        with wave.open(os.path.join(pool, r["audio"])) as w:
            frames += w.readframes(w.getnframes()) + b"\0\0" * 9600
    with wave.open(f"{out}/long{k:04d}.wav", "wb") as w:
        w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000); w.writeframes(frames)
PY2
    local small="$work/set-fifth"
    mkdir -p "$small"
    local set_abs
    set_abs="$(cd "$set" && pwd)"
    ls "$set" | head -n $(((files + 4) / 5)) | while read -r f; do ln -s "$set_abs/$f" "$small/$f"; done
    seconds() { python3 -c 'import glob,wave,sys
print(round(sum(wave.open(f).getnframes()/16000 for f in glob.glob(sys.argv[1]+"/*.wav")),1))' "$1"; }
    local total total_small
    total=$(seconds "$set")
    total_small=$(seconds "$small")
    row "throughput set" "$files files, $total audio seconds (the CPU worker: $(ls "$small" | wc -l) files, $total_small s)"
    pids=()  # global: the EXIT trap runs after run() returns
    trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
    through() {  # label, audio directory, its seconds, launch-workers options..., then -- and worker options
        local label="$1" audio="$2" secs="$3"; shift 3
        local st="$work/fleet-$label"
        mkdir -p "$st" "$out/fleet-$label"
        "$b"/broker/asr-broker --listen tcp://127.0.0.1:0 --state-dir "$st/broker" --http 127.0.0.1:0 \
            "${broker_opts[@]}" >"$st/broker.log" 2>&1 &
        pids+=($!)
        for _ in $(seq 100); do [[ -s "$st/broker/broker.endpoint" ]] && break; sleep 0.1; done
        local ep
        ep="$(<"$st/broker/broker.endpoint")"
        local want=cuda
        if [[ "$dry" == 1 ]]; then  # CPU workers stand in for GPU ones
            local a=() skip=0
            for x in "$@"; do
                if ((skip)); then skip=0; continue; fi
                case "$x" in --gpus|--same-gpu) skip=1 ;; *) a+=("$x") ;; esac
            done
            set -- --gpus none --cpu-workers 1 "${a[@]}"
        fi
        [[ " $* " == *" --gpus none "* ]] && want=cpu
        mapfile -t wp < <(ASRF_WORKER_BIN="$b/worker/asr-worker" scripts/launch-workers.sh --broker "$ep" \
            --state-dir "$st" --log-dir "$st" "$@")
        pids+=("${wp[@]}")
        local up=0
        for _ in $(seq 600); do
            up=$("$b"/client/asr-submit --broker "$ep" workers 2>/dev/null | grep -c "$want" || true)
            ((up >= ${#wp[@]})) && break
            sleep 0.1
        done
        "$b"/client/asr-submit --broker "$ep" workers >"$st/workers.log" 2>&1 || true
        # GPU memory of each worker process, sampled while it transcribes.
        local mon=""
        if [[ "$dry" != 1 ]]; then
            nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits -lms 200 >"$st/gpu-mem.csv" 2>/dev/null &
            mon=$!
        fi
        local rc=0 s0 s1
        s0=$(date +%s.%N)
        step 240 "$b"/client/asr-submit --broker "$ep" transcribe "$audio" --out "$st/out" --format txt --wait \
            >"$st/client.log" 2>&1 || rc=$?
        s1=$(date +%s.%N)
        local peak="n/a"
        if [[ -n "$mon" ]]; then
            kill "$mon" 2>/dev/null || true
            peak=$(awk -F', *' '{ if ($2 > m[$1]) m[$1] = $2 } END { for (p in m) printf "%s%d MiB", (n++ ? ", " : ""), m[p] }' "$st/gpu-mem.csv")
        fi
        row "$label" "rc $rc; broker ${broker_opts[*]:-defaults}; $up of ${#wp[@]} workers up; $(python3 -c "print(f'wall {$s1-$s0:.2f} s, RTFx {$secs/($s1-$s0):.0f}')"); peak GPU memory per worker: ${peak:-none seen}; GPUs listed: $(grep -o 'GPU-[0-9a-f-]*' "$st/workers.log" | sort | uniq -c | tr -s ' ' | tr '\n' ' '); $(grep -h -o '"max_batch_frames":[0-9]*' "$st"/worker-*.log | sort -u | tr '\n' ' ')"
        # The workers are not this shell's children (launch-workers.sh starts them with setsid): wait
        # until they are gone, so that the next run has the GPU to itself.
        if ((${#wp[@]})); then
            kill "${wp[@]}" 2>/dev/null || true
            for _ in $(seq 100); do kill -0 "${wp[@]}" 2>/dev/null || break; sleep 0.1; done
        fi
        cp "$st"/*.log "$st"/*.csv "$out/fleet-$label/" 2>/dev/null || true
    }
    # Defaults first (batches of up to 640 padded seconds, two jobs in flight per GPU worker); then
    # 160-second batches and one job at a time, for comparison.
    local broker_opts=()
    through one-gpu-worker-greedy "$set" "$total" --gpus 0 --model-file models/en-small.pt -- --lm none
    broker_opts=(--batch-budget-s 160 --batch-max-items 64)
    through one-gpu-worker-greedy-160s-batches-1-slot "$set" "$total" --gpus 0 --model-file models/en-small.pt -- --lm none --slots 1
    broker_opts=()
    through two-workers-same-gpu-greedy "$set" "$total" --same-gpu 2 --model-file models/en-small.pt -- --lm none
    through one-cpu-worker-greedy "$small" "$total_small" --gpus none --cpu-workers 1 --model-file models/en-small.pt -- --lm none
    # The GPU's transcripts against the CPU worker's, file by file (greedy decoding on both).
    python3 - "$work/fleet-one-cpu-worker-greedy/out" "$work/fleet-one-gpu-worker-greedy/out" <<'PY2' | while read -r line; do row "GPU vs CPU transcripts (greedy)" "$line"; done
import os, sys
def dist(a, b):
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]
cpu, gpu = sys.argv[1], sys.argv[2]
files = sorted(f for f in os.listdir(cpu) if f.endswith(".txt")) if os.path.isdir(cpu) else []
errs = chars = same = 0
for f in files:
    a = open(os.path.join(cpu, f)).read().strip()
    b = open(os.path.join(gpu, f)).read().strip() if os.path.exists(os.path.join(gpu, f)) else ""
    errs += dist(a, b); chars += max(1, len(a)); same += a == b
print(f"{len(files)} files, {same} identical, character difference {errs / max(1, chars):.5f}")
PY2
    through one-gpu-worker-lm "$set" "$total" --gpus 0 --model-file models/en-small.pt
    through one-cpu-worker-lm "$small" "$total_small" --gpus none --cpu-workers 1 --model-file models/en-small.pt
    if [[ "${ASRF_GPU_TRAIN:-1}" != 1 ]]; then
        row "all steps" "$((SECONDS - t0)) s (training skipped: ASRF_GPU_TRAIN=${ASRF_GPU_TRAIN})"
        return 0
    fi

    # Training on the GPU: 40 steps from the shipped model on the pool, validated on the test
    # speech; then the model it wrote is evaluated by a CPU worker (GPU-written files must load there).
    local st="$work/train" ep dev=cuda:0
    [[ "$dry" == 1 ]] && dev=cpu
    rc=0
    mkdir -p "$st" "$out/train"
    "$b"/broker/asr-broker --listen tcp://127.0.0.1:0 --state-dir "$st/broker" >"$st/broker.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do [[ -s "$st/broker/broker.endpoint" ]] && break; sleep 0.1; done
    ep="$(<"$st/broker/broker.endpoint")"
    "$b"/worker/asr-worker --broker "$ep" --device "$dev" --state-dir "$st/gpu" >"$st/gpu.log" 2>&1 &
    local gpu_worker=$!
    pids+=($gpu_worker)
    t1=$SECONDS
    step 180 "$b"/client/asr-submit --broker "$ep" train --manifest "$dir/pool/train.jsonl" \
        --valid "$dir/speech/train.jsonl" --name gpu-check --steps 40 --checkpoint-every 20 --valid-every 20 \
        --init "$PWD/models/en-small.pt" --out "$st/gpu-check.pt" --wait >"$st/train.log" 2>&1 || rc=$?
    row "training on $dev (40 steps)" "rc $rc, $((SECONDS - t1)) s; $(grep '"result"' "$st/train.log" | tail -1 | cut -c1-400)"
    kill "$gpu_worker" 2>/dev/null || true
    wait "$gpu_worker" 2>/dev/null || true
    "$b"/worker/asr-worker --broker "$ep" --device cpu --state-dir "$st/cpu" >"$st/cpu.log" 2>&1 &
    pids+=($!)
    rc=0
    step 120 "$b"/client/asr-submit --broker "$ep" train --evaluate-only --init "$st/gpu-check.pt" \
        --manifest "$dir/speech/train.jsonl" --valid "$dir/speech/train.jsonl" --name eval --wait \
        >"$st/eval.log" 2>&1 || rc=$?
    row "the $dev-trained model on a CPU worker" "rc $rc; $(grep '"result"' "$st/eval.log" | tail -1 | cut -c1-400)"
    cp "$st"/*.log "$out/train/" 2>/dev/null || true
    # NCCL ranks need one GPU each: with one GPU here, the gang of two is left to a host with two.
    row "all steps" "$((SECONDS - t0)) s"
    echo "gpu-host: done; summary in $summary"
}

# Trains the English model on the GPU host: synthesises a fresh corpus there on every core,
# continues models/en-small.pt on cuda:0 through the fleet (a broker and one GPU worker) for a
# time budget, measures it and the shipped model (greedy) on the README corpus's valid sets, and
# leaves the model in OUT in parts under 16 MB (`cat OUT/en-small-gpu.pt.part* > FILE`; its
# sha256 in OUT/en-small-gpu.pt.sha256).
train_on_gpu() {
    local out="${1:?usage: scripts/gpu-host.sh train OUT [DIR]}" dir="${2:-.gpu-host}" summary dry b
    begin "prepare --train"
    [[ -s models/en-small.pt ]] || die "no models/en-small.pt to start from"
    local t0=$SECONDS dev=cuda:0 texts=/usr/share/games/fortunes
    if [[ "$dry" == 1 ]]; then
        dev=cpu
        row "host" "dry run (no GPU): $(nproc) cores, the existing build in $b"
    else
        host_env "$dir"
        # The fleet is built, linked and run as run's; it trained on an H100 so (bench/RESULTS.md,
        # run v). A worker built with the gang backends off, linked with --allow-shlib-undefined,
        # started with --threads and with /lib's Debian libraries on its loader path aborted
        # ("free(): invalid pointer") in torch::jit::load; which of these did it is not known.
        # --allow-shlib-undefined is for asr-synth alone: what Debian's speech libraries need from
        # libraries this host brings is checked when they load (ldd below), not by this linker.
        # A folder made before Gloo's packages were gathered fails the build late (c10d's headers).
        [[ -d "$root/usr/include/gloo" ]] || die "$dir has no Gloo headers: run 'scripts/gpu-host.sh prepare --train' again and carry it"
        configure -DASRF_BUILD_SYNTH=ON -DASRF_GLOO=ON -DASRF_NCCL=ON -DASRF_SYNTH_LINK_OPTIONS=-Wl,--allow-shlib-undefined
        step 400 cmake --build "$b" -j "${ASRF_GPU_JOBS:-$(nproc)}" --target asr-broker asr-worker asr-submit \
            >>"$out/build.log" 2>&1 || { grep -m12 -A6 'error' "$out/build.log" || true; die "build failed (build.log)"; }
        step 200 env LD_LIBRARY_PATH="$synth_ld" cmake --build "$b" --target asr-synth \
            >>"$out/build.log" 2>&1 || { grep -m12 -A6 'error' "$out/build.log" || true; die "asr-synth's build failed (build.log)"; }
        local nf
        nf=$(LD_LIBRARY_PATH="$synth_ld" ldd "$b"/scripts/synth/asr-synth | grep 'not found' || true)
        [[ -z "$nf" ]] || die "asr-synth misses libraries: $nf"
        export ESPEAK_DATA_PATH="$root/usr/lib/x86_64-linux-gnu"
        texts="$root/usr/share/games/fortunes"
    fi
    row "build" "$((SECONDS - t0)) s"
    local work="$b/gpu-train-work" shards
    shards=$(nproc)
    rm -rf "$work"
    mkdir -p "$work"
    pids=()  # global, as the two below: the EXIT trap runs after this function returns
    train_logs="$work" train_out="$out"
    trap 'cp "$train_logs"/*.log "$train_out"/ 2>/dev/null; kill "${pids[@]}" 2>/dev/null || true' EXIT
    synth() {  # directory, utterances, seed, asr-synth options...
        local d="$1" n="$2" seed="$3" i p ok=1 sp=()
        shift 3
        for ((i = 0; i < shards; i++)); do
            LD_LIBRARY_PATH="${synth_ld:-${LD_LIBRARY_PATH:-}}" "$b"/scripts/synth/asr-synth --out "$d" --utterances "$n" --seed "$seed" --shard "$i" --shards "$shards" \
                --text-dir "$texts" "$@" >"$d.synth.$i.log" 2>&1 &
            sp+=($!)
        done
        for p in "${sp[@]}"; do wait "$p" || ok=0; done
        ((ok)) || { tail -n 3 "$d".synth.*.log; die "asr-synth failed"; }
        local split
        for split in train valid valid_heldout; do cat "$d/$split".*.jsonl >"$d/$split.jsonl"; done
    }
    local t1=$SECONDS corpus="$work/corpus" readme="$work/readme"
    # The README's corpus (scripts/train-english.sh): its valid sets measure every model in bench/RESULTS.md.
    synth "$readme" "${ASRF_TRAIN_README_UTTERANCES:-12000}" 2026

    "$b"/broker/asr-broker --listen tcp://127.0.0.1:0 --state-dir "$work/broker" --http "" >"$work/broker.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do [[ -s "$work/broker/broker.endpoint" ]] && break; sleep 0.1; done
    local ep
    ep="$(<"$work/broker/broker.endpoint")"
    # The worker as run's training check starts it (torch's threads default to the host's cores).
    "$b"/worker/asr-worker --broker "$ep" --device "$dev" --state-dir "$work/worker" >"$work/worker.log" 2>&1 &
    local worker=$!
    pids+=($worker)
    # A job followed to its end; a worker that dies meanwhile ends it at once (the broker would
    # only requeue the job and wait for another worker).
    follow() {  # limit, log, asr-submit arguments...
        local limit="$1" log="$2" f
        shift 2
        timeout --kill-after=5 "$limit" "$b"/client/asr-submit --broker "$ep" "$@" --wait >"$log" 2>&1 &
        f=$!
        while kill -0 "$f" 2>/dev/null; do
            if ! kill -0 "$worker" 2>/dev/null; then
                # The broker requeues the job: a worker under cuda-gdb takes it, and where it stops
                # goes to OUT/worker-gdb.log (this host has no gdb).
                if [[ "$dry" != 1 ]] && command -v cuda-gdb >/dev/null; then
                    echo "gpu-host: the worker died; its job again under cuda-gdb (worker-gdb.log)"
                    timeout --kill-after=5 120 cuda-gdb -batch -ex run -ex bt -ex 'info sharedlibrary' \
                        --args "$b"/worker/asr-worker --broker "$ep" --device "$dev" --state-dir "$work/worker-gdb" \
                        >"$out/worker-gdb.log" 2>&1 || true
                fi
                kill "$f" 2>/dev/null || true
                die "the worker died: $(tail -n 3 "$work/worker.log" | cut -c1-300)"
            fi
            sleep 1
        done
        wait "$f"
    }
    result() { grep -o '"result".*' "$1" | tail -1 | cut -c1-600; }
    # Greedy CER (the LM decodes on the CPU and does not travel). The shipped model first: loading
    # it is what training starts with, so a worker that cannot shows before the long synthesis.
    evaluate() {  # model file
        local set rc
        for set in valid valid_heldout; do
            rc=0
            follow 300 "$work/eval.log" train --evaluate-only --init "$1" --valid "$readme/$set.jsonl" || rc=$?
            row "$(basename "$1"), README $set, greedy" "rc $rc; $(result "$work/eval.log")"
        done
    }
    evaluate "$PWD/models/en-small.pt"

    t1=$SECONDS
    synth "$corpus" "${ASRF_TRAIN_UTTERANCES:-48000}" "${ASRF_TRAIN_SEED:-2050}" --heldout-fraction 0 \
        --valid-fraction 0.02 --single-word-fraction "${ASRF_TRAIN_SINGLE_WORDS:-0.1}"
    hours() { python3 -c 'import json,sys
print(round(sum(json.loads(l)["duration"] for l in open(sys.argv[1]))/3600, 2))' "$1"; }
    row "synthesis ($shards shards)" "$((SECONDS - t1)) s; training corpus $(wc -l <"$corpus/train.jsonl") utterances, $(hours "$corpus/train.jsonl") h; its valid $(wc -l <"$corpus/valid.jsonl"); README valid $(wc -l <"$readme/valid.jsonl"), valid_heldout $(wc -l <"$readme/valid_heldout.jsonl")"
    local args=(--init "$PWD/models/en-small.pt" --residual "${ASRF_TRAIN_RESIDUAL:-0}"
        --batch-seconds "${ASRF_TRAIN_BATCH_S:-384}" --lr "${ASRF_TRAIN_LR:-4e-4}" --warmup 100
        --speed-perturb 0.25 --vtlp 0.2 --lowpass 0.15 --reverb 0.25 --noise 0.25 --pad-background 0.3
        --nonspeech 0.06 --valid "$corpus/valid.jsonl")
    # How long a step takes here: a few steps on a slice of the corpus, then the budget in steps.
    local rc=0 budget="${ASRF_TRAIN_SECONDS:-240}" per steps
    head -n 4000 "$corpus/train.jsonl" >"$work/calibrate.jsonl"
    t1=$SECONDS
    follow 300 "$work/calibrate.log" train --manifest "$work/calibrate.jsonl" --name calibrate \
        --steps 15 --checkpoint-every 1000 --valid-every 1000 --valid-max 20 "${args[@]}" \
        --out "$work/calibrate.pt" || rc=$?
    # Seconds per step, and of them those spent making batches on the host (the job's result).
    local prep
    read -r per prep < <(python3 -c 'import re,sys
t = open(sys.argv[1]).read().replace("\\\"", "\"")
n = re.findall(r"\"steps\":\s*([0-9]+)", t)
n = int(n[-1]) if n else 0
def per(key):
    v = re.findall(r"\"" + key + r"\":\s*([0-9.eE+-]+)", t)
    return round(float(v[-1]) / n, 4) if v and n else 0
print(per("train_seconds"), per("prepare_seconds"))' "$work/calibrate.log")
    row "calibration (15 steps)" "rc $rc, $((SECONDS - t1)) s; $per s per step, of it $prep s making batches on the host"
    [[ "$rc" == 0 ]] && python3 -c "import sys; sys.exit(0 if float('$per') > 0 else 1)" || die "calibration failed: $(tail -3 "$work/calibrate.log")"
    steps=$(python3 -c "print(max(20, min(${ASRF_TRAIN_MAX_STEPS:-20000}, int($budget / $per))))")
    t1=$SECONDS
    rc=0
    follow $((budget * 3 + 300)) "$work/train.log" train --manifest "$corpus/train.jsonl" \
        --name en-small-gpu --steps "$steps" --checkpoint-every 200 --valid-every 100000 --valid-max 300 "${args[@]}" \
        --out "$work/en-small-gpu.pt" || rc=$?
    row "training on $dev ($steps steps, budget $budget s)" "rc $rc, $((SECONDS - t1)) s for the job; $(result "$work/train.log")"
    [[ "$rc" == 0 && -s "$work/en-small-gpu.pt" ]] || die "training failed: $(tail -3 "$work/train.log")"
    evaluate "$work/en-small-gpu.pt"
    split -b 15m -d "$work/en-small-gpu.pt" "$out/en-small-gpu.pt.part"
    (cd "$work" && sha256sum en-small-gpu.pt) >"$out/en-small-gpu.pt.sha256"
    row "all steps" "$((SECONDS - t0)) s"
    echo "gpu-host: done; summary in $summary"
}

case "$mode" in
    prepare) shift; prepare "$@" ;;
    run) shift; run "$@" ;;
    train) shift; train_on_gpu "$@" ;;
    -h|--help|"") sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//' ;;
    *) die "unknown mode $mode (prepare, run or train)" ;;
esac
