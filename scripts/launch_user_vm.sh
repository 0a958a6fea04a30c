#!/bin/bash
#
# Launch one ACRN user VM with acrn-pydm, in the style of the scripts ACRN's configurator
# generates (misc/config_tools/launch_config): helper functions, then generators of device
# model parameters, then the VM's own parameters at the bottom.
#
# Unlike the generated scripts, this one cleans up after itself: taps it created are deleted
# and passthrough devices go back to the driver they had, whether the VM powers off, the
# device model fails, or the script gets SIGINT/SIGTERM (which it forwards to the device
# model, so the guest is asked to power off first).
#
# usage: launch_user_vm.sh [--dry-run]
#   --dry-run   print the device model command line (one shell-quoted line) and change
#               nothing on the system
# Environment (defaults in brackets):
#   ACRN_DM [acrn-pydm]   the device model binary: acrn-pydm, or acrn-dm itself
#   VM_HV [""]   acrn-pydm's backend (acrn, kvm or sim); empty: the device model's choice
#   VM_NAME [vm1]  VM_MEM [2048M]  VM_CPUS ["1 2"] (APIC ids, as ACRN's scripts)
#   VM_KERNEL, VM_INITRD, VM_BOOTARGS   boot a bzImage directly, or
#   VM_OVMF [/usr/share/acrn/bios/OVMF.fd]   boot firmware when VM_KERNEL is empty
#   VM_DISK [/var/lib/acrn-pydm/vm1.img]   virtio-blk image
#   VM_TAP [acrn_tap_vm1]   tap for virtio-net on acrn-br0 ("" for no network)
#   VM_MAC_SEED [<MAC of the first e* port>-<VM_NAME>]   seeds virtio-net's MAC (as
#               ACRN's generated scripts do), so VMs on one bridge get different MACs
#   VM_PT ["" ]   passthrough devices, e.g. "0000:00:02.0 0000:03:00.0"
#   PT_DRIVER [pci-stub with ACRN, vfio-pci otherwise]
#   VM_LOGGER ["console=4 kmsg=3"]   VM_MONITOR [/run/acrn-pydm/<name>.sock]
#   OWN_PCPU [n]   y: offline the VM's CPUs in the Service VM first (RTVM-style)

# The cleanup functions run from traps, which shellcheck cannot see.
# shellcheck disable=SC2317
set -u

DRY_RUN=n
if [ "${1:-}" = "--dry-run" ]; then
    DRY_RUN=y
fi

# Things to undo on exit, filled in by the helpers below.
created_taps=()
rebound_bdfs=()
rebound_drivers=()
dm_pid=""

# --- helper functions ------------------------------------------------------------------

run() {
    # Changes the system; skipped (and printed to stderr) in dry-run mode.
    if [ "${DRY_RUN}" = "y" ]; then
        echo "dry-run: $*" >&2
        return 0
    fi
    "$@"
}

probe_modules() {
    if [ "${PT_DRIVER}" = "pci-stub" ]; then
        run modprobe pci_stub
    else
        run modprobe vfio-pci
    fi
}

offline_cpus() {
    # Each parameter is an APIC id (decimal, as in /proc/cpuinfo) of a CPU given to the VM.
    # ACRN takes an offlined CPU away from the Service VM through the HSM's remove_cpu.
    local apicid processor_id cpu_path
    for apicid in "$@"; do
        processor_id=$(grep -B 15 "apicid.*: ${apicid}$" /proc/cpuinfo | grep "^processor" |
                       head -n 1 | cut -d ' ' -f 2)
        if [ -z "${processor_id}" ] || [ "${processor_id}" = "0" ]; then
            echo "warning: cannot offline the CPU with APIC id ${apicid}" >&2
            continue
        fi
        cpu_path="/sys/devices/system/cpu/cpu${processor_id}"
        if [ -f "${cpu_path}/online" ] && [ "$(cat "${cpu_path}/online")" = "1" ]; then
            run sh -c "echo 0 > ${cpu_path}/online"
            if [ -e /sys/devices/virtual/misc/acrn_hsm/remove_cpu ]; then
                run sh -c "echo ${processor_id} > /sys/devices/virtual/misc/acrn_hsm/remove_cpu"
            fi
        fi
    done
}

