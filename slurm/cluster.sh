#!/usr/bin/env bash
# A throw-away real SLURM cluster on this host: one slurmctld and two slurmd (node1, node2), loopback only.
#
#   slurm/cluster.sh start [DIR]   write DIR/slurm.conf, start munged (if needed), slurmctld, slurmd x2,
#                                  wait until both nodes are idle, print the environment to use
#   slurm/cluster.sh stop [DIR]    cancel this cluster's jobs, kill exactly the daemons started here,
#                                  remove the /etc/hosts lines added here
#   slurm/cluster.sh status [DIR]  daemons and nodes
#   slurm/cluster.sh env [DIR]     only the `export ...` lines (eval "$(slurm/cluster.sh env)")
#
# DIR defaults to $CXRDIST_SLURM_DIR or /tmp/cxrdist-slurm. Needs root and Debian's slurm-wlm + munge
# (`make slurm-deps`). Ports (127.0.0.1 only): slurmctld $CXRDIST_SLURM_PORT (default 16817), slurmd
# $CXRDIST_SLURMD_PORT and the next one (default 17001, 17002). CPUs per node: $CXRDIST_SLURM_CPUS (2, like a small real partition).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CMD="${1:-status}"
DIR="${2:-${CXRDIST_SLURM_DIR:-/tmp/cxrdist-slurm}}"
mkdir -p "$DIR" 2>/dev/null || true
DIR="$(cd "$DIR" && pwd)"
CONF="$DIR/slurm.conf"
CTLD_PORT="${CXRDIST_SLURM_PORT:-16817}"
NODE_PORT1="${CXRDIST_SLURMD_PORT:-17001}"
NODE_PORT2="$((NODE_PORT1 + 1))"
NODES=(node1 node2)
HOSTS_MARK="# cxrdist-slurm $DIR"

log() { echo "cluster.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }
alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }
pidof_file() { [[ -s "$1" ]] && tr -dc '0-9' <"$1" || true; }
ctld_pid() { pidof_file "$DIR/run/slurmctld.pid"; }
slurmd_pid() { pidof_file "$DIR/run/slurmd-$1.pid"; }

env_lines() {
  echo "export SLURM_CONF=$CONF"
  echo "export PATH=$DIR/bin:\$PATH"
}

# --- munge ---------------------------------------------------------------------------------------------
munge_ok() { command -v munge >/dev/null && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  munge_ok && return 0
  [[ -s /etc/munge/munge.key ]] || {
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key >/dev/null
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
  }
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  chmod 755 /run/munge
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
  munge_ok || die "munged did not start (see /var/log/munge/munged.log)"
  pidof_file /run/munge/munged.pid >"$DIR/run/munged.pid"   # ours: stop kills it
}

# --- /etc/hosts: the node names resolve to loopback ------------------------------------------------------
add_hosts() {
  local n
  for n in "${NODES[@]}"; do
    if ! getent hosts "$n" >/dev/null; then
      echo "127.0.0.1 $n $HOSTS_MARK" >>/etc/hosts
    fi
  done
}

remove_hosts() {
  grep -qF "$HOSTS_MARK" /etc/hosts 2>/dev/null || return 0
  # rewrite in place (the file may be a bind mount: keep its inode)
  local kept
  kept="$(grep -vF "$HOSTS_MARK" /etc/hosts || true)"
  printf '%s\n' "$kept" >/etc/hosts
}

# --- config --------------------------------------------------------------------------------------------
first_job_id() {
  # A cold-started controller restarts its job ids at FirstJobId: keep them increasing across clusters
  # (the clock, in seconds, modulo 60M: it wraps once in ~2 years) and above anything this DIR handed out
  # before, so that a new job id never names an older job's log folder.
  local clock saved=0
  clock=$(( $(date +%s) % 60000000 + 1000 ))
  [[ -s "$DIR/next_job_id" ]] && saved="$(tr -dc '0-9' <"$DIR/next_job_id")"
  saved="${saved:-0}"
  (( saved > 66000000 )) && saved=0
  echo $(( clock > saved ? clock : saved ))
}

write_conf() {
  local host cpus mem
  host="$(hostname -s)"
  cpus="${CXRDIST_SLURM_CPUS:-2}"
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
  mkdir -p "$DIR"/{state,spool/node1,spool/node2,run,log,bin}
  sed -e "s|@DIR@|$DIR|g" -e "s|@HOST@|$host|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
      -e "s|@NODE_PORT1@|$NODE_PORT1|g" -e "s|@NODE_PORT2@|$NODE_PORT2|g" \
      -e "s|@CPUS@|$cpus|g" -e "s|@MEM_MB@|$mem|g" -e "s|@FIRST_JOB_ID@|$(first_job_id)|g" \
      "$HERE/slurm.conf.in" >"$CONF.tmp"
  mv "$CONF.tmp" "$CONF"
  install -m 755 "$HERE/sacct" "$DIR/bin/sacct"
}

