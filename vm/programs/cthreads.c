/* cthreads: a real multi-threaded C program for the guest image
 * (/usr/lib/crucible/programs/cthreads, built at image build time).
 *
 * usage: cthreads CTLFIFO        (output: one line per write(2) on stdout)
 *
 * Threads block in pthread_mutex_lock, pthread_cond_wait, pthread_join,
 * futex(FUTEX_WAIT) with a timeout (looping on ETIMEDOUT), poll and read on
 * pipes; one ticks in nanosleep; main joins the control thread, which reads
 * commands from CTLFIFO (a named pipe, opened read-write so that it never
 * sees EOF): "go" releases every thread.
 *
 * Proof of continuation: each thread draws a random token at start, keeps
 * it only on its own stack and prints "start NAME tid=T token=X"; when it is
 * released it prints "woke NAME tid=T token=X ret=R ..." from that stack
 * and its current gettid(). A fresh start prints other tokens (and starts
 * its ticks at 1 again). Each thread also checks its own call's result
 * (no EINTR, the byte read, the join value, tid unchanged) and main ends
 * with "verdict ok" or "verdict FAIL ...".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

enum { T_TICK, T_MUTEX, T_COND, T_JOIN, T_FUTEX, T_POLL, T_READ, T_CTL, NT };
static const char *NAMES[NT + 1] = {"tick", "mutex", "cond", "join", "futex", "poll", "read", "ctl", "main"};

static pthread_mutex_t held = PTHREAD_MUTEX_INITIALIZER;   /* the ctl thread holds it until go */
static pthread_mutex_t cm = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int cond_go;
static _Atomic uint32_t fword;
static _Atomic int stop_ticking;
static _Atomic int failures;
static int p_read[2], p_poll[2];
static int ctl;
static pthread_t th[NT];
static _Atomic int started;

static void say(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof buf - 2)
        n = sizeof buf - 2;
    buf[n++] = '\n';
    for (int off = 0; off < n;) {
        ssize_t w = write(1, buf + off, n - off);
        if (w < 0 && errno == EINTR) {
            atomic_fetch_add(&failures, 1);   /* no handler is installed: EINTR is a defect */
            continue;
        }
        if (w <= 0)
            return;
        off += w;
    }
}

static uint64_t token(void) {
    uint64_t t = 0;
    while (getrandom(&t, sizeof t, 0) != sizeof t)
        ;
    return t;
}

static pid_t tid(void) { return (pid_t)syscall(SYS_gettid); }

/* start: the token lives in the caller's frame; main waits until all said it */
#define START(idx)                                                                   \
    const pid_t my_tid = tid();                                                      \
    const uint64_t my_token = token();                                               \
    say("start %s tid=%d token=%016llx", NAMES[idx], my_tid, (unsigned long long)my_token); \
    atomic_fetch_add(&started, 1)

static void woke(int idx, pid_t my_tid, uint64_t my_token, long ret, int err, const char *extra, int ok) {
    pid_t now = tid();
    if (now != my_tid)
        ok = 0;
    if (!ok)
        atomic_fetch_add(&failures, 1);
    say("woke %s tid=%d token=%016llx ret=%ld errno=%d %s%s", NAMES[idx], now, (unsigned long long)my_token,
        ret, err, extra, ok ? "" : " FAIL");
}

static void *t_tick(void *arg) {
    (void)arg;
    START(T_TICK);
    unsigned long n = 0, eintr = 0;
    while (!atomic_load(&stop_ticking)) {
        struct timespec ts = {0, 100 * 1000 * 1000};
        if (nanosleep(&ts, NULL) != 0) {
            eintr += errno == EINTR;
            continue;
        }
        say("tick %lu", ++n);
    }
    char extra[64];
    snprintf(extra, sizeof extra, "ticks=%lu eintr=%lu", n, eintr);
    woke(T_TICK, my_tid, my_token, (long)n, 0, extra, eintr == 0);
    return NULL;
}

static void *t_mutex(void *arg) {
    (void)arg;
    START(T_MUTEX);
    int r = pthread_mutex_lock(&held);
    pthread_mutex_unlock(&held);
    woke(T_MUTEX, my_tid, my_token, r, 0, "", r == 0);
    return NULL;
}

static void *t_cond(void *arg) {
    (void)arg;
    START(T_COND);
    int r = 0, waits = 0;
    pthread_mutex_lock(&cm);
    while (!cond_go && r == 0) {
        r = pthread_cond_wait(&cv, &cm);
        waits++;
    }
    pthread_mutex_unlock(&cm);
    char extra[32];
    snprintf(extra, sizeof extra, "waits=%d", waits);
    woke(T_COND, my_tid, my_token, r, 0, extra, r == 0);
    return NULL;
}

static void *t_read(void *arg) {
    (void)arg;
    START(T_READ);
    char c = 0;
    ssize_t r = read(p_read[0], &c, 1);
    int e = r < 0 ? errno : 0;
    char extra[32];
    snprintf(extra, sizeof extra, "byte=%c", c ? c : '-');
    woke(T_READ, my_tid, my_token, (long)r, e, extra, r == 1 && c == 'r');
    return (void *)(uintptr_t)0x5eed;
}

