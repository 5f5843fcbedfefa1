/* A multi-threaded target for tests/test_engine_threads.py.
 *
 * argv[1]: output file (O_APPEND, one line per write), argv[2]: "go" file.
 * Threads block in: pthread_mutex_lock, pthread_cond_wait, pthread_join,
 * futex(FUTEX_WAIT) with a timeout, poll, read on a pipe; one ticks in
 * nanosleep (the joined one), one computes a checksum. Each thread sets its
 * own TLS marker, signal mask and sigaltstack and records its TID; when the
 * go file appears (after the restore) main releases them all and each
 * checks its own state and reports "ok NAME" or "FAIL NAME why".
 * The sleeper writes "tick N" lines (no gaps, no repeats: the proof of
 * continuation); main writes "main N" lines likewise.
 * argv[3] (optional): "unshare" - the lock thread has its own fs
 * (unshare(CLONE_FS): refused); "spawn" - a spawner thread creates a
 * short-lived thread every iteration ("spawn N" lines), so threads are
 * created while the freeze runs; "setuid" - the cond thread switches its own
 * uid (raw setresuid: per thread; refused); "personality" - the poll
 * thread sets its own personality (refused).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int out;
static const char *gofile;
static __thread long tls_marker;
static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t cm = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int pred;
static _Atomic int fw;                 /* futex word */
static int p_read[2], p_poll[2];
static _Atomic int stop;
static pthread_t sleeper;
static const char *mode = "";

static void say(const char *fmt, ...) {
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (write(out, buf, n) != n) _exit(9);
}

struct me { const char *name; int idx; pid_t tid; void *alt; sigset_t mask; };

static void setup(struct me *me) {
    me->tid = syscall(SYS_gettid);
    tls_marker = 1000 + me->idx;
    sigemptyset(&me->mask);
    sigaddset(&me->mask, SIGRTMIN + me->idx);
    pthread_sigmask(SIG_SETMASK, &me->mask, NULL);
    me->alt = malloc(65536);
    stack_t ss = { .ss_sp = me->alt, .ss_size = 65536, .ss_flags = 0 };
    sigaltstack(&ss, NULL);
    char comm[16];
    snprintf(comm, sizeof comm, "t-%s", me->name);
    pthread_setname_np(pthread_self(), comm);
    say("tid %s %d\n", me->name, me->tid);
    if (!strcmp(mode, "unshare") && me->idx == 1 && unshare(CLONE_FS)) say("FAIL unshare\n");
    if (!strcmp(mode, "setuid") && me->idx == 2 && syscall(SYS_setresuid, 0, 0, 1234)) say("FAIL setresuid\n");
    if (!strcmp(mode, "personality") && me->idx == 6 && syscall(SYS_personality, 0x0040000) == -1)
        say("FAIL personality\n");     /* ADDR_NO_RANDOMIZE, this thread only */
}

static void verify(struct me *me, const char *extra) {
    char why[200] = "";
    sigset_t cur;
    stack_t ss;
    char comm[16] = "", want[16];
    pthread_sigmask(SIG_SETMASK, NULL, &cur);
    sigaltstack(NULL, &ss);
    pthread_getname_np(pthread_self(), comm, sizeof comm);
    snprintf(want, sizeof want, "t-%s", me->name);
    if (syscall(SYS_gettid) != me->tid) snprintf(why, sizeof why, "tid %ld != %d", syscall(SYS_gettid), me->tid);
    else if (tls_marker != 1000 + me->idx) snprintf(why, sizeof why, "tls %ld", tls_marker);
    else if (memcmp(&cur, &me->mask, 8)) snprintf(why, sizeof why, "sigmask");
    else if (ss.ss_sp != me->alt || ss.ss_size != 65536) snprintf(why, sizeof why, "sigaltstack");
    else if (strcmp(comm, want)) snprintf(why, sizeof why, "comm %s", comm);
    if (*why) say("FAIL %s %s\n", me->name, why);
    else say("ok %s %s\n", me->name, extra);
}

static void *t_lock(void *a) {
    struct me *me = a; setup(me);
    pthread_mutex_lock(&m);
    pthread_mutex_unlock(&m);
    verify(me, "");
    return NULL;
}

static void *t_cond(void *a) {
    struct me *me = a; setup(me);
    pthread_mutex_lock(&cm);
    while (!pred) pthread_cond_wait(&cv, &cm);
    pthread_mutex_unlock(&cm);
    verify(me, "");
    return NULL;
}

