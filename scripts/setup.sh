#!/usr/bin/env bash
# Set up emrdr on a fresh Debian machine: system packages (as root), a virtual environment,
# Python dependencies. Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

need_apt=()
PGBIN=/usr/lib/postgresql/15/bin
[ -x "$PGBIN/initdb" ] || need_apt+=(postgresql-15 postgresql-client-15)
command -v /usr/bin/python3 >/dev/null 2>&1 || need_apt+=(python3)
/usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
command -v zstd >/dev/null 2>&1 || need_apt+=(zstd)
if [ "${EMRDR_SETUP_TEST_TOOLS:-0}" = "1" ]; then
  # promtool and amtool check monitoring/ in the tests.
  command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
  command -v amtool >/dev/null 2>&1 || need_apt+=(prometheus-alertmanager)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing Debian packages: ${need_apt[*]} (run this script as root once)" >&2
    exit 1
  fi
  echo "setup: installing Debian packages: ${need_apt[*]}"
  # A packaged PostgreSQL must not start a cluster of its own on 5432: emrdr makes its own.
  mkdir -p /etc/postgresql-common
  grep -qs '^create_main_cluster' /etc/postgresql-common/createcluster.conf ||
    echo 'create_main_cluster = false' >> /etc/postgresql-common/createcluster.conf
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# PostgreSQL runs as an unprivileged user and calls `emrdr wal push` from this virtual
# environment, so the environment must be readable by that user. When the checkout lies under
# a private directory (e.g. root's home), the environment goes to /opt/emrdr instead.
traversable() {
  local d=$1
  while [ "$d" != "/" ]; do
    [ "$(stat -c %A "$d" | cut -c10)" = "x" ] || return 1
    d=$(dirname "$d")
  done
}
VENV="$ROOT/.venv"
EDITABLE=-e
if [ "$(id -u)" -eq 0 ] && ! traversable "$ROOT"; then
  VENV="/opt/emrdr/venv-$(echo "$ROOT" | sha1sum | cut -c1-8)"
  EDITABLE=""
  mkdir -p /opt/emrdr && chmod 755 /opt/emrdr
  [ -L "$ROOT/.venv" ] || rm -rf "$ROOT/.venv"
  ln -sfn "$VENV" "$ROOT/.venv"
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtual environment $VENV"
  /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
chmod -R a+rX "$VENV" 2>/dev/null || true
echo "setup: installing emrdr and its dependencies"
"$VENV/bin/pip" install -q $EDITABLE "$ROOT[test]" 2>&1 | grep -v -e '^WARNING: Location' -e 'is ignored' || true
"$VENV/bin/python" -c 'import emrdr, faststream, nats, asyncpg' 
echo "setup: done ($("$VENV/bin/python" --version), PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}'))"
