#!/usr/bin/env bash
# Builds and checks the GPU path on a GPU host that has CUDA, a CUDA PyTorch (python3 -c 'import
# torch') and a compiler, but none of the project's Debian libraries and no network.
#
#   scripts/gpu-host.sh prepare [DIR]     on a Debian 12 machine set up by scripts/setup.sh: puts
#                                         the Debian packages the GPU host lacks (.deb files) and
#                                         the test speech (asr-synth) in DIR (default .gpu-host/)
#   scripts/gpu-host.sh run OUT [DIR]     on the GPU host, from the repository root: unpacks DIR's
#                                         packages into DIR/root (never into /), builds build-gpu/
#                                         against python3's CUDA libtorch without asr-synth, runs
#                                         the GPU tests, the front-end benchmark, a transcription
#                                         throughput run of one GPU worker and two workers on GPU 0
#                                         (--same-gpu 2); writes OUT/gpu-host.log and OUT/summary.md
#
# Options for run (environment): ASRF_GPU_ARCH (default 90: one nvcc pass for an H100/H200),
# ASRF_GPU_JOBS (default nproc), ASRF_GPU_FILES (long files in the throughput set, default 200).
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
# Never taken along: the C library, the compiler's runtime and toolchain (the host's are newer) and
# packages only the Debian installer uses.
SKIP='^(libc6|libc6-dev|libc-dev-bin|libgcc|libstdc\+\+|gcc|g\+\+|cpp|linux-libc-dev|lib(a|l|t|ub|hwa)san|libitm|libatomic|libquadmath|libcc1|libcrypt|rpcsvc-proto|libnsl|libtirpc|libisl|libmpc|libmpfr|libgmp|binutils|libbinutils|libctf|libgprofng|libjansson|libicu|icu-devtools|debconf|cdebconf|libdebian-installer|libnewt|libslang|libtextwrap|install-info|dpkg|perl|tar|base-files|libselinux1|libpcre2|zlib1g$|libzstd1|liblzma5|libbz2-1.0|libsystemd0|libcap2|libgcrypt20|libgpg-error0|libdb5.3|libunistring2|libidn2-0|libp11-kit0|libtasn1-6|libffi8|libgnutls30|libnettle8|libhogweed6|libsqlite3-0|libaudit|libpam|libmd0|libbsd0|libtinfo6|libncurses|readline-common|libreadline8|debianutils|coreutils|sensible-utils|mawk|libacl1|libattr1|libseccomp2|libudev1|libexpat1|libblkid1|libmount1|libuuid1|util-linux|login|passwd|adduser|lsb-base|init-system-helpers|libxml2)'

prepare() {
    local dir="${1:-.gpu-host}"
    mkdir -p "$dir/debs"
    local closure
    closure=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
        --no-enhances "${PACKAGES[@]}" | grep -v '^ ' | grep -v '^<' | sort -u | grep -Ev "$SKIP")
    echo "gpu-host: downloading $(wc -w <<<"$closure") packages into $dir/debs"
    (cd "$dir/debs" && apt-get download $closure >/dev/null)
    [[ -x build/scripts/synth/asr-synth ]] || die "build asr-synth first (scripts/setup.sh)"
    # infer_test's speech (the options its suite uses), with paths relative to the directory.
    rm -rf "$dir/speech"
    build/scripts/synth/asr-synth --out "$dir/speech" --utterances 12 --seed 29 --numbers-fraction 1 \
        --valid-fraction 0 --heldout-fraction 0 >/dev/null 2>>"$dir/synth.log"
    local abs
    abs="$(cd "$dir/speech" && pwd)/"
    sed -i "s|$abs||g" "$dir/speech/train.jsonl"
    # The throughput set's raw material: 120 varied utterances (also relative paths).
    rm -rf "$dir/pool"
    build/scripts/synth/asr-synth --out "$dir/pool" --utterances 120 --seed 515 --valid-fraction 0 \
        --heldout-fraction 0 >/dev/null 2>>"$dir/synth.log"
    abs="$(cd "$dir/pool" && pwd)/"
    sed -i "s|$abs||g" "$dir/pool/train.jsonl"
    du -sh "$dir"
    echo "gpu-host: carry $dir (and nothing under build/) to the GPU host, then: scripts/gpu-host.sh run OUT $dir"
}

