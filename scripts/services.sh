#!/usr/bin/env bash
# Starts the local servers the tests need (PostgreSQL, MariaDB, Redis,
# RabbitMQ, NATS with JetStream) when they are installed but down, waits
# until each accepts connections, and creates the `test` databases.
# Fails with one clear line per server it cannot start.
#
#   scripts/services.sh              start whatever is down (what CI runs)
#   scripts/services.sh stop NAME    stop one server (fault tests)
#   scripts/services.sh start NAME   start one server and wait until it is up
#
# NAME is one of postgres, mariadb, redis, rabbitmq, nats.
set -uo pipefail

up() { # host port
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

wait_up() { # name port seconds
  local i
  for ((i = 0; i < $3 * 4; i++)); do
    up 127.0.0.1 "$2" && return 0
    sleep 0.25
  done
  return 1
}

failed=0
ensure() { # name port seconds start-command...
  local name=$1 port=$2 secs=$3
  shift 3
  if up 127.0.0.1 "$port"; then
    echo "services: $name is up on $port"
    return
  fi
  echo "services: $name is down on $port, starting it"
  if ! "$@" >/tmp/outbox-services-"$name".log 2>&1; then
    echo "services: could not start $name: $(tail -n 3 /tmp/outbox-services-"$name".log | tr '\n' ' ')" >&2
  fi
  if wait_up "$name" "$port" "$secs"; then
    echo "services: $name is up on $port"
  else
    echo "services: ERROR: $name did not come up on 127.0.0.1:$port within ${secs}s (see /tmp/outbox-services-$name.log)" >&2
    failed=1
  fi
}

start_postgres() {
  command -v pg_ctlcluster >/dev/null || { echo "pg_ctlcluster not installed"; return 1; }
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
}
start_redis() {
  command -v redis-server >/dev/null || { echo "redis-server not installed"; return 1; }
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
}
start_rabbitmq() {
  command -v rabbitmq-server >/dev/null || { echo "rabbitmq-server not installed"; return 1; }
  rabbitmq-server -detached
}
start_nats() {
  [ -x /usr/sbin/nats-server ] || { echo "nats-server not installed"; return 1; }
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
}
start_mariadb() {
  [ -x /usr/sbin/mariadbd ] || { echo "mariadbd not installed"; return 1; }
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
}

stop_postgres() { pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main stop -m fast; }
stop_mariadb() { start-stop-daemon --stop --oknodo --retry 30 --exec /usr/sbin/mariadbd; }
stop_redis() { redis-cli -h 127.0.0.1 -p 6379 shutdown nosave || true; }
stop_rabbitmq() { rabbitmqctl stop; }
stop_nats() { start-stop-daemon --stop --oknodo --retry 10 --exec /usr/sbin/nats-server; }

port_of() {
  case $1 in
    postgres) echo 5432 ;; mariadb) echo 3306 ;; redis) echo 6379 ;;
    rabbitmq) echo 5672 ;; nats) echo 4222 ;;
    *) echo "services: unknown server $1 (postgres, mariadb, redis, rabbitmq, nats)" >&2; exit 2 ;;
  esac
}

case "${1:-up}" in
  stop)
    port=$(port_of "${2:-}")
    "stop_$2" >/tmp/outbox-services-"$2".log 2>&1
    for ((i = 0; i < 120; i++)); do up 127.0.0.1 "$port" || { echo "services: $2 stopped"; exit 0; }; sleep 0.25; done
    echo "services: ERROR: $2 still listens on $port" >&2
    exit 1
    ;;
  start)
    port=$(port_of "${2:-}")
    ensure "$2" "$port" 90 "start_$2"
    exit $failed
    ;;
  up) ;;
  *) echo "usage: $0 [up | stop NAME | start NAME]" >&2; exit 2 ;;
esac

ensure postgres 5432 30 start_postgres
ensure mariadb 3306 30 start_mariadb
ensure redis 6379 15 start_redis
ensure rabbitmq 5672 90 start_rabbitmq
ensure nats 4222 15 start_nats

# The test databases.
if up 127.0.0.1 5432 && command -v psql >/dev/null; then
  psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='test'" | grep -q 1 ||
    psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE test" ||
    { echo "services: ERROR: could not create PostgreSQL database test" >&2; failed=1; }
fi
if up 127.0.0.1 3306 && command -v mariadb >/dev/null; then
  mariadb -h 127.0.0.1 -u root -e "CREATE DATABASE IF NOT EXISTS test" ||
    { echo "services: ERROR: could not create MariaDB database test" >&2; failed=1; }
fi

exit $failed
