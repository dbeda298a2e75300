#!/usr/bin/env bash
# The cost of bearer-token checks (issue 15): GET and POST throughput of a
# node with --tokens against one without, in alternating pairs, same run.
# Two nodes at a time at most, on 127.0.0.1, each run bounded by wrk's -d.
# Usage: bash bench/auth_bench.sh [PAIRS] [SECONDS]     (wrk from Debian's wrk)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
pairs=${1:-3}; seconds=${2:-8}
python=${PYTHON:-python3}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
line=$("$python" -m minstore.auth new bench admin)
token=$(echo "$line" | sed -n 's/^token: //p')
echo "$line" | grep -v '^token:' | grep -v '^#' > "$work/tokens"
cat > "$work/post.lua" <<'LUA'
counter = 0
auth = os.getenv("AUTH")
request = function()
  counter = counter + 1
  local h = {["Content-Type"]="application/json"}
  if auth ~= "" then h["Authorization"] = auth end
  return wrk.format("POST", "/bench/" .. math.random(1, 1e9) .. "-" .. counter, h,
                    '{"value": "' .. string.rep("x", 180) .. '"}')
end
LUA
free_port() { "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
run() {  # label, extra node args, header, Authorization for the Lua script
  local port; port=$(free_port)
  "$python" -c "from twisted.scripts.twistd import run; run()" -n --pidfile= minstore \
    --port "tcp:$port:interface=127.0.0.1" --data "$work/d-$1" --storage sqlite --processes '' $2 \
    > "$work/log-$1" 2>&1 & local pid=$!
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/_node/health" && break; sleep 0.2; done
  curl -s -X POST -H "$3" -H 'content-type: application/json' -d '{"value":"seed"}' "http://127.0.0.1:$port/bench/seed" >/dev/null
  wrk -t2 -c32 -d3s -H "$3" "http://127.0.0.1:$port/bench/seed" >/dev/null 2>&1
  local get post
  get=$(wrk -t2 -c32 -d"${seconds}s" -H "$3" "http://127.0.0.1:$port/bench/seed" | awk '/Requests\/sec/ {print $2}')
  post=$(AUTH="$4" wrk -t2 -c32 -d"${seconds}s" -s "$work/post.lua" "http://127.0.0.1:$port/" | awk '/Requests\/sec/ {print $2}')
  kill "$pid"; wait "$pid" 2>/dev/null || true
  echo "$1 GET $get POST $post"
}
for r in $(seq "$pairs"); do
  if [ $((r % 2)) -eq 1 ]; then
    run "open$r" "" "X-None: 1" ""; run "tokens$r" "--tokens $work/tokens" "Authorization: Bearer $token" "Bearer $token"
  else
    run "tokens$r" "--tokens $work/tokens" "Authorization: Bearer $token" "Bearer $token"; run "open$r" "" "X-None: 1" ""
  fi
done
