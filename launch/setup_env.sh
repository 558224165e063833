#!/usr/bin/env bash
# Creates (or completes) the project's virtual environment.
#   CPU machine : installs the CPU build of torch first (TORCH_SPEC, default torch==2.13.0), so that
#                 nothing later can pull a multi-GB CUDA build.
#   GPU machine : if the Python that creates the venv already has a CUDA torch, the venv sees it
#                 (--system-site-packages) and it is kept as is.
# Then installs the project (editable) with every dependency under a constraint file that pins the
# torch (and triton) that is installed plus launch/constraints.txt (plus EXTRA_PINS, space-separated).
# Never installs PyPI's `apex` (an unrelated web toolkit): NVIDIA apex is used only when the user
# has it installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
start=$(date +%s)

log() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
    if "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
        log "found a CUDA torch in $PYTHON: creating $VENV on top of it (--system-site-packages)"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        log "creating $VENV with $PYTHON ($("$PYTHON" --version 2>&1))"
        "$PYTHON" -m venv "$VENV"
    fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    log "installing $TORCH_SPEC${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
    "${PIP[@]}" install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
fi

constraints="$VENV/constraints.txt"
"$VENV/bin/python" - "$constraints" <<'PY'
import importlib.metadata as md, os, sys
lines = [f"torch=={md.version('torch').split('+')[0]}"]
try:
    lines.append(f"triton=={md.version('triton')}")
except md.PackageNotFoundError:
    pass
lines += [l.strip() for l in open("launch/constraints.txt") if l.strip() and not l.startswith("#")]
lines += os.environ.get("EXTRA_PINS", "").split()
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
PY
log "installing h3pretrain and its dependencies (pinned: $(head -1 "$constraints"))"
# DS_BUILD_OPS=0: DeepSpeed's ops are JIT-built on first use instead of at install time.
DS_BUILD_OPS=0 "${PIP[@]}" install -q -c "$constraints" -e '.[dev,eval]'
"$VENV/bin/python" -c 'import torch; print("[setup] torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'
log "done in $(( $(date +%s) - start )) s"
