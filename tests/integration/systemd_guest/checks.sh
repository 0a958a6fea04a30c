# Runs inside the systemd guest (devicemodel/guestkit/systemd_guest.py prepends `section`).
# It does what a user of acrn-pydm does on a Service VM and prints what systemd shows, in
# sections; tests/integration/test_systemd_guest.py judges them. Nothing here decides
# pass or fail: every wait is bounded, and a step that goes wrong still prints its section.
T=/root/guest-check
U1=acrn-pydm@vm1
U2=acrn-pydm@vm2
export SYSTEMD_PAGER='' SYSTEMD_COLORS=0 LC_ALL=C.UTF-8

show() {
    systemctl show -p ActiveState,SubState,StatusText,NRestarts,Result,MainPID \
        -p ExecMainCode,ExecMainStatus "$@"
}
mainpid() { systemctl show -p MainPID --value "$1"; }
state() { systemctl show -p ActiveState --value "$1"; }
now() { date +%s.%N; }
elapsed() { echo "elapsed $(echo "$(now) $1" | awk '{printf "%.2f", $1 - $2}')"; }
cursor() { journalctl -n 0 --show-cursor -q | sed -n 's/^-- cursor: //p'; }
# the unit's journal since a cursor: what systemd says and what the service printed
journal_since() { journalctl --no-pager -o cat -u "$1" --after-cursor="$2"; }
# only what the service's process of one invocation printed
service_lines() {
    journalctl --no-pager -o cat _SYSTEMD_INVOCATION_ID="$(systemctl show -p InvocationID \
        --value "$1")"
}
wait_until() {  # wait_until SECONDS cmd...: poll cmd every 0.2 s
    local deadline=$(( $(date +%s) + $1 ))
    shift
    until "$@"; do
        [ "$(date +%s)" -ge "$deadline" ] && return 1
        sleep 0.2
    done
}
is_active() { [ "$(state "$1")" = active ]; }
restarted_from() { local p; p=$(mainpid "$1"); [ "$p" != "$2" ] && [ "$p" != 0 ] && is_active "$1"; }
left_active() { [ "$(state "$1")" != active ] || [ "$(mainpid "$1")" != "$2" ]; }
tap_fds() {  # the taps a process has open (fdinfo of /dev/net/tun says iff: NAME)
    local fd
    for fd in /proc/"$1"/fd/*; do
        if [ "$(readlink "$fd")" = /dev/net/tun ]; then
            grep '^iff:' /proc/"$1"/fdinfo/"${fd##*/}"
        fi
    done
}
after_restart() {  # what a restarted vm1 holds: its monitor, its tap, its lock
    local pid
    pid=$(mainpid $U1)
    echo "mainpid $pid"
    echo "lock $(cat /run/acrn-pydm/vm1.lock)"
    tap_fds "$pid"
    python3 $T/monitor.py /run/acrn-pydm/vm1.sock status
    python3 $T/monitor.py --connect /run/acrn-pydm/vm1-con.sock
}

section boot-time cat /proc/uptime  # seconds from kernel start to these checks

# --- installed as a user would: the wheel with pip, the units as a package ships them -----
section versions sh -c 'python3 --version; systemctl --version | head -n 1;
    dpkg-query -W python3-trio python3-construct python3-pyudev'
section install python3 -m pip install --no-index --break-system-packages \
    --disable-pip-version-check $T/acrn_pydm-*.whl
section which sh -c 'command -v acrn-pydm && acrn-pydm --version'
install -D -m 0644 $T/systemd/acrn-pydm@.service /usr/lib/systemd/system/acrn-pydm@.service
install -d /usr/lib/systemd/network
install -m 0644 $T/systemd/network/* /usr/lib/systemd/network/
install -d -m 0755 /etc/acrn-pydm /var/lib/acrn-pydm
install -m 0644 $T/vm1.toml $T/vm2.toml /etc/acrn-pydm/
truncate -s 64M /var/lib/acrn-pydm/vm1.img /var/lib/acrn-pydm/vm2.img
systemctl daemon-reload
networkctl reload
wait_until 60 ip link show acrn_tap0 >/dev/null 2>&1
wait_until 60 sh -c 'ip -o link show | grep -q "master acrn-br0"'
section networkd sh -c 'ip -o link show; networkctl list --no-pager'

# --- 1: start; active only after READY=1; STATUS= in systemctl status ---------------------
t0=$(now)
systemctl start --no-block $U1
states=""
last=""
until [ "$last" = active ] || [ "$last" = failed ]; do
    s=$(state $U1)
    [ "$s" != "$last" ] && states="$states $s" && last=$s
    if [ "$(echo "$(now) $t0" | awk '{print ($1 - $2 > 180)}')" = 1 ]; then break; fi
    sleep 0.05
done
section start-states echo "states$states"
section start-time sh -c "echo 'since start: $(elapsed "$t0")';
    systemctl show -p ExecMainStartTimestampMonotonic,ActiveEnterTimestampMonotonic $U1"
section start-show show $U1
section start-status systemctl status --no-pager -l -n 0 $U1
PID1=$(mainpid $U1)
section start-monitor python3 $T/monitor.py /run/acrn-pydm/vm1.sock status devices
section start-console python3 $T/monitor.py --connect /run/acrn-pydm/vm1-con.sock
fds_of() { ls -l /proc/"$1"/fd | sed -n 's/.* -> //p'; tap_fds "$1"; }
section start-fds fds_of "$PID1"
section start-links ip -o link show
section start-journal journalctl --no-pager -o cat -u $U1

# --- 4: the sandbox is applied to the running service, and bites --------------------------
section sandbox-status grep -E '^(Seccomp|Seccomp_filters|NoNewPrivs|Cap[A-Za-z]+):' \
    /proc/"$PID1"/status
section sandbox-mountinfo cat /proc/"$PID1"/mountinfo
section sandbox-mntns readlink /proc/1/ns/mnt /proc/"$PID1"/ns/mnt
section sandbox-security systemd-analyze security --no-pager $U1
# the same unit with the probe as its program: what the sandbox lets a process do
sed -e "s|^ExecStart=.*|ExecStart=/usr/bin/python3 $T/probe.py|" -e 's/^Type=notify/Type=oneshot/' \
    -e '/^WatchdogSec=/d' -e '/^Restart=/d' -e '/^NotifyAccess=/d' \
    -e 's/^SyslogIdentifier=.*/SyslogIdentifier=acrn-pydm-probe/' \
    /usr/lib/systemd/system/acrn-pydm@.service > /run/systemd/system/acrn-pydm-probe@.service
