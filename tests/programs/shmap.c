/* Writable MAP_SHARED file mappings: what the program writes reaches the
 * file on msync, munmap and exit (and not beyond the file's end); a
 * MAP_PRIVATE mapping never writes; a forked child shares the mapping;
 * read(2) into a mapping counts as a write; a read-only descriptor cannot
 * be mapped writable. Usage: shmap DIR. Prints one line per check. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define CHECK(what, cond) printf("%-52s %s\n", what, (cond) ? "ok" : "FAILED")
#define PG 4096

static char path[4096];

static void make(size_t len) {
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    for (size_t i = 0; i < len; i++) write(fd, "abcdefghijklmnopqrstuvwxyz" + i % 26, 1);
    close(fd);
}

static int file_has(off_t off, const char *want) {
    char buf[256] = {0};
    int fd = open(path, O_RDONLY);
    ssize_t n = pread(fd, buf, strlen(want), off);
    close(fd);
    return n == (ssize_t)strlen(want) && memcmp(buf, want, n) == 0;
}

static off_t file_size(void) {
    struct stat st;
    return stat(path, &st) == 0 ? st.st_size : -1;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc < 2) return 2;
    snprintf(path, sizeof path, "%s/mapped", argv[1]);

    make(3 * PG + 100);
    int fd = open(path, O_RDWR);
    char *m = mmap(NULL, 4 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK("mmap MAP_SHARED of a file open read-write", m != MAP_FAILED);
    CHECK("the mapping holds the file", memcmp(m, "abcdef", 6) == 0 && m[3 * PG] == "abcdefghijklmnopqrstuvwxyz"[(3 * PG) % 26]);
    memcpy(m + 10, "HELLO", 5);
    memcpy(m + 2 * PG, "PAGE2", 5);
    CHECK("msync(MS_SYNC)", msync(m, 4 * PG, MS_SYNC) == 0);
    CHECK("the file has both writes after msync", file_has(10, "HELLO") && file_has(2 * PG, "PAGE2"));
    CHECK("untouched bytes unchanged", file_has(0, "abcdefghij") && file_has(26 * 200, "abcdefgh"));
    /* Another write after msync (the page was cleaned): reaches the file too. */
    memcpy(m + 20, "AGAIN", 5);
    m[3 * PG + 200] = 'X'; /* past the end of the file: never written */
    pid_t pid = fork();
    if (pid == 0) {
        memcpy(m + PG + 5, "CHILD", 5); /* shared with the parent */
        _exit(0);
    }
    int st;
    waitpid(pid, &st, 0);
    CHECK("the parent sees the child's write", memcmp(m + PG + 5, "CHILD", 5) == 0);
    CHECK("munmap", munmap(m, 4 * PG) == 0);
    CHECK("the file has every write after munmap", file_has(20, "AGAIN") && file_has(PG + 5, "CHILD") && file_has(10, "HELLO"));
    CHECK("the file did not grow", file_size() == 3 * PG + 100);

    /* read(2) into a shared mapping is a write. */
    m = mmap(NULL, PG, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int p[2];
    pipe(p);
    write(p[1], "PIPED", 5);
    CHECK("read(2) into the mapping", read(p[0], m + 100, 5) == 5);
    munmap(m, PG);
    CHECK("the file has what read(2) put there", file_has(100, "PIPED"));

    /* MAP_PRIVATE writes stay private. */
    m = mmap(NULL, PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    memcpy(m, "PRIVATE", 7);
    munmap(m, PG);
    CHECK("MAP_PRIVATE writes never reach the file", file_has(0, "abcdef"));

    /* A read-only descriptor: EACCES for a writable shared mapping. */
    int ro = open(path, O_RDONLY);
    errno = 0;
    CHECK("PROT_WRITE MAP_SHARED of an O_RDONLY file is EACCES", mmap(NULL, PG, PROT_READ | PROT_WRITE, MAP_SHARED, ro, 0) == MAP_FAILED && errno == EACCES);
    char *r = mmap(NULL, PG, PROT_READ, MAP_SHARED, ro, 0);
    CHECK("a read-only shared mapping reads the file", r != MAP_FAILED && memcmp(r + 10, "HELLO", 5) == 0);
    munmap(r, PG);
    close(ro);

    /* A child that exits without munmap or msync: its writes reach the file. */
    pid = fork();
    if (pid == 0) {
        char *c = mmap(NULL, PG, PROT_READ | PROT_WRITE, MAP_SHARED, fd, PG);
        memcpy(c + 50, "EXITED", 6);
        _exit(0);
    }
    waitpid(pid, &st, 0);
    CHECK("an exiting process writes its mapping back", file_has(PG + 50, "EXITED"));
    close(fd);
    return 0;
}
