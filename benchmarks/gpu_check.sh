#!/usr/bin/env bash
# Runs benchmarks/gpu_check.py from a plain checkout, without installing medfoundry: the source is put on the path,
# and on a machine that lacks some dependencies (a lent GPU machine with no registry) the wheels brought in .whl/
# are unpacked into a scratch folder first. Arguments go to gpu_check.py (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
# Only where medfoundry's own dependencies are missing: the wheels are built for the device machine's Python.
if ! "$python" -c "import lightly, pydantic, openslide, monai, torchstain" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    site=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# src/ first, so this checkout's medfoundry wins over any installed copy; torchrun's ranks inherit the path.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$python" benchmarks/gpu_check.py "$@"
