"""Server architectures for the holder tests: who holds an accepted socket.

Every mode prints `READY <port>` once it listens (flushed), then status lines, then holds what
it holds until killed. Run as `python3 servers.py <mode> [args]`.

  prefork WORKERS EACH   the parent listens; WORKERS forked children accept EACH connections
                         each and keep them (`HELD <pid>` per worker); the parent accepts none
  fork K                 accepts K; each is handed to a forked child (`CHILD <pid>`) and the
                         parent closes its copy (`HANDED`)
  orphan K               like fork, but the children outlive the parent (the test kills them)
  exec K                 like fork, but the child execs `sleep` with the socket as its stdin
  scm K PATH             accepts K and sends each over the Unix socket PATH (SCM_RIGHTS) to a
                         `receiver`, then closes its copies (`HANDED`)
  receiver PATH          (not a listener) receives descriptors on PATH and keeps them
                         (`READY 0`, then `GOT <n>`)
  shared                 accepts 1, forks a child (`CHILD <pid>`); both keep the socket
  backlog                listens and never accepts
"""

import ctypes
import os
import signal
import socket
import sys
import time


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def die_with_parent():
    """A forked child dies when its parent is killed (the test kills the parent only)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def hold():
    while True:
        time.sleep(3600)


def listener():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s


def prefork(workers, each):
    s = listener()
    say("READY %d" % s.getsockname()[1])
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            die_with_parent()
            kept = [s.accept()[0] for _ in range(each)]
            say("HELD %d" % os.getpid())
            hold()
    hold()


def hand_off(k, exec_child, orphans=False):
    s = listener()
    say("READY %d" % s.getsockname()[1])
    for _ in range(k):
        conn, _ = s.accept()
        pid = os.fork()
        if pid == 0:
            if not orphans:
                die_with_parent()
            if exec_child:
                os.dup2(conn.fileno(), 0)
                os.execv("/bin/sleep", ["sleep", "1000000"])
            hold()
        conn.close()
        say("CHILD %d" % pid)
    say("HANDED")
    hold()


def scm(k, path):
    s = listener()
    say("READY %d" % s.getsockname()[1])
    u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    u.connect(path)
    for _ in range(k):
        conn, _ = s.accept()
        socket.send_fds(u, [b"x"], [conn.fileno()])
        conn.close()
    say("HANDED")
    hold()


def receiver(path):
    u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    u.bind(path)
    u.listen(1)
    say("READY 0")
    c, _ = u.accept()
    kept = []
    while True:
        msg, fds, _, _ = socket.recv_fds(c, 16, 16)
        if not msg:
            break
        kept.extend(fds)
        say("GOT %d" % len(kept))
    hold()


def shared():
    s = listener()
    say("READY %d" % s.getsockname()[1])
    conn, _ = s.accept()
    pid = os.fork()
    if pid == 0:
        die_with_parent()
        hold()
    say("CHILD %d" % pid)
    hold()


def backlog():
    s = listener()
    say("READY %d" % s.getsockname()[1])
    hold()


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "prefork":
        prefork(int(args[0]), int(args[1]))
    elif mode == "fork":
        hand_off(int(args[0]), False)
    elif mode == "exec":
        hand_off(int(args[0]), True)
    elif mode == "orphan":
        hand_off(int(args[0]), False, orphans=True)
    elif mode == "scm":
        scm(int(args[0]), args[1])
    elif mode == "receiver":
        receiver(args[0])
    elif mode == "shared":
        shared()
    elif mode == "backlog":
        backlog()
    else:
        sys.exit("unknown mode %r" % mode)


if __name__ == "__main__":
    main()
