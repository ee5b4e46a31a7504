/* Leaks CLOSE_WAIT sockets from functions with distinctive names, through two call paths
 * each (3 sockets through path_alpha, 2 through path_beta), for the --stacks test.
 *
 *   leakstacks connect   connects 5 times to a listener of its own, which closes its side:
 *                        the connected sockets stay in CLOSE_WAIT, opened by connect() in
 *                        tcptrace_test_leaky_connect
 *   leakstacks accept    a child connects 5 times and closes; the parent accepted them in
 *                        tcptrace_test_leaky_accept and keeps them in CLOSE_WAIT
 *   leakstacks handoff   as accept, but each accepted socket is handed by SCM_RIGHTS to a
 *                        holder process (this program exec'd as `leakstacks hold`) and the
 *                        acceptor closes its copy: the holder keeps the 5 in CLOSE_WAIT.
 *                        Prints "READY <port> <holder pid>".
 *
 * Prints "READY <port>" once every socket is in CLOSE_WAIT, then waits until killed.
 * Built with -O0 -g -fno-omit-frame-pointer: every call keeps its frame. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static int listener;
static struct sockaddr_in addr;

static void die(const char *what) {
    perror(what);
    exit(1);
}

__attribute__((noinline)) int tcptrace_test_leaky_connect(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
    /* The listener's side is accepted and closed at once: ours goes to CLOSE_WAIT. */
    int peer = accept(listener, NULL, NULL);
    if (peer < 0) die("accept");
    close(peer);
    return fd;
}

__attribute__((noinline)) int tcptrace_test_leaky_accept(void) {
    int fd = accept(listener, NULL, NULL);
    if (fd < 0) die("accept");
    return fd;
}

__attribute__((noinline)) void path_alpha(int (*open_one)(void)) {
    for (int i = 0; i < 3; i++) open_one();
}

__attribute__((noinline)) void path_beta(int (*open_one)(void)) {
    for (int i = 0; i < 2; i++) open_one();
}

/* The holder: receives descriptors on fd 3 and keeps them until the acceptor goes away (the
 * socketpair closes): a test that stops the acceptor leaves nothing behind. */
static int hold(void) {
    for (;;) {
        char byte;
        char ctl[CMSG_SPACE(sizeof(int))];
        struct iovec iov = {.iov_base = &byte, .iov_len = 1};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl,
                             .msg_controllen = sizeof ctl};
        if (recvmsg(3, &msg, 0) <= 0) break;
    }
    return 0;
}

static int holder_sock = -1;

static void hand_off(int fd) {
    char byte = 'x';
    char ctl[CMSG_SPACE(sizeof(int))];
    memset(ctl, 0, sizeof ctl);
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl,
                         .msg_controllen = sizeof ctl};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
    if (sendmsg(holder_sock, &msg, 0) != 1) die("sendmsg");
    close(fd);
}

__attribute__((noinline)) int tcptrace_test_handed_off_accept(void) {
    int fd = accept(listener, NULL, NULL);
    if (fd < 0) die("accept");
    hand_off(fd);
    return fd;
}

int main(int argc, char **argv) {
    if (argc == 2 && !strcmp(argv[1], "hold")) return hold();
    if (argc != 2 || (strcmp(argv[1], "connect") && strcmp(argv[1], "accept") &&
                      strcmp(argv[1], "handoff"))) {
        fprintf(stderr, "usage: leakstacks connect|accept|handoff\n");
        return 2;
    }
    pid_t holder = 0;
    if (!strcmp(argv[1], "handoff")) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_DGRAM, 0, sv) < 0) die("socketpair");
        holder = fork();
        if (holder < 0) die("fork");
        if (holder == 0) {
            /* Killed with the acceptor too, whatever happens to the socketpair. */
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            close(sv[0]);
            if (dup2(sv[1], 3) < 0) die("dup2");
            execl("/proc/self/exe", argv[0], "hold", (char *)NULL);
            die("exec");
        }
        close(sv[1]);
        holder_sock = sv[0];
    }
    listener = socket(AF_INET, SOCK_STREAM, 0);
    if (listener < 0) die("socket");
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (listen(listener, 16) < 0) die("listen");
    if (getsockname(listener, (struct sockaddr *)&addr, &len) < 0) die("getsockname");
    if (!strcmp(argv[1], "connect")) {
        path_alpha(tcptrace_test_leaky_connect);
        path_beta(tcptrace_test_leaky_connect);
    } else {
        int handoff = holder_sock >= 0;
        pid_t child = fork();
        if (child < 0) die("fork");
        if (child == 0) {
            close(listener);
            int fds[5];
            for (int i = 0; i < 5; i++) {
                fds[i] = socket(AF_INET, SOCK_STREAM, 0);
                if (fds[i] < 0 || connect(fds[i], (struct sockaddr *)&addr, sizeof addr) < 0)
                    die("child connect");
            }
            for (int i = 0; i < 5; i++) close(fds[i]);
            _exit(0);
        }
        if (handoff) {
            path_alpha(tcptrace_test_handed_off_accept);
            path_beta(tcptrace_test_handed_off_accept);
        } else {
            path_alpha(tcptrace_test_leaky_accept);
            path_beta(tcptrace_test_leaky_accept);
        }
        waitpid(child, NULL, 0);
    }
    /* Let the peers' FINs arrive. */
    usleep(200 * 1000);
    if (holder)
        printf("READY %d %d\n", ntohs(addr.sin_port), (int)holder);
    else
        printf("READY %d\n", ntohs(addr.sin_port));
    fflush(stdout);
    for (;;) pause();
}
