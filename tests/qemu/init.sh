#!/bin/busybox sh
# /init of the initramfs that tests/tests/old_kernel.rs boots under QEMU.
#
# It makes a CLOSE_WAIT leak of 3 sockets while `tcptrace watch --json` runs, then powers off.
# Everything the test reads is on the serial console, one line each, prefixed with "@@ ":
#   @@ uname R | @@ server-pid P | @@ clients-pid P | @@ refused-pid P | @@ oracle-close-wait N
#   @@ json {...} (tcptrace stdout) | @@ stderr ... (tcptrace stderr) | @@ tcptrace-exit RC
#   @@ fail WHAT (a step of this script went wrong) | @@ done (last line before power-off)

/bin/busybox --install -s /bin
export PATH=/bin

fail() { echo "@@ fail $*"; }

# Waits up to $2 tenths of a second for the shell condition $1 to hold.
wait_for() {
    n=0
    while ! eval "$1"; do
        [ "$n" -ge "$2" ] && return 1
        sleep 0.1
        n=$((n + 1))
    done
}

mount -t devtmpfs devtmpfs /dev || fail "mount devtmpfs"
mount -t proc proc /proc || fail "mount proc"
mount -t sysfs sysfs /sys || fail "mount sysfs"
mount -t tracefs tracefs /sys/kernel/tracing || fail "mount tracefs"
mount -t tmpfs tmpfs /tmp || fail "mount tmpfs"
ip link set lo up || fail "ip link set lo up"
echo "@@ uname $(uname -r)"

K=3
T=/tmp
# --duration is only a cap: the script stops tcptrace with SIGINT once enough snapshots are out.
/bin/tcptrace watch --json --interval 1 --leak-after 1 --duration 60 >$T/tt.out 2>$T/tt.err &
TT=$!
# The first snapshot means the programs are loaded and attached.
wait_for '[ -s $T/tt.out ] || ! kill -0 $TT 2>/dev/null' 600 || fail "no first snapshot from tcptrace"

if kill -0 $TT 2>/dev/null; then
    /bin/scenario leak-server --addr 127.0.0.1:0 --count $K >$T/srv.out 2>$T/srv.err &
    SRV=$!
    echo "@@ server-pid $SRV"
    wait_for 'grep -q "^READY " $T/srv.out' 300 || fail "leak-server not ready: $(cat $T/srv.err)"
    PORT=$(sed -n 's/^READY //p' $T/srv.out)

    /bin/scenario clients --to 127.0.0.1:$PORT --count $K >$T/cli.out 2>$T/cli.err &
    echo "@@ clients-pid $!"
    wait_for 'grep -q "^DONE" $T/cli.out' 300 || fail "clients not done: $(cat $T/cli.err)"
    wait_for 'grep -q "^ACCEPTED " $T/srv.out' 300 || fail "leak-server did not accept: $(cat $T/srv.err)"

    # Nothing listens on port 1 in this machine: every connect is refused.
    /bin/scenario refused --to 127.0.0.1:1 --count 2 >$T/ref.out 2>$T/ref.err &
    echo "@@ refused-pid $!"
    wait_for 'grep -q "^DONE" $T/ref.out' 300 || fail "refused not done: $(cat $T/ref.err)"

    # Oracle independent of tcptrace: CLOSE_WAIT (st 08) rows of /proc/net/tcp whose inode is
    # one of the leak-server's file descriptors.
    INODES=$(ls -l /proc/$SRV/fd | sed -n 's/.*socket:\[\([0-9]*\)\].*/\1/p' | tr '\n' ' ')
    CW=$(awk -v inodes="$INODES" '
        BEGIN { n = split(inodes, a, " "); for (i = 1; i <= n; i++) own[a[i]] = 1 }
        NR > 1 && $4 == "08" && ($10 in own) { c++ }
        END { print c + 0 }' /proc/net/tcp)
    echo "@@ oracle-close-wait $CW"

    # Three more snapshots: the sockets are then older than --leak-after 1.
    N0=$(wc -l <$T/tt.out)
    wait_for '[ $(wc -l <$T/tt.out) -ge $((N0 + 3)) ] || ! kill -0 $TT 2>/dev/null' 300 ||
        fail "tcptrace printed no 3 snapshots after the scenario"
    kill -INT $TT 2>/dev/null
fi
wait $TT
echo "@@ tcptrace-exit $?"
sed 's/^/@@ json /' $T/tt.out
sed 's/^/@@ stderr /' $T/tt.err
echo "@@ done"
poweroff -f
