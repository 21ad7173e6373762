#!/bin/sh
# PID 1 of an smfs-testbed guest (installed as /sbin/smfs-init): mounts, loads modules, configures
# the NIC from the kernel command line (smfs_ip=ADDR/LEN smfs_gw=ADDR smfs_host=NAME), mounts the
# data disk at /data, starts qemu-guest-agent, then reaps orphans forever.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PYTHONPATH=/opt/smfs-testbed HOME=/root LANG=C.UTF-8
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sys /sys
mountpoint -q /dev || mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
ln -sf /proc/self/fd /dev/fd

ip= gw= host=smfs
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        smfs_ip=*) ip="${arg#smfs_ip=}" ;;
        smfs_gw=*) gw="${arg#smfs_gw=}" ;;
        smfs_host=*) host="${arg#smfs_host=}" ;;
    esac
done
hostname "$host"
echo "$host" > /etc/hostname

modprobe -a @MODULES@ 2>/dev/null

ip link set lo up
ip link set eth0 up
[ -n "$ip" ] && ip addr add "$ip" dev eth0
[ -n "$gw" ] && ip route add default via "$gw"
sysctl -qw net.core.rmem_max=16777216 net.core.wmem_max=16777216

mkdir -p /data
if [ -b /dev/vdb ]; then
    # The data disk's filesystem is the spec's testbed.data_fs (minix or ext4), found by its signature.
    # A disk with no filesystem gets ext4; one that will not mount is left alone (never reformatted:
    # after a power cut its contents are the evidence).
    fs=$(blkid -o value -s TYPE /dev/vdb 2>/dev/null)
    if [ -z "$fs" ]; then mkfs.ext4 -q -F -L smfs-data /dev/vdb && fs=ext4; fi
    mount -t "$fs" /dev/vdb /data || echo "smfs-init: cannot mount the data disk (${fs:-unknown})" >/dev/console
fi

mkdir -p /dev/virtio-ports
for port in /sys/class/virtio-ports/*; do
    [ -e "$port/name" ] && ln -sf "../${port##*/}" "/dev/virtio-ports/$(cat "$port/name")"
done
qemu-ga -d -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -f /run/qemu-ga.pid -l /run/qemu-ga.log
echo "smfs-init: ready" > /dev/console

exec python3 -c '
import os, time
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(1)
    except InterruptedError:
        pass
'
