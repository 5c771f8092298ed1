/* fork's copy-on-write, seen from the program: after fork, writes by
 * either side (by the program, by the kernel for read(2), after mprotect,
 * through a pipe) are never seen by the other; pages shared by three
 * generations stay intact whichever lets go first; munmap and mremap on
 * one side leave the other alone. Prints one line per check. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGES 300
#define PG 4096

static int all(const char *p, size_t pages, char v) {
    for (size_t i = 0; i < pages; i++)
        if (p[i * PG] != v || p[i * PG + PG - 1] != v) return 0;
    return 1;
}

static int child_status(pid_t pid) {
    int st;
    if (waitpid(pid, &st, 0) != pid) return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    char *a = mmap(NULL, PAGES * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(a, 'p', PAGES * PG);
    static char data[PG * 4] = "static data";
    char *heap = malloc(1 << 20);
    memset(heap, 'h', 1 << 20);
    int pfd[2];
    pipe(pfd);

    pid_t pid = fork();
    if (pid == 0) {
        int bad = 0;
        if (!all(a, PAGES, 'p')) bad |= 1;
        memset(a, 'c', PAGES * PG);          /* the child's own copy */
        strcpy(data, "child's data");
        heap[12345] = 'C';
        /* read(2) writes into a shared page: the kernel must copy first */
        char msg[] = "from the pipe";
        write(pfd[1], msg, sizeof msg);
        if (read(pfd[0], a + 7 * PG, sizeof msg) != sizeof msg) bad |= 2;
        if (strcmp(a + 7 * PG, msg) != 0) bad |= 4;
        if (!all(a, 7, 'c')) bad |= 8;
        _exit(bad);
    }
    int st = child_status(pid);
    printf("child saw the parent's pages and wrote its own: %s\n", st == 0 ? "ok" : "FAILED");
    printf("parent's mapping unchanged: %s\n", all(a, PAGES, 'p') ? "ok" : "FAILED");
    printf("parent's data unchanged: %s\n", strcmp(data, "static data") == 0 ? "ok" : "FAILED");
    printf("parent's heap unchanged: %s\n", heap[12345] == 'h' ? "ok" : "FAILED");

    /* The parent writes after fork; the child must keep the old bytes. */
    int go[2], done[2];
    pipe(go);
    pipe(done);
    pid = fork();
    if (pid == 0) {
        char c;
        read(go[0], &c, 1);
        int ok = all(a, PAGES, 'p') && heap[1000] == 'h';
        /* A grandchild shares the same frames, three ways. */
        pid_t g = fork();
        if (g == 0) {
            usleep(20000); /* let the others write and exit first */
            _exit(all(a, PAGES, 'p') && heap[1000] == 'h' ? 0 : 1);
        }
        a[0] = 'x';
        int gs = child_status(g);
        _exit(ok && gs == 0 && a[0] == 'x' && a[PG] == 'p' ? 0 : 1);
    }
    memset(a, 'P', PAGES * PG);
    heap[1000] = 'H';
    write(go[1], "g", 1);
    st = child_status(pid);
    printf("child kept the pages the parent rewrote (and a grandchild too): %s\n", st == 0 ? "ok" : "FAILED");

    /* mprotect read-only then back to writable on a shared page. */
    mprotect(a, PAGES * PG, PROT_READ);
    pid = fork();
    if (pid == 0) {
        mprotect(a, PAGES * PG, PROT_READ | PROT_WRITE);
        a[5 * PG] = 'm';
        _exit(a[5 * PG] == 'm' && a[6 * PG] == 'P' ? 0 : 1);
    }
    st = child_status(pid);
    mprotect(a, PAGES * PG, PROT_READ | PROT_WRITE);
    printf("mprotect to writable copies before writing: %s\n", st == 0 && a[5 * PG] == 'P' ? "ok" : "FAILED");

    /* munmap and mremap in the child leave the parent's pages alone. */
    pid = fork();
    if (pid == 0) {
        munmap(a, 100 * PG);
        char *m = mremap(a + 100 * PG, 200 * PG, 400 * PG, MREMAP_MAYMOVE);
        if (m == MAP_FAILED) _exit(2);
        m[300 * PG] = 'n';
        _exit(all(m, 200, 'P') ? 0 : 1);
    }
    st = child_status(pid);
    printf("munmap and mremap in the child: %s, parent intact: %s\n", st == 0 ? "ok" : "FAILED",
           all(a, PAGES, 'P') ? "ok" : "FAILED");

    /* MAP_SHARED memory is not copied: each side sees the other's writes. */
    volatile int *shm = mmap(NULL, 3 * PG, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    shm[0] = 1;
    pid = fork();
    if (pid == 0) {
        shm[1] = shm[0] + 41;          /* the parent reads it after wait */
        for (int i = 0; i < 3000 && shm[2] != 7; i++) usleep(1000); /* the parent's write */
        _exit(shm[2] == 7 ? 0 : 1);
    }
    shm[2] = 7;
    st = child_status(pid);
    printf("MAP_SHARED memory is shared after fork: %s\n", st == 0 && shm[1] == 42 ? "ok" : "FAILED");
    munmap((void *)shm, 3 * PG);

    /* Many children in a row, each writing everything. */
    int fails = 0;
    for (int i = 0; i < 20; i++) {
        pid = fork();
        if (pid == 0) {
            memset(a, 'a' + i, PAGES * PG);
            _exit(all(a, PAGES, 'a' + i) ? 0 : 1);
        }
        fails += child_status(pid) != 0;
    }
    printf("20 children wrote everything: %d failed, parent intact: %s\n", fails,
           all(a, PAGES, 'P') ? "ok" : "FAILED");
    return 0;
}
