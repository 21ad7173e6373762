#!/bin/busybox sh
# initrd PID 1: load the modules that mount the root disk, then hand over to /sbin/smfs-init.
/bin/busybox mkdir -p /proc /sys /dev /newroot
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev
for m in $(/bin/busybox cat /modules.list); do
    /bin/busybox insmod "/modules/$m.ko" 2>/dev/null || echo "initrd: insmod $m failed"
done
root=/dev/vda
for arg in $(/bin/busybox cat /proc/cmdline); do
    case "$arg" in root=/dev/*) root="${arg#root=}" ;; esac
done
i=0
while [ ! -b "$root" ] && [ $i -lt 200 ]; do /bin/busybox usleep 20000; i=$((i + 1)); done
/bin/busybox mount -t ext4 -o rw "$root" /newroot || { echo "initrd: cannot mount $root"; exec /bin/busybox sh; }
/bin/busybox mount --move /dev /newroot/dev
/bin/busybox umount /proc
exec /bin/busybox switch_root /newroot /sbin/smfs-init
