#!/usr/bin/env bash
# The demo: fetch the models if missing, build, ingest the starter corpus (corpus/) into data/,
# then serve the API and print how to ask it something. Re-running it is cheap: the models are
# verified, unchanged documents are skipped.
#
#   scripts/demo.sh                  serves on 127.0.0.1:8080
#   CITED_PORT=9000 scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

port=${CITED_PORT:-8080}
host=${CITED_HOST:-127.0.0.1}
export CITED_DATA_DIR=${CITED_DATA_DIR:-data}

models/fetch.sh
cargo build --release
./target/release/cited ingest corpus

cat <<MSG

cited is starting on http://$host:$port (models load in a few seconds; GET /ready says when).
Ask it, and watch the cited answer stream:

  curl -N http://$host:$port/v1/answer -H 'content-type: application/json' \\
    -d '{"question": "How is metastatic sarcoma different from other stages?"}'

Or from another terminal: ./target/release/cited ask "What is oligometastatic sarcoma?"
Stop the server with Ctrl-C.

MSG
exec ./target/release/cited serve --host "$host" --port "$port"