# --- state ---------------------------------------------------------------------------------------------
running() {
  alive "$(ctld_pid)" || return 1
  local n
  for n in "${NODES[@]}"; do alive "$(slurmd_pid "$n")" || return 1; done
  SLURM_CONF="$CONF" timeout 5 scontrol ping >/dev/null 2>&1
}

nodes_idle() {
  local states
  states="$(SLURM_CONF="$CONF" timeout 5 sinfo -h -N -o '%N %t' 2>/dev/null | sort -u)" || return 1
  # idle, or already running someone's job (mix/alloc) when reusing a live cluster
  [[ "$(grep -cE '^node[12] (idle|mix|alloc)$' <<<"$states")" == 2 ]]
}

start() {
  [[ $EUID -eq 0 ]] || die "must run as root (slurmd runs jobs as root here)"
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    || die "slurm-wlm / munge are not installed: run 'make slurm-deps'"
  if running && nodes_idle; then
    log "already running in $DIR"
    env_lines
    return 0
  fi
  stop_daemons quiet
  local t0=$SECONDS
  write_conf
  start_munge
  add_hosts
  rm -f "$DIR/log/"*.log
  slurmctld -c -f "$CONF" || die "slurmctld failed: $(tail -5 "$DIR/log/slurmctld.log" 2>/dev/null)"
  local n
  for n in "${NODES[@]}"; do
    slurmd -f "$CONF" -N "$n" || die "slurmd -N $n failed: $(tail -5 "$DIR/log/slurmd-$n.log" 2>/dev/null)"
  done
  for _ in $(seq 150); do nodes_idle && break; sleep 0.1; done
  if ! nodes_idle; then
    SLURM_CONF="$CONF" sinfo -N >&2 || true
    tail -5 "$DIR/log/slurmctld.log" >&2 || true
    die "nodes did not become idle"
  fi
  log "up in $((SECONDS - t0)) s: $DIR (slurmctld :$CTLD_PORT, slurmd node1 :$NODE_PORT1, node2 :$NODE_PORT2)"
  env_lines
}

stop_daemons() {
  local quiet="${1:-}" pid n
  if alive "$(ctld_pid)"; then
    # end this cluster's jobs first (their processes belong to our slurmd's steps), remember the id counter
    SLURM_CONF="$CONF" timeout 5 scancel --full --quiet --user=root 2>/dev/null || true
    for _ in $(seq 30); do
      [[ -z "$(SLURM_CONF="$CONF" timeout 5 squeue -h -o %i -t PD,R,CG,S 2>/dev/null)" ]] && break
      sleep 0.1
    done
    SLURM_CONF="$CONF" timeout 5 scontrol show config 2>/dev/null \
      | awk '/^NEXT_JOB_ID/ {print $3}' >"$DIR/next_job_id.tmp" && [[ -s "$DIR/next_job_id.tmp" ]] \
      && mv "$DIR/next_job_id.tmp" "$DIR/next_job_id" || rm -f "$DIR/next_job_id.tmp"
  fi
  local pids=()
  for n in "${NODES[@]}"; do pid="$(slurmd_pid "$n")"; alive "$pid" && pids+=("$pid"); done
  pid="$(ctld_pid)"; alive "$pid" && pids+=("$pid")
  if [[ ${#pids[@]} -gt 0 ]]; then
    kill "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 50); do
      local any=0
      for pid in "${pids[@]}"; do alive "$pid" && any=1; done
      [[ $any == 0 ]] && break
      sleep 0.1
    done
    for pid in "${pids[@]}"; do alive "$pid" && kill -9 "$pid" 2>/dev/null || true; done
  fi
  rm -f "$DIR/run/slurmctld.pid" "$DIR/run/slurmd-"*.pid
  [[ -z "$quiet" ]] && log "stopped ${#pids[@]} daemon(s) in $DIR"
  return 0
}

stop() {
  stop_daemons
  # munged only if this script started it
  local mpid
  mpid="$(pidof_file "$DIR/run/munged.pid")"
  if [[ -n "$mpid" ]] && alive "$mpid" && [[ "$(cat /proc/"$mpid"/comm 2>/dev/null)" == munged ]]; then
    kill "$mpid" 2>/dev/null || true
    for _ in $(seq 30); do alive "$mpid" || break; sleep 0.1; done
  fi
  rm -f "$DIR/run/munged.pid"
  remove_hosts
}

status() {
  local n
  echo "dir: $DIR"
  echo "slurmctld: $(alive "$(ctld_pid)" && echo "pid $(ctld_pid)" || echo down)"
  for n in "${NODES[@]}"; do
    echo "slurmd $n: $(alive "$(slurmd_pid "$n")" && echo "pid $(slurmd_pid "$n")" || echo down)"
  done
  echo "munge: $(munge_ok && echo ok || echo down)"
  if running; then
    SLURM_CONF="$CONF" sinfo -N -o '%N %P %t %c %G'
    env_lines
  else
    return 1
  fi
}

case "$CMD" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) env_lines ;;
  *) echo "usage: $0 start|stop|status|env [DIR]" >&2; exit 2 ;;
esac
