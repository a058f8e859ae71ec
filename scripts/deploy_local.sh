#!/usr/bin/env bash
# One SuperLink and N SuperNodes on 127.0.0.1: the app's deployment mode on one machine.
#
#   scripts/deploy_local.sh start N [STATE_DIR] [CERT_DIR]   start them, print how to run the app
#   scripts/deploy_local.sh stop [STATE_DIR]                  stop every process started, by PID
#
# SuperNode k gets --node-config "partition-id=k num-partitions=N". Each server runs in its own
# session (setsid), so stopping its PID's process group also stops the ClientApp processes it
# spawned and its node worker (on unless LORM_FLWR_NODE_WORKER=0). With CERT_DIR (from scripts/make_certs.sh) the SuperLink serves TLS and the
# SuperNodes and flwr verify it against CERT_DIR/ca.crt; without it, everything is --insecure.
# STATE_DIR (default ./.deploy) holds the pids, logs, the SuperLink database and a FLWR_HOME
# whose config.toml names the connection "local-deploy":
#
#   FLWR_HOME=STATE_DIR/flwr-home flwr run . local-deploy --stream
set -euo pipefail

cmd="${1:?usage: deploy_local.sh start N [STATE_DIR] [CERT_DIR] | stop [STATE_DIR]}"
bin_dir="$(dirname "$(command -v flower-superlink)")"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_port() {  # port pid name
  for _ in $(seq 1 200); do
    if ! kill -0 "$2" 2>/dev/null; then echo "$3 exited early; see its log" >&2; return 1; fi
    if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),0.5)" 2>/dev/null; then return 0; fi
    sleep 0.3
  done
  echo "$3 did not listen on 127.0.0.1:$1" >&2; return 1
}

stop_all() {  # state dir
  local pids="$1/pids"
  [ -f "$pids" ] || { echo "nothing to stop ($pids not found)"; return 0; }
  # SuperNodes first, the SuperLink last (the file lists it first).
  tac "$pids" | while read -r pid; do
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  done
  for _ in $(seq 1 50); do
    alive=0
    while read -r pid; do kill -0 "$pid" 2>/dev/null && alive=1; done < "$pids"
    [ "$alive" = 0 ] && break
    sleep 0.2
  done
  while read -r pid; do kill -KILL -- "-$pid" 2>/dev/null || true; done < "$pids"
  rm -f "$pids"
  echo "stopped"
}

case "$cmd" in
start)
  n="${2:?number of SuperNodes}"
  state="${3:-.deploy}"
  certs="${4:-}"
  mkdir -p "$state/flwr-home"
  state="$(cd "$state" && pwd)"
  [ -f "$state/pids" ] && { echo "$state/pids exists: stop the running deployment first" >&2; exit 1; }
  trap 'stop_all "$state" >/dev/null' ERR
  port="$(free_port)"
  if [ -n "$certs" ]; then
    certs="$(cd "$certs" && pwd)"
    link_tls=(--ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.pem" --ssl-keyfile "$certs/server.key")
    node_tls=(--root-certificates "$certs/ca.crt")
    conn_tls="root-certificates = \"$certs/ca.crt\""
  else
    link_tls=(--insecure); node_tls=(--insecure); conn_tls="insecure = true"
  fi
  FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 setsid "$bin_dir/flower-superlink" "${link_tls[@]}" \
    --host 127.0.0.1 --port "$port" --database "$state/superlink.db" \
    --disable-runtime-dependency-installation > "$state/superlink.log" 2>&1 &
  echo $! > "$state/pids"
  wait_port "$port" "$!" flower-superlink
  for k in $(seq 0 $((n - 1))); do
    # Each SuperNode's messages go to its long-lived node worker (lorm_flwr/client/node_worker.py)
    # unless LORM_FLWR_NODE_WORKER=0 is set: a fresh ClientApp process per message then
    # relays instead of importing torch and building the model again.
    LORM_FLWR_NODE_WORKER="${LORM_FLWR_NODE_WORKER:-1}" setsid "$bin_dir/flower-supernode" "${node_tls[@]}" --superlink "127.0.0.1:$port" \
      --host 127.0.0.1 --port "$(free_port)" \
      --node-config "partition-id=$k num-partitions=$n" > "$state/supernode-$k.log" 2>&1 &
    echo $! >> "$state/pids"
  done
  printf '[superlink]\ndefault = "local-deploy"\n\n[superlink.local-deploy]\naddress = "127.0.0.1:%s"\n%s\n' \
    "$port" "$conn_tls" > "$state/flwr-home/config.toml"
  trap - ERR
  echo "SuperLink on 127.0.0.1:$port with $n SuperNodes; pids in $state/pids"
  echo "run:  FLWR_HOME=$state/flwr-home flwr run . local-deploy --stream"
  echo "stop: $0 stop $state"
  ;;
stop)
  stop_all "$(cd "${2:-.deploy}" 2>/dev/null && pwd || echo "${2:-.deploy}")"
  ;;
*)
  echo "unknown command $cmd" >&2; exit 2 ;;
esac
