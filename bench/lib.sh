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
