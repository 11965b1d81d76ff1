# Shell helpers shared by the benchmark scripts in bench/ (sourced, not run).

# Wait for "READY http://..." on a process's stdout file.
wait_ready_line() { # file pid secs
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    grep -q '^READY ' "$1" 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# Wait until the server on a port answers a one-token completion of $MODEL with 200
# ("authorization: Bearer $AUTH_KEY" sent when set). With "chat" as $4, a chat
# completion (the first one also tells a router which models exist).
wait_completion() { # port pid secs [chat]
  local i code path=/v1/completions auth=()
  local body="{\"model\":\"$MODEL\",\"prompt\":\"hi\",\"max_tokens\":1}"
  if [ "${4:-}" = chat ]; then
    path=/v1/chat/completions
    body="{\"model\":\"$MODEL\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":1}"
  fi
  [ -n "${AUTH_KEY:-}" ] && auth=(-H "authorization: Bearer $AUTH_KEY")
  for ((i = 0; i < $3 * 5; i++)); do
    kill -0 "$2" 2>/dev/null || return 1
    code=$(curl -s -o /dev/null -w '%{http_code}' -m 5 -H 'content-type: application/json' "${auth[@]}" \
      -d "$body" "http://127.0.0.1:$1$path" || true)
    [ "$code" = 200 ] && return 0
    sleep 0.2
  done
  return 1
}
