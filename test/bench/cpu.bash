# Shared by the instruction-count benches (sourced, not run: scripts/bench
# runs only *.sh): a cluster of their own, stopped while a single-user
# backend runs a file of SQL under valgrind's callgrind. Instruction counts
# move by less than 0.1 % between runs, where the throughput of a shared
# 2-core VM moves by a fifth, so these rows show what a change saves.
#
#   cpu_cluster          init and start a cluster in $cpu_work (loyalty
#                        preloaded); the caller feeds it SQL (cpu_psql), then
#                        cpu_stop stops it for the single-user runs
#   cpu_ir FILE          instructions of a single-user backend running FILE
#                        (start-up and shut-down included: see cpu_empty)
#   cpu_empty            instructions of start-up and shut-down alone

command -v valgrind >/dev/null || { echo "valgrind is missing (scripts/setup bench)" >&2; exit 1; }
cpu_bindir=$(pg_config --bindir)
cpu_work=$(mktemp -d /tmp/loyalty_cpu.XXXXXX)
cpu_as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" -eq 0 ] && chown postgres: "$cpu_work"
cpu_stop() { cpu_as_pg "$cpu_bindir/pg_ctl" -D "$cpu_work/data" -m fast -w stop >/dev/null 2>&1 || true; }
trap 'cpu_stop; rm -rf "$cpu_work"' EXIT

cpu_cluster() {
    cpu_as_pg "$cpu_bindir/initdb" -D "$cpu_work/data" -A trust -U postgres >/dev/null
    cat >> "$cpu_work/data/postgresql.conf" <<CONF
shared_preload_libraries = 'loyalty'
listen_addresses = ''
unix_socket_directories = '$cpu_work'
shared_buffers = 256MB
synchronous_commit = off
CONF
    cpu_as_pg "$cpu_bindir/pg_ctl" -D "$cpu_work/data" -l "$cpu_work/log" -w start >/dev/null
}

cpu_psql() { cpu_as_pg psql -X -q -v ON_ERROR_STOP=1 -h "$cpu_work" -d postgres >/dev/null; }

cpu_ir() {
    chmod a+r "$1"
    cpu_as_pg valgrind --tool=callgrind --callgrind-out-file=/dev/null "$cpu_bindir/postgres" --single \
        -D "$cpu_work/data" postgres < "$1" 2>&1 >"$1.out" | sed -n 's/.*refs: *//p' | tr -d ,
    ! grep -h ERROR "$1.out" >&2
}

cpu_empty() {
    cpu_as_pg valgrind --tool=callgrind --callgrind-out-file=/dev/null "$cpu_bindir/postgres" --single \
        -D "$cpu_work/data" postgres < /dev/null 2>&1 | sed -n 's/.*refs: *//p' | tr -d ,
}
