#!/usr/bin/env bash
# N local processes on 127.0.0.1, each with D simulated CPU devices, joined by jax.distributed: the
# multi-host path of a pod without a pod (what the tests use).
#   launch/local.sh N D pixellm train --config demo train.output_dir=runs/local
# Every process runs the same command with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
# set; process i writes its output to $LOG_DIR/process_i.log (default runs/local_logs). When one
# process fails the others are given PIXELLM_HEARTBEAT_TIMEOUT (+30) seconds to notice and stop,
# then killed; the launcher exits with the first non-zero status.
set -uo pipefail
if [ $# -lt 3 ]; then
  echo "usage: launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS COMMAND..." >&2
  exit 2
fi
n="$1"; devices="$2"; shift 2
port="${PORT:-$((20000 + RANDOM % 20000))}"
log_dir="${LOG_DIR:-runs/local_logs}"
grace=$(( ${PIXELLM_HEARTBEAT_TIMEOUT:-100} + 30 ))
mkdir -p "$log_dir"
pids=()
for ((i = 0; i < n; i++)); do
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$i" JAX_PLATFORMS=cpu \
    XLA_FLAGS="--xla_force_host_platform_device_count=$devices" "$@" > "$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for ((i = 0; i < n; i++)); do
  wait -n
  rc=$?
  if [ "$rc" -ne 0 ]; then
    status=$rc
    echo "a process exited with status $rc; waiting up to ${grace}s for the others" >&2
    deadline=$((SECONDS + grace))
    while [ $SECONDS -lt $deadline ] && kill -0 "${pids[@]}" 2>/dev/null; do sleep 1; done
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null; done
    break
  fi
done
wait 2>/dev/null
echo "logs in $log_dir" >&2
exit "$status"
