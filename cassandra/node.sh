#!/usr/bin/env bash
# A single-node Apache Cassandra 5.0 on 127.0.0.1 for the tests and for trying Parley by hand.
#
#   cassandra/node.sh start    fetch Cassandra from Maven Central (first time), start the node,
#                              wait until it answers on the CQL port
#   cassandra/node.sh stop     stop it (SIGTERM, then SIGKILL after 30 s)
#   cassandra/node.sh status   exit 0 while the CQL port answers
#   cassandra/node.sh wait     wait for the CQL port (after `start --no-wait`)
#
# Environment: PARLEY_CASSANDRA_HOME (default <repo>/target/cassandra: jars, data, logs),
# PARLEY_CASSANDRA_PORT (CQL, default 9042), PARLEY_CASSANDRA_HEAP (default 512m).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HOME_DIR="${PARLEY_CASSANDRA_HOME:-$HERE/../target/cassandra}"
mkdir -p "$HOME_DIR"
HOME_DIR="$(cd "$HOME_DIR" && pwd)"
LIB="$HOME_DIR/lib"
NODE="$HOME_DIR/node"
CQL_PORT="${PARLEY_CASSANDRA_PORT:-9042}"
STORAGE_PORT="${PARLEY_CASSANDRA_STORAGE_PORT:-7000}"
HEAP="${PARLEY_CASSANDRA_HEAP:-512m}"
PIDFILE="$NODE/cassandra.pid"

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$CQL_PORT") 2>/dev/null; }

fetch() {
    if [ -f "$LIB/.complete" ]; then return; fi
    echo "cassandra: fetching cassandra-all and its dependencies from Maven Central into $LIB"
    rm -rf "$LIB"
    mvn -q -f "$HERE/pom.xml" dependency:copy-dependencies -DoutputDirectory="$LIB" -DincludeScope=runtime
    touch "$LIB/.complete"
}

wait_port() {
    local pid="${1:-}"
    for _ in $(seq 1 240); do
        if answers; then
            echo "cassandra: answering on 127.0.0.1:$CQL_PORT"
            return 0
        fi
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            echo "cassandra: the node exited during startup; last lines of $NODE/logs/system.log:" >&2
            tail -n 30 "$NODE/logs/system.log" >&2 || true
            tail -n 30 "$NODE/logs/stdout.log" >&2 || true
            return 1
        fi
        sleep 0.5
    done
    echo "cassandra: no answer on 127.0.0.1:$CQL_PORT after 120 s" >&2
    return 1
}

start() {
    if answers; then
        echo "cassandra: already answering on 127.0.0.1:$CQL_PORT"
        return 0
    fi
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        echo "cassandra: pid $(cat "$PIDFILE") is starting; waiting for it"
        wait_port "$(cat "$PIDFILE")"
        return
    fi
    command -v java >/dev/null || { echo "cassandra: java (17) is not installed" >&2; exit 1; }
    fetch
    mkdir -p "$NODE"/{data,commitlog,saved_caches,hints,cdc_raw,logs,tls}
    if [ ! -f "$NODE/tls/node.pem" ]; then
        keytool -genkeypair -alias node -keyalg EC -groupname secp256r1 -validity 3650 \
            -dname "CN=127.0.0.1" -ext "SAN=IP:127.0.0.1,DNS:localhost" \
            -keystore "$NODE/tls/node.p12" -storetype PKCS12 -storepass parley-dev -keypass parley-dev >/dev/null
        keytool -exportcert -rfc -alias node -keystore "$NODE/tls/node.p12" -storepass parley-dev > "$NODE/tls/node.pem"
    fi
    sed -e "s|\${NODE}|$NODE|g" -e "s|\${CQL_PORT}|$CQL_PORT|g" -e "s|\${STORAGE_PORT}|$STORAGE_PORT|g" \
        "$HERE/cassandra.yaml" > "$NODE/cassandra.yaml"
    # shellcheck disable=SC2046
    nohup java -Xms"$HEAP" -Xmx"$HEAP" -Xss512k -XX:+UseG1GC -XX:+ExitOnOutOfMemoryError \
        $(grep -v '^#' "$HERE/jvm17.options") \
        -Dcassandra.config="file://$NODE/cassandra.yaml" \
        -Dcassandra.storagedir="$NODE" \
        -Dcassandra.logdir="$NODE/logs" \
        -Dlogback.configurationFile="file://$HERE/logback.xml" \
        -Dcassandra-foreground=yes \
        -Dcassandra.skip_wait_for_gossip_to_settle=0 \
        -Dcassandra.ring_delay_ms=100 \
        -cp "$LIB/*" org.apache.cassandra.service.CassandraDaemon \
        > "$NODE/logs/stdout.log" 2>&1 < /dev/null &
    echo $! > "$PIDFILE"
    echo "cassandra: started pid $(cat "$PIDFILE") (heap $HEAP, data in $NODE)"
    if [ "${1:-}" != "--no-wait" ]; then wait_port "$(cat "$PIDFILE")"; fi
}

stop() {
    [ -f "$PIDFILE" ] || { echo "cassandra: not started by this script"; return 0; }
    local pid
    pid="$(cat "$PIDFILE")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDFILE"
    echo "cassandra: stopped"
}

case "${1:-}" in
    start) start "${2:-}" ;;
    stop) stop ;;
    status) answers ;;
    wait) wait_port "$(cat "$PIDFILE" 2>/dev/null || true)" ;;
    *) echo "usage: $0 start [--no-wait] | stop | status | wait" >&2; exit 2 ;;
esac