systemctl daemon-reload
cur=$(cursor)
section probe-start systemctl start acrn-pydm-probe@vm1
section probe-output journalctl --no-pager -o cat --after-cursor="$cur" \
    SYSLOG_IDENTIFIER=acrn-pydm-probe
section probe-tmp sh -c 'ls /tmp/acrn-pydm-probe 2>&1; ls /var/lib/acrn-pydm'

# --- 2: watchdog (SIGSTOP) and crash (SIGKILL) ---------------------------------------------
cur=$(cursor)
t0=$(now)
kill -STOP "$PID1"
wait_until 120 left_active $U1 "$PID1"
t_kill=$(elapsed "$t0")
wait_until 120 restarted_from $U1 "$PID1"
section watchdog-time echo "killed: $t_kill; active again: $(elapsed "$t0")"
section watchdog-show show $U1
section watchdog-journal journal_since $U1 "$cur"
section watchdog-after after_restart

PID2=$(mainpid $U1)
cur=$(cursor)
t0=$(now)
kill -KILL "$PID2"
wait_until 120 restarted_from $U1 "$PID2"
section crash-time echo "active again: $(elapsed "$t0")"
section crash-show show $U1
section crash-journal journal_since $U1 "$cur"
section crash-after after_restart

# --- 3: a second instance refuses; two VMs side by side; stop --------------------------------
section duplicate acrn-pydm run /etc/acrn-pydm/vm1.toml
section vm2-start systemctl start $U2
section vm2-show show $U2
section vm2-journal service_lines $U2
section vm2-disk-log sh -c 'ls /var/log/acrn-dm; grep -c "VM vm2 running" /var/log/acrn-dm/vm2.log'
section macs sh -c "python3 $T/monitor.py /run/acrn-pydm/vm1.sock devices;
    python3 $T/monitor.py /run/acrn-pydm/vm2.sock devices"
section bridge-ports ip -o link show master acrn-br0
cur=$(cursor)
t0=$(now)
section stop systemctl stop $U1
section stop-time elapsed "$t0"
section stop-show show $U1
section stop-journal journal_since $U1 "$cur"
section stop-leftovers sh -c 'ls -l /run/acrn-pydm; ip -o link show acrn_tap0'

# --- 6: errors at start are one line in the journal and the unit fails ----------------------
start_failing() {  # start_failing NAME VMFILE: vm1 with a broken VM file
    local rc
    systemctl reset-failed $U1 2>/dev/null
    if [ -n "$2" ]; then
        install -m 0644 "$2" /etc/acrn-pydm/vm1.toml
    else
        rm -f /etc/acrn-pydm/vm1.toml
    fi
    local t0
    t0=$(now)
    timeout 150 systemctl start $U1
    rc=$?
    echo "start rc=$rc $(elapsed "$t0")"
    sleep 1  # let a restart (which must not come) be scheduled
    show $U1
    echo "--- service"
    service_lines $U1
    echo "--- err"
    journalctl --no-pager -o cat -p err -u $U1 _SYSTEMD_INVOCATION_ID="$(systemctl show \
        -p InvocationID --value $U1)"
}
section error-image start_failing image $T/vm1-missing-image.toml
section error-tap start_failing tap $T/vm1-busy-tap.toml
section error-file start_failing file $T/vm1-bad.toml
section error-nofile start_failing nofile ""
install -m 0644 $T/vm1.toml /etc/acrn-pydm/vm1.toml
systemctl reset-failed $U1 2>/dev/null
section vm2-stop systemctl stop $U2

# --- 5: the launch script, dry-run and for real on the sim backend ---------------------------
export VM_NAME=vm3 VM_HV=sim VM_CPUS=1 VM_MEM=128M VM_KERNEL=$T/vmlinuz VM_DISK=/var/lib/acrn-pydm/vm3.img
truncate -s 64M "$VM_DISK"
section launch-dry bash $T/launch_user_vm.sh --dry-run
bash $T/launch_user_vm.sh > /run/launch.log 2>&1 &
launch=$!
wait_until 120 test -S /run/acrn-pydm/vm3.sock
section launch-running sh -c "python3 $T/monitor.py /run/acrn-pydm/vm3.sock status devices;
    ip -o link show acrn_tap_vm3"
section launch-poweroff python3 $T/monitor.py /run/acrn-pydm/vm3.sock poweroff-force
wait_until 120 sh -c "! kill -0 $launch 2>/dev/null"
wait $launch
launch_rc=$?
section launch-exit sh -c "echo script rc=$launch_rc; cat /run/launch.log; ip link show acrn_tap_vm3"
section end true