unbind_device() {
    # Hand a PCI device (0000:BB:DD.F) to PT_DRIVER, remembering its driver for cleanup.
    local bdf=$1 dev="/sys/bus/pci/devices/$1" old=""
    if [ ! -e "${dev}" ] && [ "${DRY_RUN}" = "n" ]; then
        echo "error: no PCI device ${bdf}" >&2
        return 1
    fi
    if [ -e "${dev}/driver" ]; then
        old=$(basename "$(readlink -f "${dev}/driver")")
    fi
    if [ "${old}" = "${PT_DRIVER}" ]; then
        return 0
    fi
    if [ -n "${old}" ]; then
        run sh -c "echo ${bdf} > ${dev}/driver/unbind" || return 1
    fi
    run sh -c "echo ${PT_DRIVER} > ${dev}/driver_override" || return 1
    run sh -c "echo ${bdf} > /sys/bus/pci/drivers/${PT_DRIVER}/bind" || return 1
    rebound_bdfs+=("${bdf}")
    rebound_drivers+=("${old}")
}

rebind_devices() {
    local i bdf old dev
    for i in "${!rebound_bdfs[@]}"; do
        bdf=${rebound_bdfs[$i]}
        old=${rebound_drivers[$i]}
        dev="/sys/bus/pci/devices/${bdf}"
        run sh -c "echo ${bdf} > ${dev}/driver/unbind"
        run sh -c "echo > ${dev}/driver_override"
        if [ -n "${old}" ]; then
            run sh -c "echo ${bdf} > /sys/bus/pci/drivers/${old}/bind" ||
                echo "warning: could not give ${bdf} back to ${old}" >&2
        fi
    done
}

create_tap() {
    # One tap per VM on the bridge acrn-br0 (systemd/network/ sets the bridge up).
    local tap=$1
    if ip link show dev "${tap}" >/dev/null 2>&1; then
        echo "${tap}: tap already exists, reusing it" >&2
    else
        run ip tuntap add dev "${tap}" mode tap || return 1
        created_taps+=("${tap}")
    fi
    if ip link show dev acrn-br0 >/dev/null 2>&1; then
        run ip link set dev "${tap}" master acrn-br0
    else
        echo "warning: no bridge acrn-br0; ${tap} is not connected" >&2
    fi
    run ip link set dev "${tap}" up
}

service_vm_mac() {
    # The MAC of the Service VM's first wired port, as ACRN's generated scripts read it
    # (mac=$(cat /sys/class/net/e*/address), ${mac:0:17}); nothing if it has none.
    local addr
    for addr in /sys/class/net/e*/address; do
        if [ -r "${addr}" ]; then
            head -c 17 "${addr}"
            return 0
        fi
    done
}

delete_taps() {
    local tap
    for tap in "${created_taps[@]}"; do
        run ip link delete "${tap}" || echo "warning: could not delete tap ${tap}" >&2
    done
}

cleanup() {
    trap - EXIT INT TERM
    if [ -n "${dm_pid}" ] && kill -0 "${dm_pid}" 2>/dev/null; then
        kill -TERM "${dm_pid}"
        wait "${dm_pid}"
    fi
    rebind_devices
    delete_taps
}

forward_signal() {
    # The device model asks the guest to power off, then we clean up when it exits.
    if [ -n "${dm_pid}" ]; then
        kill -TERM "${dm_pid}" 2>/dev/null
    fi
}

# --- generators of device model parameters (each appends to dm_params) ------------------

dm_params=()

add_cpus() {
    # Parameters: APIC ids of the VM's CPUs.
    if [ "${OWN_PCPU}" = "y" ]; then
        offline_cpus "$@"
    fi
    local IFS=,
    dm_params+=(--cpu_affinity "$*")
}

add_memory() {
    dm_params+=(-m "$1")
}

add_logger_settings() {
    # Parameters: logger=level pairs, e.g. console=4 kmsg=3 disk=5.
    local loggers=() conf
    for conf in "$@"; do
        loggers+=("${conf%=*},level=${conf#*=}")
    done
    local IFS=';'
    dm_params+=(--logger_setting "${loggers[*]}")
}

add_virtual_device() {
    # Parameters: slot, emulation, options (acrn-dm syntax).
    local slot=$1 kind=$2 options=${3:-}
    if [ "${kind}" = "virtio-net" ] && [[ ${options} =~ tap=([^,]+) ]]; then
        create_tap "${BASH_REMATCH[1]}" || return 1
    fi
    if [ -n "${options}" ]; then
        dm_params+=(-s "${slot},${kind},${options}")
    else
        dm_params+=(-s "${slot},${kind}")
    fi
}

