/* A process tree sharing private pages copy-on-write (tests/test_engine_cow.py).
 *
 *   cowtree NPAGES NCHILD READY
 *
 * The root maps NPAGES private anonymous pages and fills page i with
 * words (i << 32 | 0 << 16 | w), then forks NCHILD children; child k
 * writes its own page k (generation k + 1) and leaves the others shared.
 * Child 0 then forks a grandchild that writes page NPAGES-1 (generation
 * 99): a chain root -> child 0 -> grandchild. Child 2 (when there is one)
 * makes its last page read-only: its mapping is two VMAs, its parent's
 * one, though it shares the same pages. The root also
 * grows its heap by NPAGES pages (sbrk) filled with page i's words as
 * page 1000 + i; child 1 grows it by 4 more (pages 2000 + j, generation
 * 7: a [heap] VMA of its own, after its parent's). Once every member is
 * set up the root trims its heap by 8 pages (sbrk): the children's [heap]
 * is their parent's, longer. Every member then sleeps.
 * READY gets "ready ROOTPID ADDR HEAPADDR" once every member is set up
 * (written without malloc: the root's heap stays as trimmed).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096

static void fill(uint8_t *base, long i, long gen) {
    uint64_t *w = (uint64_t *)(base + i * PAGE);
    for (long k = 0; k < PAGE / 8; k++)
        w[k] = ((uint64_t)i << 32) | ((uint64_t)gen << 16) | (uint64_t)k;
}

static void sleep_forever(void) {
    for (;;)
        pause();
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: %s NPAGES NCHILD READY\n", argv[0]); return 2; }
    long n = atol(argv[1]), nchild = atol(argv[2]);
    if (n < 2 || nchild < 1 || nchild >= n) { fprintf(stderr, "bad sizes\n"); return 2; }
    uint8_t *base = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) { perror("mmap"); return 1; }
    for (long i = 0; i < n; i++)
        fill(base, i, 0);
    uintptr_t cur = (uintptr_t)sbrk(0);
    if (cur % PAGE && sbrk(PAGE - cur % PAGE) == (void *)-1) { perror("sbrk"); return 1; }
    uint8_t *heap = sbrk(n * PAGE);
    if (heap == (void *)-1) { perror("sbrk"); return 1; }
    for (long i = 0; i < n; i++)
        fill(heap - 1000 * PAGE, 1000 + i, 0);
    int pfd[2];
    if (pipe(pfd)) { perror("pipe"); return 1; }
    for (long k = 0; k < nchild; k++) {
        pid_t p = fork();
        if (p < 0) { perror("fork"); return 1; }
        if (p == 0) {
            close(pfd[0]);
            fill(base, k, k + 1);
            if (k == 1) {
                uint8_t *more = sbrk(4 * PAGE);
                if (more == (void *)-1) { perror("sbrk"); _exit(1); }
                for (long j = 0; j < 4; j++)
                    fill(more - 2000 * PAGE, 2000 + j, 7);
            }
            if (k == 2 && mprotect(base + (n - 1) * PAGE, PAGE, PROT_READ)) { perror("mprotect"); _exit(1); }
            if (k == 0) {
                pid_t g = fork();
                if (g < 0) { perror("fork"); _exit(1); }
                if (g == 0) {
                    fill(base, n - 1, 99);
                    if (write(pfd[1], "g", 1) != 1) _exit(1);
                    close(pfd[1]);
                    sleep_forever();
                }
            }
            if (write(pfd[1], "c", 1) != 1) _exit(1);
            close(pfd[1]);
            sleep_forever();
        }
    }
    close(pfd[1]);
    char c;
    for (long k = 0; k < nchild + 1; k++)
        if (read(pfd[0], &c, 1) != 1) { fprintf(stderr, "a member died\n"); return 1; }
    close(pfd[0]);
    if (sbrk(-8 * PAGE) == (void *)-1) { perror("sbrk"); return 1; }
    char tmp[4096], line[128];
    snprintf(tmp, sizeof tmp, "%s.tmp", argv[3]);
    int len = snprintf(line, sizeof line, "ready %d %lu %lu\n", getpid(), (unsigned long)base, (unsigned long)heap);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || write(fd, line, len) != len || close(fd) || rename(tmp, argv[3])) { perror("ready"); return 1; }
    sleep_forever();
    return 0;
}
