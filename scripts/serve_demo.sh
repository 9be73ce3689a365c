#!/usr/bin/env bash
# Start `kvrag serve` on 127.0.0.1, wait until it is ready, show curl and client calls, stop it.
set -euo pipefail
KVRAG=${KVRAG:-.venv/bin/kvrag}
PY=${PY:-.venv/bin/python}
PORT=${KVRAG_PORT:-8000}
URL="http://127.0.0.1:${PORT}"
LOG=$(mktemp -t kvrag-serve.XXXXXX.log)

if ! "$PY" -c "import socket,sys; s=socket.socket(); sys.exit(0 if s.connect_ex(('127.0.0.1', $PORT)) else 1)"; then
    FREE=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    echo "(port $PORT is in use: serving on $FREE instead)"
    PORT=$FREE
    URL="http://127.0.0.1:${PORT}"
fi
"$KVRAG" serve --host 127.0.0.1 --port "$PORT" --log-level warning >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true; rm -f "$LOG"' EXIT
ready() { "$PY" -c "import sys, urllib.request as u; sys.exit(0 if u.urlopen('$URL/readyz', timeout=2).status == 200 else 1)" 2>/dev/null; }
for _ in $(seq 1 240); do
    if ready; then break; fi
    if ! kill -0 $SERVER 2>/dev/null; then echo "kvrag serve exited:"; cat "$LOG"; exit 1; fi
    sleep 0.5
done
ready || { echo "kvrag serve did not become ready:"; cat "$LOG"; exit 1; }

show() { echo; echo "\$ $*"; "$@"; echo; }
echo "--- kvrag serve is up on $URL"
if ! command -v curl >/dev/null; then
    echo "(curl is not installed: skipping the curl calls)"
    curl() { :; }
fi
show curl -sS "$URL/readyz"
show curl -sS "$URL/v1/collections/sample/search" -H 'Content-Type: application/json' \
    -d '{"query": "evict the least recently used entry", "k": 2, "filter": {"kind": "code"}}'
show curl -sS "$URL/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"messages": [{"role": "user", "content": "How do volcanoes form?"}], "collection": "sample", "k": 3, "max_tokens": 48}'
show curl -sSN "$URL/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"messages": [{"role": "user", "content": "How do volcanoes form?"}], "collection": "sample", "k": 3, "max_tokens": 12, "stream": true}'
echo "\$ python examples/openai_client.py"
KVRAG_URL="$URL" "$PY" examples/openai_client.py
echo
echo "--- stopping the server; \`make serve\` keeps one running (Ctrl-C to stop)"