add_passthrough_device() {
    # Parameters: slot, host BDF (0000:BB:DD.F), options. acrn-dm wants bus/dev/func in hex.
    local slot=$1 bdf=$2 options=${3:-} bus dev fun entry
    unbind_device "${bdf}" || return 1
    bus=$((16#$(echo "${bdf}" | cut -d: -f2)))
    dev=$((16#$(echo "${bdf}" | cut -d: -f3 | cut -d. -f1)))
    fun=$((16#${bdf##*.}))
    entry=$(printf '%s,passthru,%x/%x/%x' "${slot}" "${bus}" "${dev}" "${fun}")
    if [ -n "${options}" ]; then
        entry="${entry},${options}"
    fi
    dm_params+=(-s "${entry}")
}

# --- this VM ---------------------------------------------------------------------------

ACRN_DM=${ACRN_DM:-acrn-pydm}
VM_NAME=${VM_NAME:-vm1}
VM_HV=${VM_HV:-}
VM_MEM=${VM_MEM:-2048M}
VM_CPUS=${VM_CPUS:-1 2}
VM_KERNEL=${VM_KERNEL:-}
VM_INITRD=${VM_INITRD:-}
VM_BOOTARGS=${VM_BOOTARGS:-console=ttyS0 root=/dev/vda rw}
VM_OVMF=${VM_OVMF:-/usr/share/acrn/bios/OVMF.fd}
VM_DISK=${VM_DISK:-/var/lib/acrn-pydm/${VM_NAME}.img}
VM_TAP=${VM_TAP-acrn_tap_${VM_NAME}}
if [ -z "${VM_MAC_SEED:-}" ]; then
    sos_mac=$(service_vm_mac)
    VM_MAC_SEED="${sos_mac:+${sos_mac}-}${VM_NAME}"
fi
VM_PT=${VM_PT:-}
VM_LOGGER=${VM_LOGGER:-console=4 kmsg=3}
VM_MONITOR=${VM_MONITOR:-/run/acrn-pydm/${VM_NAME}.sock}
OWN_PCPU=${OWN_PCPU:-n}
if [ -e /dev/acrn_hsm ] || [ -e /dev/acrn_vhm ]; then
    PT_DRIVER=${PT_DRIVER:-pci-stub}
else
    PT_DRIVER=${PT_DRIVER:-vfio-pci}
fi

trap cleanup EXIT
trap forward_signal INT TERM

if [ -n "${VM_PT}" ]; then
    probe_modules
fi

if [ -n "${VM_HV}" ]; then
    dm_params+=(--hv "${VM_HV}")
fi
read -r -a cpus <<< "${VM_CPUS}"
add_cpus "${cpus[@]}"
add_memory "${VM_MEM}"
if [ -n "${VM_KERNEL}" ]; then
    dm_params+=(-k "${VM_KERNEL}" -B "${VM_BOOTARGS}")
    if [ -n "${VM_INITRD}" ]; then
        dm_params+=(-r "${VM_INITRD}")
    fi
else
    dm_params+=(--ovmf "${VM_OVMF}")
fi
add_virtual_device 0:0 hostbridge
add_virtual_device 1:0 lpc
dm_params+=(-l "com1,stdio")
add_virtual_device 3 virtio-blk "${VM_DISK}"
if [ -n "${VM_TAP}" ]; then
    add_virtual_device 4 virtio-net "tap=${VM_TAP},mac_seed=${VM_MAC_SEED}" || exit 1
fi
slot=6
for bdf in ${VM_PT}; do
    add_passthrough_device "${slot}" "${bdf}" || exit 1
    slot=$((slot + 1))
done
read -r -a loggers <<< "${VM_LOGGER}"
add_logger_settings "${loggers[@]}"
dm_params+=(--cmd_monitor "${VM_MONITOR}")
dm_params+=("${VM_NAME}")

if [ "${DRY_RUN}" = "y" ]; then
    printf '%q ' "${ACRN_DM}" "${dm_params[@]}"
    echo
    exit 0
fi

echo "Launch device model with parameters: ${dm_params[*]}"
# explicit <&0: a background job would otherwise read /dev/null (com1,stdio needs stdin)
"${ACRN_DM}" "${dm_params[@]}" <&0 &
dm_pid=$!
# wait returns early when a trapped signal arrives; keep waiting for the device model
while true; do
    wait "${dm_pid}"
    status=$?
    if ! kill -0 "${dm_pid}" 2>/dev/null; then
        break
    fi
done
dm_pid=""
exit "${status}"
