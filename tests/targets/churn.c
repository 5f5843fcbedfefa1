/* Test target for `ckpt survey`: a process tree that never holds still.
 *
 * usage: churn STATEFILE [CHILD_US]
 * Forever: forks a child that sleeps CHILD_US microseconds (default 3000)
 * and exits, reaps every exited child with waitpid(WNOHANG), keeps at most
 * 8 children alive. SIGUSR1 is caught (SA_RESTART) and counted.
 * Counters, in the first 32 bytes of STATEFILE (MAP_SHARED, so a test reads
 * them without talking to the process): loop iterations, forks, reaped
 * children, SIGUSR1 received. A surveyed process keeps advancing them.
 */
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile uint64_t *ctr;

static void on_usr1(int sig) { (void)sig; __atomic_add_fetch(&ctr[3], 1, __ATOMIC_SEQ_CST); }

static void nap(long us) {
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    while (nanosleep(&ts, &ts) != 0) {}
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    long child_us = argc > 2 ? atol(argv[2]) : 3000;
    int fd = open(argv[1], O_RDWR | O_CREAT, 0600);
    if (fd < 0 || ftruncate(fd, 4096) != 0) return 1;
    ctr = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (ctr == MAP_FAILED) return 1;
    close(fd);
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    int alive = 0;
    for (;;) {
        if (alive < 8) {
            pid_t p = fork();
            if (p == 0) {
                nap(child_us);
                _exit(0);
            }
            if (p > 0) {
                alive++;
                __atomic_add_fetch(&ctr[1], 1, __ATOMIC_SEQ_CST);
            }
        }
        while (waitpid(-1, NULL, WNOHANG) > 0) {
            alive--;
            __atomic_add_fetch(&ctr[2], 1, __ATOMIC_SEQ_CST);
        }
        __atomic_add_fetch(&ctr[0], 1, __ATOMIC_SEQ_CST);
        nap(500);
    }
}
