#!/usr/bin/env bash
# Builds the three peer virtualenvs OUTSIDE this repository, one per engine, for
# `python -m benchmarks.run --peers fedjax pfl flwr`.
#
#   bash benchmarks/peers/setup.sh                 # all three, under /work/venvs
#   PEER_VENVS=~/peer-venvs bash benchmarks/peers/setup.sh pfl flwr
#
# Venvs: $PEER_VENVS/fedjax  FedJAX 0.0.17 with its 2023 pins (requirements-fedjax-anchor.txt)
#        $PEER_VENVS/pfl     pfl (pfl-research) + PyTorch (CPU wheel)
#        $PEER_VENVS/flwr    flwr[simulation] (Ray) + PyTorch (CPU wheel)
# A venv whose check import already works is left alone; pass FORCE=1 to rebuild.
# PyTorch is pinned to $TORCH_SPEC (default torch==2.13.0, whose CPU wheel "+cpu" is preferred
# where a local wheel directory holds it); an unpinned `torch` may pull a multi-GB CUDA build.
# Set TORCH_SPEC to e.g. "torch --index-url https://download.pytorch.org/whl/cpu" elsewhere.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="${PEER_VENVS:-/work/venvs}"
PY="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PEERS=("$@")
[ ${#PEERS[@]} -eq 0 ] && PEERS=(fedjax pfl flwr)

check() {  # venv python -> 0 when the engine imports
  case "$2" in
    fedjax) "$1" -c "import fedjax, jax" ;;
    pfl) "$1" -c "import pfl, torch, pfl.model.pytorch" ;;
    flwr) "$1" -c "import flwr, torch, ray; from flwr.simulation import start_simulation" ;;
  esac
}

for peer in "${PEERS[@]}"; do
  case "$peer" in fedjax|pfl|flwr) ;; *)
    echo "setup.sh: unknown peer '$peer'; valid peers: fedjax pfl flwr" >&2; exit 2 ;;
  esac
  venv="$ROOT/$peer"
  if [ -z "${FORCE:-}" ] && [ -x "$venv/bin/python" ] && check "$venv/bin/python" "$peer" 2>/dev/null; then
    echo "[$peer] $venv already works; skipped (FORCE=1 to rebuild)"; continue
  fi
  echo "[$peer] building $venv"
  mkdir -p "$ROOT"
  "$PY" -m venv "$venv"
  pip=("$venv/bin/python" -m pip install -q)
  "${pip[@]}" --upgrade pip wheel
  case "$peer" in
    fedjax) "${pip[@]}" -r "$HERE/requirements-fedjax-anchor.txt" ;;
    # shellcheck disable=SC2086
    pfl) "${pip[@]}" $TORCH_SPEC && "${pip[@]}" pfl ;;
    # shellcheck disable=SC2086
    flwr) "${pip[@]}" $TORCH_SPEC && "${pip[@]}" "flwr[simulation]" ;;
  esac
  check "$venv/bin/python" "$peer"
  echo "[$peer] ok: $venv/bin/python"
done
