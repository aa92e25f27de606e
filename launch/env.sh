# Sourced by every launcher: which Python runs lh-cp, the CUDA allocator default, and the one
# recipe check before any process starts.
# PYTHON: the checkout's .venv/bin/python when it exists, else python3 (set PYTHON to override).
LAUNCH_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$LAUNCH_REPO/.venv/bin/python" ]]; then PYTHON="$LAUNCH_REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
# Long sequences fragment the CUDA caching allocator (a 768K-token step of the 270M model left
# 24 GiB reserved but unusable); expandable segments avoid that, unless the user set their own.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

# check_recipe WORLD_SIZE [--set k=v ...]: `lh-cp plan` once, before the launcher starts the
# ranks, so a bad recipe is one clear message instead of one per rank inside a launcher traceback.
check_recipe() {
  local world="$1"
  shift
  "$PYTHON" -m lh_cp.cli plan "$RECIPE" --world-size "$world" "$@" || exit 2
}
