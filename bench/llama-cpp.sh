#!/usr/bin/env bash
# moss next to llama.cpp on the same machine, in the same run, on the same GGUF.
#   bench/llama-cpp.sh [--skip-build]
#
# llama.cpp comes from the source release of llama-cpp-python on PyPI (it vendors llama.cpp; PyPI is
# the only registry this machine reaches), built once into ~/.cache/moss/llama.cpp with CMake from
# PyPI, CPU only, -DGGML_NATIVE=ON. Both programs use 2 threads. Peak RSS is /usr/bin/time's %M.
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
    # The source release's address from PyPI's simple index (its JSON API is not always reachable).
    url=$(curl -fsS "https://pypi.org/simple/llama-cpp-python/" \
      | grep -o "href=\"[^\"]*llama_cpp_python-$version.tar.gz[^\"]*\"" | head -1 | cut -d'"' -f2 | cut -d'#' -f1)
    [ -n "$url" ] || { log "llama-cpp-python $version's source release not found on PyPI"; exit 1; }
    log "downloading $url"
    curl -fsSL "$url" | tar xz -C "$home"
  fi
  log "building llama.cpp (CPU, native) — several minutes on 2 cores"
  cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
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
echo "moss      $(rss "$moss" bench --prompt-tokens 128 --gen-tokens 64)"
echo "== batched decode: 16-token prompts, 64 generated each, 1 / 4 / 8 sequences"
"$bin/llama-batched-bench" -m "$model" -t 2 -c 4096 -npp 16 -ntg 64 -npl 1,4,8 2>/dev/null | grep -E "^\|"
for n in 1 4 8; do
  echo "-- moss, $n stream(s)"
  MOSS_LIMITS__MAX_RUNNING=8 "$moss" bench --prompt-tokens 16 --gen-tokens 64 --concurrency "$n" |
    grep -E "aggregate|per-stream|decode"
done
