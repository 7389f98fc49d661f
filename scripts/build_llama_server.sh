#!/usr/bin/env bash
# Build llama.cpp's llama-server from the source of the installed llama-cpp-python (the same
# llama.cpp commit), for benchmarks/speculative.py's llama-server baseline. llama-cpp-python
# ships the library, not the server binary. About 10 minutes on 2 cores; needs cmake and a C++
# compiler. The binary lands in ~/.cache/slimline/llama.cpp-<version>/bin/llama-server.
set -euo pipefail
python=${PYTHON:-python}
version=$("$python" -c "import llama_cpp; print(llama_cpp.__version__)")
home="${SLIMLINE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/slimline}/llama.cpp-$version"  # slimline.cache_dir
if [ -x "$home/bin/llama-server" ]; then echo "$home/bin/llama-server"; exit 0; fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$python" -m pip download "llama-cpp-python==$version" --no-binary :all: --no-deps -d "$scratch" -q
tar xzf "$scratch"/llama_cpp_python-*.tar.gz -C "$scratch"
source_dir=$(echo "$scratch"/llama_cpp_python-*/vendor/llama.cpp)
cmake -S "$source_dir" -B "$scratch/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON > "$scratch/configure.log"
cmake --build "$scratch/build" --target llama-server -j"$(nproc)"
mkdir -p "$home/bin"
cp "$scratch/build/bin/llama-server" "$home/bin/llama-server.partial"
mv "$home/bin/llama-server.partial" "$home/bin/llama-server"  # never a half-copied binary
echo "$home/bin/llama-server"
