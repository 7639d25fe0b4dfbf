#!/usr/bin/env bash
# moss next to llama.cpp on the same machine, in the same run, on the same GGUF.
#   bench/llama-cpp.sh [--skip-build]
#
# llama.cpp comes from the source release of llama-cpp-python on PyPI (it vendors llama.cpp; PyPI is
# the only registry this machine reaches), fetched with `pip download` and built once into
# ~/.cache/moss/llama.cpp with CMake from PyPI, CPU only, for this CPU (without AMX where it has it). Both programs use 2 threads. Peak RSS is /usr/bin/time's %M.
# Nothing here runs in the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
home="${MOSS_LLAMA_DIR:-$HOME/.cache/moss/llama.cpp}"
src="$home/llama_cpp_python-$version/vendor/llama.cpp"
bin="$src/build/bin"
log() { echo "bench/llama-cpp.sh: $*" >&2; }

if [ ! -x "$bin/llama-bench" ] || [ ! -x "$bin/llama-batched-bench" ] || [ ! -x "$bin/llama-completion" ]; then
  command -v cmake >/dev/null || python3 -m pip install -q --disable-pip-version-check cmake
  mkdir -p "$home"
  if [ ! -d "$src" ]; then
    # The source release through whatever index pip is configured with (build tools as wheels).
    log "downloading llama-cpp-python $version's source release"
    python3 -m pip download -q --disable-pip-version-check --no-deps \
      --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$home/dl"
    tar xzf "$home/dl/llama_cpp_python-$version.tar.gz" -C "$home"
  fi
  # -march=native on a CPU with AMX builds llama.cpp's AMX path, which crashes at start on the
  # AMX-capable Xeons seen here: there, the instruction sets are named one by one without AMX.
  flags=$(grep -m1 '^flags' /proc/cpuinfo)
  has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
  if [[ " $flags " == *" amx_tile "* ]]; then
    isa="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c)"
    isa="$isa -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VBMI=$(has avx512_vbmi)"
    isa="$isa -DGGML_AVX512_VNNI=$(has avx512_vnni) -DGGML_AVX512_BF16=$(has avx512_bf16) -DGGML_AVX_VNNI=$(has avx_vnni)"
    isa="$isa -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  else
    isa="-DGGML_NATIVE=ON"
  fi
  log "building llama.cpp (CPU: $isa) — several minutes on 2 cores"
  # shellcheck disable=SC2086
  cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF $isa \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
  cmake --build "$src/build" -j2 --target llama-bench llama-batched-bench llama-completion >/dev/null
fi

# (a shared-library build moved from elsewhere finds its libraries here)
export LD_LIBRARY_PATH="$bin:${LD_LIBRARY_PATH:-}"
model="$(scripts/fetch-model --model qwen)"
cargo build --release --quiet
moss=target/release/moss
rss() { /usr/bin/time -f "%M" "$@" 2>&1 >/dev/null | tail -1; }

echo "== CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores"
echo "== single stream: 128-token prompt, 64 generated, 2 threads"
for round in 1 2; do
  echo "-- round $round"
  "$bin/llama-bench" -m "$model" -t 2 -p 128 -n 64 -r 3 -o md 2>/dev/null | grep -E "^\|"
  "$moss" bench --prompt-tokens 128 --gen-tokens 64 | grep -E "prefill|decode"
done
echo "== peak RSS (KiB): llama.cpp generating 64 tokens after a 128-token prompt, then moss bench"
prompt="$(python3 -c "print(' '.join(['hello world'] * 64))")"
echo "llama.cpp $(rss "$bin/llama-completion" -m "$model" -t 2 -n 64 -p "$prompt" -no-cnv --no-warmup)"
echo "moss      $(rss "$moss" bench --prompt-tokens 128 --gen-tokens 64 --no-bandwidth)"
echo "== batched decode: 16-token prompts, 64 generated each, 1 / 4 / 8 sequences"
"$bin/llama-batched-bench" -m "$model" -t 2 -c 4096 -npp 16 -ntg 64 -npl 1,4,8 2>/dev/null | grep -E "^\|"
for n in 1 4 8; do
  echo "-- moss, $n stream(s)"
  MOSS_LIMITS__MAX_RUNNING=8 "$moss" bench --prompt-tokens 16 --gen-tokens 64 --concurrency "$n" |
    grep -E "aggregate|per-stream|decode"
done
echo "== long context: prefill of 2,048 / 6,144-token prompts; decode of 32 tokens after 2,048 / 6,144"
"$bin/llama-bench" -m "$model" -t 2 -p 2048,6144 -n 0 -r 1 -o md 2>/dev/null | grep -E "^\|"
"$bin/llama-bench" -m "$model" -t 2 -p 0 -n 32 -d 2048,6144 -r 1 -o md 2>/dev/null | grep -E "^\|"
for n in 2048 6144; do
  echo "-- moss, $n-token prompt"
  "$moss" bench --prompt-tokens "$n" --gen-tokens 2 | grep -E "prefill"
done
for d in 2048 6144; do
  echo "-- moss, decode after $d tokens"
  "$moss" bench --depth "$d" --prompt-tokens 1 --gen-tokens 32 | grep -E "decode"
done
echo "== memory bandwidth and the decode ceiling (moss bench)"
"$moss" bench --prompt-tokens 16 --gen-tokens 32 | grep -E "bandwidth|decode"
echo "== prompt-lookup drafting (moss): copy-heavy and plain chat answers, with and without, 1 / 4 / 8 streams"
for n in 1 4 8; do
  MOSS_LIMITS__MAX_RUNNING=8 "$moss" bench --lookup --gen-tokens 256 --concurrency "$n" | grep -E "^(copy|chat|answers)"
done
