/* Benchmark target: touches MIB mebibytes of anonymous memory with
 * non-zero data, writes READY (a path) once done, then idles.
 * usage: memhog MIB READY */
#include <fcntl.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    size_t bytes = strtoull(argv[1], NULL, 10) << 20;
    uint64_t *mem = NULL;
    if (bytes) {
        mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mem == MAP_FAILED) return 3;
        for (size_t i = 0; i < bytes / 8; i++) mem[i] = i * 0x9E3779B97F4A7C15ull;
    }
    int fd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    /* "ready ADDR": where the region is (a small one merges with its
     * neighbours in /proc/PID/maps, so size alone does not find it) */
    char line[64];
    int n = snprintf(line, sizeof line, "ready %p\n", (void *)mem);
    if (fd < 0 || write(fd, line, n) != n) return 4;
    close(fd);
    for (;;) {
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
        if (mem) mem[0]++;
    }
}
