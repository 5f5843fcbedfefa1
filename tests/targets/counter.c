/* Test target for the engine core: computes, reads, writes, sleeps.
 *
 * usage: counter OUT IN [MIB]
 * Each step n (from 1): flips one word of a MIB-sized array (default 4),
 * recomputes the xor of the whole array, reads the next byte of IN, and
 * appends "n byte xor\n" to OUT with one write(2). The xor of the array is
 * X0 ^ 1 ^ 2 ^ ... ^ n, where X0 is the xor of i*7 over the array, so a test
 * can check every line without trusting the engine: no gap, no repeat, the
 * right input byte, the right memory.
 * SIGUSR1 appends "usr1 n\n"; SIGUSR2 is blocked; SIGPIPE is ignored.
 *
 * MODE (argv[4]) changes what it holds or where it sleeps, for refusal and
 * syscall-restart tests:
 *   sleep   (default) nanosleep between steps (-ERESTART_RESTARTBLOCK)
 *   pause   one step per SIGUSR1, waiting in pause() (-ERESTARTNOHAND)
 *   pipe    one step per SIGUSR1, blocked in read() on a self-pipe whose
 *           write end the handler writes to (-ERESTARTSYS)
 *   thread  a second thread exists (restored: engine/threads.py)
 *   child   a child process exists (a process tree: tests/test_engine_tree.py)
 *   sysv    a System V shared memory segment is attached and its last page
 *           unmapped: part of an attach (refused: engine/sysvshm.py restores
 *           whole attaches only)
 *   altstack  a sigaltstack is set up and SIGUSR1 runs on it
 *   itimer  ITIMER_REAL fires SIGALRM every 20 ms; SIGUSR1 lines add "alrm=K"
 *   mem     also holds a MAP_SHARED anonymous region, a PROT_NONE region
 *           and a named anonymous region, all with data; SIGUSR1 lines add
 *           "shm=X none=Y named=Z" (xors of their words, read back)
 */
#include <errno.h>
#include <pthread.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/time.h>
#include <sys/shm.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t usr1;
static volatile sig_atomic_t onalt = -1;
static volatile sig_atomic_t alarms = -1;
static void on_alrm(int sig) { (void)sig; alarms++; }
static char *alt_lo;
static int selfpipe[2] = {-1, -1};
static void on_usr1(int sig) {
    char here;
    (void)sig;
    usr1 = 1;
    if (alt_lo) onalt = &here >= alt_lo && &here < alt_lo + 65536;
    if (selfpipe[1] >= 0) { char c = 'x'; (void)!write(selfpipe[1], &c, 1); }
}
#define MEMW 16384   /* words per region: 64 KiB */
static uint32_t *shm_r, *none_r, *named_r;
static uint32_t region(uint32_t *r, uint32_t mul, int fill) {
    uint32_t x = 0;
    for (uint32_t i = 0; i < MEMW; i++) { if (fill) r[i] = i * mul + 1; x ^= r[i]; }
    return x;
}
static void *idle(void *arg) { (void)arg; for (;;) pause(); return NULL; }

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    const char *mode = argc > 4 ? argv[4] : "sleep";
    size_t words = (argc > 3 ? strtoul(argv[3], NULL, 10) : 4) << 18;
    int out = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    int in = open(argv[2], O_RDONLY);
    if (out < 0 || in < 0) return 3;
    uint32_t *arr = malloc(words * 4);
    for (size_t i = 0; i < words; i++) arr[i] = (uint32_t)(i * 7u);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    if (!strcmp(mode, "altstack")) {
        alt_lo = malloc(65536);
        stack_t ss = {.ss_sp = alt_lo, .ss_size = 65536, .ss_flags = 0};
        sigaltstack(&ss, NULL);
        sa.sa_flags |= SA_ONSTACK;
    }
    sigaction(SIGUSR1, &sa, NULL);
    if (!strcmp(mode, "pipe") && pipe(selfpipe) != 0) return 5;
    if (!strcmp(mode, "itimer")) {
        struct sigaction al;
        memset(&al, 0, sizeof al);
        al.sa_handler = on_alrm;
        al.sa_flags = SA_RESTART;
        sigaction(SIGALRM, &al, NULL);
        alarms = 0;
        struct itimerval it = {{0, 20000}, {0, 20000}};
        setitimer(ITIMER_REAL, &it, NULL);
    }
    if (!strcmp(mode, "mem")) {
        shm_r = mmap(NULL, MEMW * 4, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        none_r = mmap(NULL, MEMW * 4, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        named_r = mmap(NULL, MEMW * 4, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        region(shm_r, 3, 1);
        region(none_r, 5, 1);
        region(named_r, 11, 1);
        mprotect(none_r, MEMW * 4, PROT_NONE);
        prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, (unsigned long)named_r, MEMW * 4, (unsigned long)"ckpt-test");
    }
    if (!strcmp(mode, "thread")) { pthread_t t; pthread_create(&t, NULL, idle, NULL); }
    if (!strcmp(mode, "child") && fork() == 0) { for (;;) pause(); }
    if (!strcmp(mode, "sysv")) {
        int id = shmget(IPC_PRIVATE, 65536, IPC_CREAT | 0600);
        void *at = id < 0 ? (void *)-1 : shmat(id, NULL, 0);
        if (at == (void *)-1 || munmap((char *)at + 65536 - 4096, 4096)) return 6;
        shmctl(id, IPC_RMID, NULL);
    }
    signal(SIGPIPE, SIG_IGN);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR2);
    sigprocmask(SIG_BLOCK, &set, NULL);
    char line[160];
    for (uint64_t n = 1;; n++) {
        arr[(n * 4099) % words] ^= (uint32_t)n;
        uint32_t x = 0;
        for (size_t i = 0; i < words; i++) x ^= arr[i];
        unsigned char b = 0;
        if (read(in, &b, 1) != 1) b = 0;
        int len = snprintf(line, sizeof line, "%llu %u %u\n", (unsigned long long)n, b, x);
        if (usr1) {
            usr1 = 0;
            len += snprintf(line + len, sizeof line - len, "usr1 %llu alt=%d", (unsigned long long)n, (int)onalt);
            if (alarms >= 0)
                len += snprintf(line + len, sizeof line - len, " alrm=%d", (int)alarms);
            if (shm_r) {
                mprotect(none_r, MEMW * 4, PROT_READ);
                len += snprintf(line + len, sizeof line - len, " shm=%u none=%u named=%u", region(shm_r, 3, 0),
                                region(none_r, 5, 0), region(named_r, 11, 0));
                mprotect(none_r, MEMW * 4, PROT_NONE);
            }
            len += snprintf(line + len, sizeof line - len, "\n");
        }
        if (write(out, line, len) != len) return 4;
        if (!strcmp(mode, "pause")) {
            while (!usr1) pause();
        } else if (!strcmp(mode, "pipe")) {
            char c;
            while (read(selfpipe[0], &c, 1) != 1) {}
        } else {
            struct timespec ts = {0, 5 * 1000 * 1000};
            while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {}
        }
    }
}
