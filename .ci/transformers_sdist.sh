#!/usr/bin/env bash
# Unpacks the source distribution of the INSTALLED transformers into DEST (default: $NAVIL_TRANSFORMERS_SRC, else
# ~/.cache/navil/transformers-src), for tests/test_transformers_contract.py, which runs transformers' own common
# model, processor and image-processor tests from it. pip's cache is reused; an up-to-date DEST is kept.
set -euo pipefail
dest="${1:-${NAVIL_TRANSFORMERS_SRC:-$HOME/.cache/navil/transformers-src}}"
version="$(python -c 'import transformers; print(transformers.__version__)')"
# The common tests import `parameterized` (a test-only dependency of transformers).
pip install --quiet parameterized
if [ -f "$dest/tests/test_modeling_common.py" ] && grep -qx "Version: $version" "$dest/PKG-INFO" 2>/dev/null; then
    echo "transformers $version sources already in $dest"
    exit 0
fi
download="$(mktemp -d)"
trap 'rm -rf "$download"' EXIT
pip download --quiet --no-deps --no-binary :all: "transformers==$version" -d "$download"
rm -rf "$dest"
mkdir -p "$dest"
tar -xzf "$download"/transformers-*.tar.gz -C "$dest" --strip-components=1
echo "transformers $version sources in $dest"
