#!/usr/bin/env bash
# Make sure PostgreSQL (127.0.0.1:5432) is running and accepting connections; start it if not.
# Waits up to 30 s; exits non-zero if it cannot.
set -u
HOST=127.0.0.1
PORT=5432

ready() { pg_isready -q -h "$HOST" -p "$PORT" >/dev/null 2>&1; }

if ready; then
    echo "postgres: accepting connections on $HOST:$PORT"
    exit 0
fi

version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
if [ -z "$version" ]; then
    echo "postgres: not installed (no /etc/postgresql/<version>)" >&2
    exit 1
fi
echo "postgres: starting cluster $version/main"
if ! pg_ctlcluster --skip-systemctl-redirect "$version" main start; then
    echo "postgres: pg_ctlcluster failed to start $version/main" >&2
fi

for _ in $(seq 1 30); do
    if ready; then
        echo "postgres: accepting connections on $HOST:$PORT"
        exit 0
    fi
    sleep 1
done
echo "postgres: not accepting connections on $HOST:$PORT after 30 s" >&2
exit 1