static void *t_join(void *arg) {
    (void)arg;
    START(T_JOIN);
    void *val = NULL;
    int r = pthread_join(th[T_READ], &val);
    char extra[32];
    snprintf(extra, sizeof extra, "value=%#lx", (unsigned long)(uintptr_t)val);
    woke(T_JOIN, my_tid, my_token, r, 0, extra, r == 0 && val == (void *)(uintptr_t)0x5eed);
    return NULL;
}

static void *t_futex(void *arg) {
    (void)arg;
    START(T_FUTEX);
    unsigned long timeouts = 0, eintr = 0;
    long r;
    int e = 0;
    for (;;) {
        struct timespec ts = {0, 200 * 1000 * 1000};
        r = syscall(SYS_futex, &fword, FUTEX_WAIT_PRIVATE, 0, &ts, NULL, 0);
        e = r < 0 ? errno : 0;
        if (atomic_load(&fword))
            break;
        if (r < 0 && e == ETIMEDOUT)
            timeouts++;
        else if (r < 0 && e == EINTR)
            eintr++;
    }
    char extra[64];
    snprintf(extra, sizeof extra, "timeouts=%lu eintr=%lu", timeouts, eintr);
    woke(T_FUTEX, my_tid, my_token, r, e, extra, eintr == 0);
    return NULL;
}

static void *t_poll(void *arg) {
    (void)arg;
    START(T_POLL);
    struct pollfd pfd = {.fd = p_poll[0], .events = POLLIN};
    int r = poll(&pfd, 1, -1);
    int e = r < 0 ? errno : 0;
    char extra[32];
    snprintf(extra, sizeof extra, "revents=%#x", pfd.revents);
    woke(T_POLL, my_tid, my_token, r, e, extra, r == 1 && (pfd.revents & POLLIN));
    return NULL;
}

static void release(void) {
    pthread_mutex_unlock(&held);
    pthread_mutex_lock(&cm);
    cond_go = 1;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&cm);
    atomic_store(&fword, 1);
    syscall(SYS_futex, &fword, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    atomic_store(&stop_ticking, 1);
    if (write(p_poll[1], "p", 1) != 1 || write(p_read[1], "r", 1) != 1)
        atomic_fetch_add(&failures, 1);
}

static void *t_ctl(void *arg) {
    (void)arg;
    pthread_mutex_lock(&held);
    START(T_CTL);
    char line[128];
    size_t len = 0;
    long eintr = 0;
    for (;;) {
        ssize_t r = read(ctl, line + len, sizeof line - 1 - len);
        if (r < 0 && errno == EINTR) {
            eintr++;
            continue;
        }
        if (r <= 0)
            break;
        len += r;
        line[len] = 0;
        char *nl = strchr(line, '\n');
        if (!nl) {
            if (len >= sizeof line - 1)
                len = 0;
            continue;
        }
        *nl = 0;
        if (strcmp(line, "go") == 0)
            break;
        say("ctl: unknown command %s", line);
        len = 0;
    }
    char extra[32];
    snprintf(extra, sizeof extra, "eintr=%ld", eintr);
    woke(T_CTL, my_tid, my_token, 0, 0, extra, eintr == 0);
    release();
    return NULL;
}

typedef void *(*fn_t)(void *);

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s CTLFIFO\n", argv[0]);
        return 2;
    }
    ctl = open(argv[1], O_RDWR | O_CLOEXEC);
    if (ctl < 0 || pipe2(p_read, O_CLOEXEC) || pipe2(p_poll, O_CLOEXEC)) {
        perror("cthreads: setup");
        return 2;
    }
    const pid_t my_tid = tid();
    const uint64_t my_token = token();
    say("start %s tid=%d token=%016llx", NAMES[NT], my_tid, (unsigned long long)my_token);
    /* ctl first (it takes the mutex), read before join (join needs its handle) */
    static const fn_t FNS[NT] = {t_tick, t_mutex, t_cond, t_join, t_futex, t_poll, t_read, t_ctl};
    static const int ORDER[NT] = {T_CTL, T_READ, T_TICK, T_MUTEX, T_COND, T_JOIN, T_FUTEX, T_POLL};
    for (int i = 0; i < NT; i++) {
        int k = ORDER[i];
        if (pthread_create(&th[k], NULL, FNS[k], NULL)) {
            perror("cthreads: pthread_create");
            return 2;
        }
        char name[16];
        snprintf(name, sizeof name, "ct-%s", NAMES[k]);
        pthread_setname_np(th[k], name);
        if (k == T_CTL)
            while (atomic_load(&started) < 1)
                usleep(1000);
    }
    while (atomic_load(&started) < NT)
        usleep(1000);
    say("ready threads=%d", NT + 1);
    int r = pthread_join(th[T_CTL], NULL);
    woke(NT, my_tid, my_token, r, 0, "", r == 0);   /* NAMES[NT] is "main" */
    for (int k = 0; k < NT; k++)
        if (k != T_CTL && k != T_READ)   /* the join thread joined read */
            pthread_join(th[k], NULL);
    int f = atomic_load(&failures);
    if (f)
        say("verdict FAIL failures=%d", f);
    else
        say("verdict ok");
    return f ? 1 : 0;
}