run() {
    local out="${1:?usage: scripts/gpu-host.sh run OUT [DIR]}" dir="${2:-.gpu-host}"
    mkdir -p "$out"
    exec > >(tee "$out/gpu-host.log") 2>&1
    local summary="$out/summary.md"
    : >"$summary"
    row() { echo "| $1 | $2 |" | tee -a "$summary"; }
    echo "| check | result |" >>"$summary"
    echo "|---|---|" >>"$summary"
    [[ -d "$dir/debs" ]] || die "no $dir/debs: run 'scripts/gpu-host.sh prepare' on a Debian 12 machine and carry it"
    dir="$(cd "$dir" && pwd)"
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu: /'
    local torch_prefix abi
    torch_prefix=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
    abi=$(python3 -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())'
    [[ "$abi" == 1 ]] || die "this torch uses the old C++ ABI; Debian's libraries need _GLIBCXX_USE_CXX11_ABI=1"
    row "host" "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(nproc) cores, torch $(python3 -c 'import torch; print(torch.__version__)')"

    # Debian's packages into a private root; CMake and pkg-config look there.
    local root="$dir/root" lib
    if [[ ! -d "$root/usr" ]]; then
        for d in "$dir"/debs/*.deb; do dpkg -x "$d" "$root"; done
    fi
    lib="$root/usr/lib/x86_64-linux-gnu"
    export PKG_CONFIG_LIBDIR="$lib/pkgconfig:$root/usr/share/pkgconfig"
    export PKG_CONFIG_SYSROOT_DIR="$root"
    export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    # Debian's libraries load here? (the host's OS is newer)
    local missing
    missing=$(for so in "$lib"/librocksdb.so.* "$lib"/libzmq.so.5 "$lib"/libpq.so.5 "$lib"/libsndfile.so.1; do
        ldd "$so" | grep 'not found' || true; done | sort -u)
    [[ -z "$missing" ]] || die "Debian libraries miss: $missing"

    # nccl.h: the toolkit's, or the one the torch wheel depends on (nvidia-nccl-*).
    local nccl=()
    local nccl_inc
    nccl_inc=$(python3 -c 'import os, nvidia.nccl as n; print(os.path.join(list(n.__path__)[0], "include"))' 2>/dev/null || true)
    [[ -n "$nccl_inc" && -f "$nccl_inc/nccl.h" && ! -f /usr/local/cuda/include/nccl.h ]] && nccl=(-DASRF_NCCL_INCLUDE_DIR="$nccl_inc")
    local t0=$SECONDS
    cmake -S . -B build-gpu "${nccl[@]}" -G "$(command -v ninja >/dev/null && echo Ninja || echo 'Unix Makefiles')" \
        -DCMAKE_BUILD_TYPE=RelWithDebInfo -DASRF_BUILD_SYNTH=OFF -DASRF_WITH_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES="${ASRF_GPU_ARCH:-90}" \
        -DCMAKE_PREFIX_PATH="$torch_prefix;$root/usr;$lib/cmake;$root/usr/share/cmake" \
        -DCMAKE_INCLUDE_PATH="$root/usr/include" -DCMAKE_LIBRARY_PATH="$lib" \
        -DPostgreSQL_ROOT="$root/usr" >"$out/cmake.log" 2>&1 || { tail -40 "$out/cmake.log"; die "cmake failed"; }
    grep -E "ASR Fleet" "$out/cmake.log" || true
    cmake --build build-gpu -j "${ASRF_GPU_JOBS:-$(nproc)}" --target asr-broker asr-worker asr-submit \
        cuda_kernels_test infer_test frontend_bench >"$out/build.log" 2>&1 || { grep -m20 -B2 -A6 'error' "$out/build.log"; die "build failed"; }
    row "build (cmake + compile)" "$((SECONDS - t0)) s"

    local rc=0
    build-gpu/tests/cuda_kernels_test --gtest_brief=1 >"$out/cuda_kernels_test.log" 2>&1 || rc=$?
    row "cuda_kernels_test" "rc $rc; $(grep -E '^\[  (PASSED|SKIPPED|FAILED)' "$out/cuda_kernels_test.log" | tr '\n' ' ')"
    rc=0
    ASRF_TEST_SPEECH="$dir/speech" build-gpu/tests/infer_test --gtest_brief=1 >"$out/infer_test.log" 2>&1 || rc=$?
    row "infer_test (GpuMatchesCpu among them)" "rc $rc; $(grep -E '^\[  (PASSED|SKIPPED|FAILED)' "$out/infer_test.log" | tr '\n' ' ')"

    build-gpu/bench/frontend_bench >"$out/frontend_bench.txt" 2>&1 || true
    sed 's/^/    /' "$out/frontend_bench.txt" >>"$summary"

    # Throughput: long files (30 utterances with pauses, different ones in each file) through the
    # fleet: broker, one GPU worker, then two workers on GPU 0; greedy decoding and with the LM.
    # Audio and fleet state stay out of OUT (which is copied back): only logs and the summary go there.
    local work="build-gpu/gpu-host-work"
    rm -rf "$work"
    mkdir -p "$work"
    local set="$work/set" files="${ASRF_GPU_FILES:-200}"
    python3 - "$dir/pool" "$set" "$files" <<'PY'
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
PY
    local total
    total=$(python3 -c 'import glob,wave,sys
print(round(sum(wave.open(f).getnframes()/16000 for f in glob.glob(sys.argv[1]+"/*.wav")),1))' "$set")
    row "throughput set" "$files files, $total audio seconds"
    local pids=()
    trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
    through() {  # label, launch-workers options..., then -- and worker options
        local label="$1"; shift
        local st="$work/fleet-$label"
        mkdir -p "$st" "$out/fleet-$label"
        build-gpu/broker/asr-broker --listen tcp://127.0.0.1:0 --state-dir "$st/broker" --http 127.0.0.1:0 \
            >"$st/broker.log" 2>&1 &
        pids+=($!)
        for _ in $(seq 100); do [[ -s "$st/broker/broker.endpoint" ]] && break; sleep 0.1; done
        local ep
        ep="$(<"$st/broker/broker.endpoint")"
        mapfile -t wp < <(ASRF_WORKER_BIN=build-gpu/worker/asr-worker scripts/launch-workers.sh --broker "$ep" \
            --state-dir "$st" --log-dir "$st" "$@")
        pids+=("${wp[@]}")
        for _ in $(seq 600); do
            (($(build-gpu/client/asr-submit --broker "$ep" workers 2>/dev/null | grep -c cuda) >= ${#wp[@]})) && break
            sleep 0.1
        done
        local t1=$SECONDS rc=0
        local s0 s1
        s0=$(date +%s.%N)
        build-gpu/client/asr-submit --broker "$ep" transcribe "$set" --out "$st/out" --format txt --wait \
            >"$st/client.log" 2>&1 || rc=$?
        s1=$(date +%s.%N)
        local mem
        mem=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader | head -1)
        row "$label" "rc $rc; $(python3 -c "print(f'wall {$s1-$s0:.2f} s, RTFx {$total/($s1-$s0):.0f}')"); GPU memory used after: $mem; workers: $(grep -h -o '\"device\":\"[^\"]*\"' "$st"/worker-*.log | sort | uniq -c | tr -s ' ' | tr '\n' ' ')"
        kill "${wp[@]}" 2>/dev/null || true
        wait "${wp[@]}" 2>/dev/null || true
        cp "$st"/*.log "$out/fleet-$label/" 2>/dev/null || true
    }
    through one-gpu-worker-greedy --gpus 0 --model-file models/en-small.pt -- --lm none
    through one-gpu-worker-lm --gpus 0 --model-file models/en-small.pt
    through two-workers-same-gpu-greedy --same-gpu 2 --model-file models/en-small.pt -- --lm none

    # Training on the GPU: 40 steps from the shipped model on the pool, validated on the test
    # speech; then the model it wrote is evaluated by a CPU worker (GPU-written files must load there).
    local st="$work/train" ep rc=0
    mkdir -p "$st" "$out/train"
    build-gpu/broker/asr-broker --listen tcp://127.0.0.1:0 --state-dir "$st/broker" >"$st/broker.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do [[ -s "$st/broker/broker.endpoint" ]] && break; sleep 0.1; done
    ep="$(<"$st/broker/broker.endpoint")"
    build-gpu/worker/asr-worker --broker "$ep" --device cuda:0 --state-dir "$st/gpu" >"$st/gpu.log" 2>&1 &
    local gpu_worker=$!
    pids+=($gpu_worker)
    build-gpu/client/asr-submit --broker "$ep" train --manifest "$dir/pool/train.jsonl" \
        --valid "$dir/speech/train.jsonl" --name gpu-check --steps 40 --checkpoint-every 20 --valid-every 20 \
        --init "$PWD/models/en-small.pt" --out "$st/gpu-check.pt" --wait >"$st/train.log" 2>&1 || rc=$?
    row "training on cuda:0 (40 steps)" "rc $rc; $(tail -1 "$st/train.log" | cut -c1-300)"
    kill "$gpu_worker" 2>/dev/null || true
    wait "$gpu_worker" 2>/dev/null || true
    build-gpu/worker/asr-worker --broker "$ep" --device cpu --state-dir "$st/cpu" >"$st/cpu.log" 2>&1 &
    pids+=($!)
    rc=0
    build-gpu/client/asr-submit --broker "$ep" train --evaluate-only --init "$st/gpu-check.pt" \
        --manifest "$dir/speech/train.jsonl" --valid "$dir/speech/train.jsonl" --name eval --wait \
        >"$st/eval.log" 2>&1 || rc=$?
    row "the GPU-trained model on a CPU worker" "rc $rc; $(tail -1 "$st/eval.log" | cut -c1-300)"
    cp "$st"/*.log "$out/train/" 2>/dev/null || true
    # NCCL ranks need one GPU each: with one GPU here, the gang of two is left to a host with two.
    echo "gpu-host: done; summary in $summary"
}

case "$mode" in
    prepare) shift; prepare "$@" ;;
    run) shift; run "$@" ;;
    -h|--help|"") sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) die "unknown mode $mode (prepare or run)" ;;
esac
