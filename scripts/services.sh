#!/usr/bin/env bash
# Starts the local servers the tests need (PostgreSQL, MariaDB, Redis,
# RabbitMQ, NATS with JetStream) when they are installed but down, waits
# until each accepts connections, and creates the `test` databases.
# Fails with one clear line per server it cannot start.
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
