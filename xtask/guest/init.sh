#!/bin/sh
# PID 1 of a `cargo xtask kernels` guest. The kernel unpacked the whole root
# filesystem (Debian bookworm minbase) from the initramfs; the only modules
# are sock_diag's, for sticky's connection resets (/modules/, from the
# kernel's package). Results go to the second serial port, free of kernel
# messages.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# No tmpfs on /tmp: the root is already in memory, and the payload keeps
# files at their build-time paths, which may be under /tmp (a CI checkout).
mount -t tmpfs run /run
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
busybox ip link set lo up
for m in inet_diag tcp_diag; do
  [ -f /modules/$m.ko ] && busybox insmod /modules/$m.ko
done
# PID 1 starts with 1024 open files; the tests open more (as a login shell
# on the build machine may: 20000 there).
ulimit -n 20000
exec >/dev/ttyS1 2>&1
. /kernels/run.env
echo "kernel $(uname -r)"
python3 /kernels/probe.py | tee /tmp/probe
# A kernel sticky refuses gets no test run: every test would fail alike.
grep -q '^probe loads=yes' /tmp/probe || rm -f /kernels/tests/*
for t in /kernels/tests/*; do
  [ -e "$t" ] || continue
  echo "binary $(basename "$t")"
  timeout "$TEST_TIMEOUT" "$t" $TEST_ARGS
  echo "binary-exit $?"
done
echo "guest done"
sync
echo o >/proc/sysrq-trigger
sleep 30
