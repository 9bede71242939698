#!/usr/bin/env bash
# Proves that rgpt_rt builds where there is no CUDA compiler: builds a wheel with nvcc hidden
# from PATH (a PATH of links to every tool but nvcc) and checks that _C reports cuda=False.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin"
IFS=: read -ra dirs <<<"$PATH"
for dir in "${dirs[@]}"; do
  [ -d "$dir" ] || continue
  for tool in "$dir"/*; do
    name=$(basename "$tool")
    [ "$name" = nvcc ] && continue
    [ -e "$work/bin/$name" ] || ln -s "$tool" "$work/bin/$name" 2>/dev/null || true
  done
done
if PATH="$work/bin" command -v nvcc >/dev/null; then echo "nvcc is still visible" >&2; exit 1; fi
PATH="$work/bin" CUDACXX= "$PY" -m pip wheel -v --no-build-isolation --no-deps -w "$work/wheel" \
  -C build-dir="$work/build" . >"$work/log" 2>&1 || { cat "$work/log"; exit 1; }
grep -rh "rgpt_rt: building" "$work/log" "$work/build" 2>/dev/null | head -1 || true
mkdir -p "$work/site"
(cd "$work/site" && unzip -q "$work"/wheel/rgpt_rt-*.whl)
PY=$(realpath "$PY"); cd "$work"; PYTHONPATH="$work/site" "$PY" -S - <<'PY'
import rgpt_rt._C as C
info = C.build_info()
print("CPU-only build:", info)
assert info["cuda"] is False, info
assert not hasattr(C, "cuda_runtime_info")
PY
