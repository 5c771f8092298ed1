/* The smaller system calls of minikernel part 2, each checked against what
 * the program itself can see and printed in a fixed form, so that a run
 * inside the minikernel prints exactly what a native run does: mremap
 * (growth in place, move, shrink, MREMAP_FIXED), creat, mknodat, select,
 * pselect6, poll and epoll on pipes and sockets, an AF_UNIX socketpair
 * passing a descriptor with SCM_RIGHTS, a loopback TCP echo (bind to port 0,
 * getsockname, connect, accept4, getpeername, sendto/recvfrom, shutdown,
 * get/setsockopt), /proc/self/exe and /proc/self/cmdline, and a fork/exec
 * chain. Usage: calls DIR [chain N]. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <arpa/inet.h>
#include <unistd.h>

#define CHECK(what, cond) printf("%-44s %s\n", what, (cond) ? "ok" : "FAILED")

static void test_mremap(void) {
    long pg = 4096;
    /* Reserve room after the mapping so it can grow in place. */
    char *hole = mmap(NULL, 16 * pg, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    munmap(hole + 4 * pg, 12 * pg);
    char *p = mmap(hole, 4 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    for (int i = 0; i < 4; i++) p[i * pg] = 'a' + i;
    char *q = mremap(p, 4 * pg, 8 * pg, 0);
    CHECK("mremap grows in place", q == p && q[3 * pg] == 'd');
    q[7 * pg] = 'h';
    /* Block the room after, then grow with MAYMOVE: it must move. */
    char *block = mmap(q + 8 * pg, pg, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    errno = 0;
    char *r = mremap(q, 8 * pg, 64 * pg, 0);
    CHECK("mremap without MAYMOVE fails ENOMEM", r == MAP_FAILED && errno == ENOMEM);
    r = mremap(q, 8 * pg, 64 * pg, MREMAP_MAYMOVE);
    int moved_ok = r != MAP_FAILED && r != q && r[0] == 'a' && r[3 * pg] == 'd' && r[7 * pg] == 'h' && r[63 * pg] == 0;
    CHECK("mremap MAYMOVE moves the contents", moved_ok);
    r[63 * pg] = 'z';
    CHECK("the old range is gone after a move", msync(q, pg, MS_ASYNC) == -1 && errno == ENOMEM);
    char *s = mremap(r, 64 * pg, 2 * pg, 0);
    CHECK("mremap shrinks in place", s == r && s[pg] == 'b');
    CHECK("the cut-off part is gone", msync(r + 2 * pg, pg, MS_ASYNC) == -1 && errno == ENOMEM);
    char *target = mmap(NULL, 2 * pg, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *f = mremap(s, 2 * pg, 2 * pg, MREMAP_MAYMOVE | MREMAP_FIXED, target);
    CHECK("MREMAP_FIXED moves onto the given address", f == target && f[0] == 'a' && f[pg] == 'b');
    errno = 0;
    CHECK("mremap of unmapped memory is EFAULT", mremap(s, pg, 2 * pg, MREMAP_MAYMOVE) == MAP_FAILED && errno == EFAULT);
    /* A big malloc'd block grown by realloc (glibc uses mremap). */
    size_t n = 8 << 20;
    unsigned char *m = malloc(n);
    memset(m, 7, n);
    m = realloc(m, 4 * n);
    unsigned long sum = 0;
    for (size_t i = 0; i < n; i += 4096) sum += m[i];
    m[4 * n - 1] = 1;
    CHECK("realloc of 8 MiB to 32 MiB keeps the bytes", sum == 7 * (n / 4096));
    free(m);
    munmap(block, pg);
    munmap(f, 2 * pg);
}

static void test_files(const char *dir) {
    char path[4096];
    snprintf(path, sizeof path, "%s/created", dir);
    int fd = creat(path, 0640);
    CHECK("creat makes a file", fd >= 0 && write(fd, "xyz", 3) == 3);
    struct stat st;
    CHECK("creat opened it write-only", read(fd, path + 4000, 1) == -1 && errno == EBADF);
    close(fd);
    CHECK("its size and mode", stat(path, &st) == 0 && st.st_size == 3 && (st.st_mode & 0777) == 0640);
    int d = open(dir, O_DIRECTORY | O_RDONLY);
    CHECK("mknodat makes a FIFO", mknodat(d, "fifo", S_IFIFO | 0600, 0) == 0 &&
          fstatat(d, "fifo", &st, 0) == 0 && S_ISFIFO(st.st_mode));
    CHECK("mknodat makes a regular file", mknodat(d, "plain", S_IFREG | 0600, 0) == 0 &&
          fstatat(d, "plain", &st, 0) == 0 && S_ISREG(st.st_mode) && st.st_size == 0);
    errno = 0;
    CHECK("mknodat on an existing name is EEXIST", mknodat(d, "plain", S_IFREG | 0600, 0) == -1 && errno == EEXIST);
    snprintf(path, sizeof path, "%s/nod", dir);
    CHECK("mknod makes a FIFO", mknod(path, S_IFIFO | 0600, 0) == 0 && stat(path, &st) == 0 && S_ISFIFO(st.st_mode));
    close(d);
}

static void test_waiting(void) {
    int pfd[2];
    pipe(pfd);
    fd_set r;
    FD_ZERO(&r);
    FD_SET(pfd[0], &r);
    struct timeval tv = {0, 1000};
    CHECK("select on an empty pipe times out", select(pfd[0] + 1, &r, NULL, NULL, &tv) == 0 && !FD_ISSET(pfd[0], &r));
    write(pfd[1], "x", 1);
    FD_ZERO(&r);
    FD_SET(pfd[0], &r);
    fd_set w;
    FD_ZERO(&w);
    FD_SET(pfd[1], &w);
    tv.tv_sec = 1;
    CHECK("select sees the readable and the writable end", select(pfd[1] + 1, &r, &w, NULL, &tv) == 2 &&
          FD_ISSET(pfd[0], &r) && FD_ISSET(pfd[1], &w));
    FD_ZERO(&r);
    FD_SET(pfd[0], &r);
    struct timespec ts = {1, 0};
    sigset_t mask;
    sigemptyset(&mask);
    CHECK("pselect with a mask sees the data", pselect(pfd[0] + 1, &r, NULL, NULL, &ts, &mask) == 1 && FD_ISSET(pfd[0], &r));
    struct pollfd pf[2] = {{pfd[0], POLLIN, 0}, {pfd[1], POLLOUT, 0}};
    CHECK("poll sees both ends", poll(pf, 2, 1000) == 2 && (pf[0].revents & POLLIN) && (pf[1].revents & POLLOUT));
    int sv[2];
    socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 42};
    epoll_ctl(ep, EPOLL_CTL_ADD, sv[1], &ev);
    struct epoll_event out[4];
    CHECK("epoll_wait on a quiet socket times out", epoll_wait(ep, out, 4, 1) == 0);
    write(sv[0], "hello", 5);
    int n = epoll_wait(ep, out, 4, 1000);
    CHECK("epoll_wait sees the socket", n == 1 && out[0].data.u64 == 42 && (out[0].events & EPOLLIN));
    FD_ZERO(&r);
    FD_SET(sv[1], &r);
    tv.tv_sec = 1;
    CHECK("select sees the socket", select(sv[1] + 1, &r, NULL, NULL, &tv) == 1);
    struct pollfd ps = {sv[1], POLLIN, 0};
    CHECK("ppoll sees the socket", ppoll(&ps, 1, &ts, &mask) == 1 && (ps.revents & POLLIN));
    close(ep);
    close(sv[0]);
    close(sv[1]);
    close(pfd[0]);
    close(pfd[1]);
}

static void test_scm_rights(const char *dir) {
    int sv[2];
    CHECK("socketpair", socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    char path[4096];
    snprintf(path, sizeof path, "%s/passed", dir);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    write(fd, "through the socket\n", 19);
    char cbuf[CMSG_SPACE(sizeof(int))];
    memset(cbuf, 0, sizeof cbuf);
    char data[2] = "F";
    struct iovec iov = {data, 1};
    struct msghdr m = {0};
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    m.msg_control = cbuf;
    m.msg_controllen = sizeof cbuf;
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    CHECK("sendmsg with SCM_RIGHTS", sendmsg(sv[0], &m, 0) == 1);
    close(fd);
    /* Descriptor 1000 is closed natively; inside, it is the minikernel's
     * RAM, which must not travel either. */
    int bad = 1000;
    memcpy(CMSG_DATA(c), &bad, sizeof bad);
    errno = 0;
    CHECK("sendmsg of descriptor 1000 is EBADF", sendmsg(sv[0], &m, 0) == -1 && errno == EBADF);
    pid_t pid = fork();
    if (pid == 0) {
        char got[2] = {0};
        char rbuf[CMSG_SPACE(sizeof(int))];
        struct iovec riov = {got, 1};
        struct msghdr rm = {0};
        rm.msg_iov = &riov;
        rm.msg_iovlen = 1;
        rm.msg_control = rbuf;
        rm.msg_controllen = sizeof rbuf;
        if (recvmsg(sv[1], &rm, 0) != 1 || got[0] != 'F') _exit(2);
        struct cmsghdr *rc = CMSG_FIRSTHDR(&rm);
        if (!rc || rc->cmsg_type != SCM_RIGHTS || rm.msg_controllen != CMSG_SPACE(sizeof(int))) _exit(3);
        int passed;
        memcpy(&passed, CMSG_DATA(rc), sizeof passed);
        char line[64] = {0};
        if (pread(passed, line, sizeof line - 1, 0) != 19) _exit(4);
        dprintf(sv[1], "child read: %s", line);
        _exit(0);
    }
    char reply[64] = {0};
    int got = 0, n;
    while (got < 30 && (n = read(sv[0], reply + got, sizeof reply - 1 - got)) > 0) got += n;
    int status;
    waitpid(pid, &status, 0);
    printf("%s", reply);
    CHECK("the child got the descriptor", WIFEXITED(status) && WEXITSTATUS(status) == 0);
    /* A datagram pair: recvmsg reports truncation in msg_flags. */
    int dg[2];
    socketpair(AF_UNIX, SOCK_DGRAM, 0, dg);
    send(dg[0], "0123456789", 10, 0);
    char small[4];
    struct iovec siov = {small, 4};
    struct msghdr sm = {0};
    sm.msg_iov = &siov;
    sm.msg_iovlen = 1;
    CHECK("recvmsg truncates a datagram (MSG_TRUNC)", recvmsg(dg[1], &sm, 0) == 4 && (sm.msg_flags & MSG_TRUNC) && memcmp(small, "0123", 4) == 0);
    struct sockaddr_un un;
    socklen_t len = sizeof un;
    CHECK("getpeername of a socketpair", getpeername(sv[0], (struct sockaddr *)&un, &len) == 0 &&
          un.sun_family == AF_UNIX && len == sizeof(sa_family_t));
    errno = 0;
    int null = open("/dev/null", O_RDONLY);
    CHECK("getpeername of a file is ENOTSOCK", getpeername(null, (struct sockaddr *)&un, &len) == -1 && errno == ENOTSOCK);
    close(null);
    close(dg[0]);
    close(dg[1]);
    close(sv[0]);
    close(sv[1]);
}

static void test_tcp(void) {
    int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    CHECK("setsockopt SO_REUSEADDR", setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) == 0);
    int v = 0;
    socklen_t vl = sizeof v;
    CHECK("getsockopt SO_REUSEADDR", getsockopt(l, SOL_SOCKET, SO_REUSEADDR, &v, &vl) == 0 && v == 1 && vl == sizeof v);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    CHECK("bind to 127.0.0.1 port 0", bind(l, (struct sockaddr *)&a, sizeof a) == 0);
    CHECK("listen", listen(l, 4) == 0);
    socklen_t al = sizeof a;
    CHECK("getsockname gives the port", getsockname(l, (struct sockaddr *)&a, &al) == 0 && al == sizeof a && a.sin_port != 0);
    pid_t pid = fork();
    if (pid == 0) {
        struct sockaddr_in peer;
        socklen_t pl = sizeof peer;
        int c = accept4(l, (struct sockaddr *)&peer, &pl, SOCK_CLOEXEC);
        if (c < 0 || pl != sizeof peer || peer.sin_addr.s_addr != htonl(INADDR_LOOPBACK)) _exit(2);
        char buf[256];
        int n;
        struct sockaddr_in from;
        socklen_t fl = sizeof from;
        while ((n = recvfrom(c, buf, sizeof buf, 0, (struct sockaddr *)&from, &fl)) > 0) {
            for (int i = 0; i < n; i++) buf[i] = buf[i] >= 'a' && buf[i] <= 'z' ? buf[i] - 32 : buf[i];
            if (send(c, buf, n, 0) != n) _exit(3);
        }
        _exit(n == 0 ? 0 : 4);
    }
    close(l);
    l = -1;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    CHECK("connect to the listener", connect(s, (struct sockaddr *)&a, sizeof a) == 0);
    struct sockaddr_in peer;
    socklen_t pl = sizeof peer;
    CHECK("getpeername is the listener's address", getpeername(s, (struct sockaddr *)&peer, &pl) == 0 && peer.sin_port == a.sin_port);
    CHECK("setsockopt TCP_NODELAY", setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) == 0);
    CHECK("sendto on a connected socket", sendto(s, "echo me", 7, 0, NULL, 0) == 7);
    CHECK("shutdown for writing", shutdown(s, SHUT_WR) == 0);
    char buf[64] = {0};
    int n = recv(s, buf, sizeof buf, MSG_WAITALL);
    CHECK("the echo comes back upper-cased", n == 7 && strcmp(buf, "ECHO ME") == 0);
    int status;
    waitpid(pid, &status, 0);
    CHECK("the server's child exits 0", WIFEXITED(status) && WEXITSTATUS(status) == 0);
    close(s);
}

static void test_proc_self(char **argv) {
    char exe[4096] = {0}, own[4096] = {0};
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    CHECK("/proc/self/exe names this program", n > 0 && realpath(argv[0], own) && strcmp(exe, own) == 0);
    int fd = open("/proc/self/cmdline", O_RDONLY);
    char cmd[4096] = {0};
    n = read(fd, cmd, sizeof cmd);
    close(fd);
    size_t want = 0;
    for (char **a = argv; *a; a++) want += strlen(*a) + 1;
    int same = (size_t)n == want;
    size_t at = 0;
    for (char **a = argv; same && *a; a++) {
        same = strcmp(cmd + at, *a) == 0;
        at += strlen(*a) + 1;
    }
    CHECK("/proc/self/cmdline holds argv", same);
    struct stat st;
    CHECK("stat of /proc/self/exe is this program", stat("/proc/self/exe", &st) == 0 && S_ISREG(st.st_mode));
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc >= 3 && strcmp(argv[2], "chain") == 0) {
        int left = argc > 3 ? atoi(argv[3]) : 0;
        printf("chain %d\n", left);
        if (left == 0) return 7;
        pid_t pid = fork();
        if (pid == 0) {
            char num[16];
            snprintf(num, sizeof num, "%d", left - 1);
            char *args[] = {argv[0], argv[1], "chain", num, NULL};
            execv("/proc/self/exe", args);
            _exit(99);
        }
        int status;
        waitpid(pid, &status, 0);
        return WIFEXITED(status) ? WEXITSTATUS(status) + 1 : 100;
    }
    if (argc < 2) return 2;
    test_mremap();
    test_files(argv[1]);
    test_waiting();
    test_scm_rights(argv[1]);
    test_tcp();
    test_proc_self(argv);
    return 0;
}
