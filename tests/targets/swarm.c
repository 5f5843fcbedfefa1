/* Bench target (bench/compare.py, bench/engine_bench.py): many small tasks.
 *
 *   swarm tree N READY     the root forks N-1 children, each asleep in pause()
 *   swarm threads N READY  one process with N threads (N-1 asleep in pause())
 *
 * Every task writes a counter word into its own stack memory first, so each
 * has a little private state to carry. READY gets "ready PID" once every
 * task exists (written to READY.tmp, then renamed: a reader never sees half).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static volatile int started;

static void *sleeper(void *arg) {
    volatile long mark = (long)arg;
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    for (;;) { pause(); mark++; }
    return NULL;
}

static void ready(const char *path) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) { perror("ready"); exit(1); }
    fprintf(f, "ready %d\n", getpid());
    if (fclose(f) || rename(tmp, path)) { perror("ready"); exit(1); }
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: %s tree|threads N READY\n", argv[0]); return 2; }
    int n = atoi(argv[2]);
    if (n < 1) { fprintf(stderr, "N must be >= 1\n"); return 2; }
    if (!strcmp(argv[1], "tree")) {
        int p[2];
        if (pipe(p)) { perror("pipe"); return 1; }
        for (int i = 1; i < n; i++) {
            pid_t c = fork();
            if (c < 0) { perror("fork"); return 1; }
            if (c == 0) {
                close(p[0]);
                if (write(p[1], "x", 1) != 1) _exit(1);
                close(p[1]);
                sleeper((void *)(long)i);
            }
        }
        close(p[1]);
        char b;
        for (int i = 1; i < n; i++)
            if (read(p[0], &b, 1) != 1) { fprintf(stderr, "child lost\n"); return 1; }
        close(p[0]);    /* no pipe left between members: nothing but the tree itself */
    } else if (!strcmp(argv[1], "threads")) {
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setstacksize(&a, 64 << 10);
        for (int i = 1; i < n; i++) {
            pthread_t t;
            if (pthread_create(&t, &a, sleeper, (void *)(long)i)) { fprintf(stderr, "pthread_create\n"); return 1; }
        }
        while (__atomic_load_n(&started, __ATOMIC_SEQ_CST) < n - 1)
            usleep(1000);
    } else {
        fprintf(stderr, "mode: tree or threads\n");
        return 2;
    }
    ready(argv[3]);
    sleeper(NULL);
    return 0;
}
