/* The fork bench's workload (tests/benches/fork.rs), built with
 * gcc -static; it prints one figure.
 *   forkbench forkexec N PROGRAM   N x (fork, execv PROGRAM, waitpid):
 *                                  "forkexec_ns N"
 *   forkbench forktouch N MIB      touch MIB MiB, then N x (fork, the child
 *                                  exits at once, waitpid): "forktouch_ns N"
 *   forkbench forkwrite N MIB      the same, the child writes one byte in
 *                                  every page first (every page copied):
 *                                  "forkwrite_ns N"
 * Each figure is the median over the N iterations, in ns. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    long long x = *(const long long *)a, y = *(const long long *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: forkbench forkexec|forktouch|forkwrite N ARG\n");
        return 2;
    }
    int n = atoi(argv[2]);
    if (n < 1 || n > 100000) return 2;
    long long *t = calloc(n, sizeof *t);
    char *mem = NULL;
    size_t len = 0;
    int exec = strcmp(argv[1], "forkexec") == 0;
    int write_all = strcmp(argv[1], "forkwrite") == 0;
    if (!exec) {
        len = (size_t)atoi(argv[3]) << 20;
        mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mem == MAP_FAILED) return 3;
        for (size_t i = 0; i < len; i += 4096) mem[i] = (char)i;
    }
    for (int i = 0; i < n; i++) {
        long long start = now_ns();
        pid_t pid = fork();
        if (pid < 0) return 4;
        if (pid == 0) {
            if (exec) {
                char *args[] = {argv[3], NULL};
                execv(argv[3], args);
                _exit(127);
            }
            if (write_all)
                for (size_t j = 0; j < len; j += 4096) mem[j] = 1;
            _exit(0);
        }
        int status;
        if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) return 5;
        t[i] = now_ns() - start;
    }
    qsort(t, n, sizeof *t, cmp);
    printf("%s_ns %lld\n", argv[1], t[n / 2]);
    return 0;
}