static void *t_sleep(void *a) {
    struct me *me = a; setup(me);
    long n = 0;
    while (!stop) {
        struct timespec ts = { 0, 20 * 1000 * 1000 };
        while (nanosleep(&ts, &ts) == -1 && errno == EINTR) say("EINTR nanosleep\n");
        say("tick %ld\n", ++n);
    }
    verify(me, "");
    return NULL;
}

static void *t_join(void *a) {
    struct me *me = a; setup(me);
    int r = pthread_join(sleeper, NULL);
    verify(me, r ? "join-failed" : "");
    return NULL;
}

static void *t_futex(void *a) {
    struct me *me = a; setup(me);
    int eintr = 0;
    while (!atomic_load(&fw)) {
        struct timespec ts = { 120, 0 };
        long r = syscall(SYS_futex, &fw, FUTEX_WAIT_PRIVATE, 0, &ts, NULL, 0);
        if (r == -1 && errno == EINTR) eintr++;
        if (r == -1 && errno == ETIMEDOUT) { say("FAIL futex timeout\n"); break; }
    }
    verify(me, eintr ? "EINTR" : "");
    return NULL;
}

static void *t_poll(void *a) {
    struct me *me = a; setup(me);
    struct pollfd p = { .fd = p_poll[0], .events = POLLIN };
    int r = poll(&p, 1, -1);
    char c;
    if (r != 1 || read(p_poll[0], &c, 1) != 1) { say("FAIL poll r=%d errno=%d\n", r, errno); return NULL; }
    verify(me, "");
    return NULL;
}

static void *t_read(void *a) {
    struct me *me = a; setup(me);
    char c;
    ssize_t r = read(p_read[0], &c, 1);
    if (r != 1) { say("FAIL read r=%zd errno=%d\n", r, errno); return NULL; }
    verify(me, "");
    return NULL;
}

static _Atomic long spawned;

static void *t_short(void *a) {
    (void)a;
    atomic_fetch_add(&spawned, 1);
    return NULL;
}

static void *t_spawner(void *a) {
    (void)a;
    long n = 0;
    while (!atomic_load(&stop)) {
        pthread_t t;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&t, &at, t_short, NULL) == 0) n++;
        pthread_attr_destroy(&at);
        if (n % 100 == 0) say("spawn %ld\n", n / 100);
    }
    return NULL;
}

static void *t_busy(void *a) {
    struct me *me = a; setup(me);
    unsigned long n = 0, sum = 0, bad = 0;
    while (!atomic_load(&stop)) {
        n++; sum += n;
        if (sum != (n % 2 ? n * ((n + 1) / 2) : (n / 2) * (n + 1))) bad++;   /* exact mod 2^64 */
    }
    verify(me, bad ? "BADSUM" : "");
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    out = open(argv[1], O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    gofile = argv[2];
    if (argc > 3) mode = argv[3];
    if (out < 0 || pipe(p_read) || pipe(p_poll)) return 3;
    pthread_mutex_lock(&m);
    static struct me mes[] = { {"lock", 1}, {"cond", 2}, {"sleep", 3}, {"join", 4}, {"futex", 5},
                               {"poll", 6}, {"read", 7}, {"busy", 8} };
    void *(*fns[])(void *) = { t_lock, t_cond, t_sleep, t_join, t_futex, t_poll, t_read, t_busy };
    pthread_t th[8];
    for (int i = 0; i < 8; i++) {
        if (pthread_create(&th[i], NULL, fns[i], &mes[i])) return 4;
        if (i == 2) sleeper = th[i];
    }
    pthread_t sp;
    if (!strcmp(mode, "spawn") && pthread_create(&sp, NULL, t_spawner, NULL)) return 6;
    struct me main_me = { "main", 0 };
    setup(&main_me);
    say("ready\n");
    long n = 0;
    while (access(gofile, F_OK) != 0) {
        struct timespec ts = { 0, 10 * 1000 * 1000 };
        nanosleep(&ts, NULL);
        n++;
        if (n % 10 == 0) say("main %ld\n", n / 10);
    }
    pthread_mutex_unlock(&m);
    pthread_mutex_lock(&cm); pred = 1; pthread_cond_signal(&cv); pthread_mutex_unlock(&cm);
    if (write(p_read[1], "x", 1) != 1 || write(p_poll[1], "y", 1) != 1) return 5;
    atomic_store(&fw, 1);
    syscall(SYS_futex, &fw, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    atomic_store(&stop, 1);
    for (int i = 0; i < 8; i++)
        if (i != 2) pthread_join(th[i], NULL);
    if (!strcmp(mode, "spawn")) pthread_join(sp, NULL);
    verify(&main_me, "");
    say("done\n");
    return 0;
}
