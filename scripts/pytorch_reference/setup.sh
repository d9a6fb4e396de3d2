#!/usr/bin/env bash
# Creates <repo>/.venv-ref with the PyTorch reference stack (CPU use only): torch, transformers,
# safetensors, numpy. Idempotent: an existing venv whose packages import at the pinned versions
# is left as it is.
#
# Why the plain PyPI wheel: PyPI has no CPU-only ("+cpu") torch wheel for Linux x86_64 (those
# live on PyTorch's own index, which is not reachable here), and the PyPI wheel's libtorch.so
# links libcudart, cuBLAS, cuDNN, NCCL, ... directly, so `pip install --no-deps torch` does not
# import. The CUDA libraries are installed but never used: every script here runs on the CPU.
# Download: torch 2.15.0 ≈ 0.54 GB + its nvidia-*/triton wheels ≈ 2.45 GB (≈ 3.0 GB in all,
# cached by pip afterwards); the venv takes ≈ 5 GB on disk.
#
# Overrides: PYTHON (interpreter, default python3), VENV (default <repo>/.venv-ref),
# TORCH_SPEC / TRANSFORMERS_SPEC (pip requirement strings).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${VENV:-$repo/.venv-ref}"
python="${PYTHON:-python3}"
torch_spec="${TORCH_SPEC:-torch==2.15.0}"
transformers_spec="${TRANSFORMERS_SPEC:-transformers==5.24.0}"
others=("safetensors>=0.4" "numpy>=1.26")

want_version() { # "pkg==1.2" -> 1.2 ; anything else -> empty (no version check)
    case "$1" in *==*) echo "${1##*==}" ;; *) echo "" ;; esac
}

check() {
    "$venv/bin/python" - "$(want_version "$torch_spec")" "$(want_version "$transformers_spec")" <<'PY' 2>/dev/null
import sys
import numpy, safetensors, torch, transformers
want_t, want_tf = sys.argv[1], sys.argv[2]
ok = (not want_t or torch.__version__.split("+")[0] == want_t) and (not want_tf or transformers.__version__ == want_tf)
x = torch.randn(8, 8, requires_grad=True)
(x @ x).sum().backward()
sys.exit(0 if ok and x.grad is not None else 1)
PY
}

if [ -x "$venv/bin/python" ] && check; then
    echo "setup.sh: $venv is ready ($("$venv/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
    exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "setup.sh: creating $venv"
    "$python" -m venv "$venv"
fi
start=$(date +%s)
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "$torch_spec" "$transformers_spec" "${others[@]}"
if ! check; then
    echo "setup.sh: the installed packages do not import or do not match $torch_spec / $transformers_spec" >&2
    exit 1
fi
echo "setup.sh: installed in $(( $(date +%s) - start )) s: $("$venv/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'); venv size $(du -sh "$venv" | cut -f1)"
