# Sourced by the example scripts: start mosquitto on a free loopback port with
# fedge's least-privilege ACL and one password per user (secret-<user>, also written
# to $out/<user>.password), and export FEDGE_BROKER / FEDGE_BROKER_PASSWORD for the
# coordinator. Needs $out (absolute) and the pids array of the caller's cleanup trap.
#
#   start_broker coordinator pi-1 pi-2
mosquitto_bin="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
passwd_bin="$(command -v mosquitto_passwd || echo /usr/bin/mosquitto_passwd)"
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start_broker() {
    local port user run_as=""
    port="$(free_port)"
    fedge broker acl > "$out/acl"
    : > "$out/passwd"
    for user in "$@"; do
        "$passwd_bin" -b "$out/passwd" "$user" "secret-$user"
        echo "secret-$user" > "$out/$user.password"
    done
    chmod 600 "$out/passwd" "$out"/*.password
    [ "$(id -u)" = 0 ] && run_as="user root"
    cat > "$out/mosquitto.conf" <<EOF
listener $port 127.0.0.1
allow_anonymous false
password_file $out/passwd
acl_file $out/acl
persistence false
# The coordinator hears every device on one subscription; the default queue of
# 1000 messages per client drops messages when a large fleet reports at once.
max_queued_messages 100000
$run_as
EOF
    "$mosquitto_bin" -c "$out/mosquitto.conf" > "$out/mosquitto.log" 2>&1 &
    pids+=($!)
    export FEDGE_BROKER="mqtt://127.0.0.1:$port" FEDGE_BROKER_PASSWORD="secret-coordinator"
}
