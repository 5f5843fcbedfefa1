/* Test target for interrupted syscalls and pending signals.
 *
 * usage: blocker OUT MODE [MS [restart]]
 * fds: 3 = OUT (append), 4/5 = a pipe (read/write end; a test writes into
 * it through /proc/PID/fd/5), 6 = an epoll instance watching fd 4.
 * Every line goes to OUT with one write(2), so a line is never torn.
 *
 * Call modes make ONE raw syscall (no EINTR retry loop: an EINTR is the
 * bug the tests look for), then write
 *   "done MODE ret=R errno=E elapsed_ms=T [extra]"
 * and wait in pause() forever:
 *   poll_inf poll_timeout nanosleep clock_rel clock_abs futex select pselect
 *   epoll read sigtimedwait
 * MS is the timeout / sleep (default 1000; the "inf" waits ignore it).
 * sigtimedwait waits for SIGUSR2 (blocked) and adds "sig=S value=V".
 *
 * Mode "sigs": SIGUSR1, SIGRTMIN+1 and SIGRTMIN+2 are blocked; every
 * signal handler (SA_SIGINFO, sa_mask full so handlers run one at a time in
 * delivery order; SA_RESTART only when argv[4] is "restart") writes
 *   "sig SIGNO code=C pid=P uid=U value=V"
 * It then blocks in read() on the pipe, writes "read ret=R errno=E", unblocks
 * everything (the pending signals' handlers run), writes "unblocked" and
 * waits in pause().
 *
 * Mode "thread_sigs": the main thread blocks every signal and waits in
 * pause(); a second thread, with only SIGUSR2 unblocked (so it alone can
 * take one sent to the process), writes "ready tid=T", blocks in one raw
 * read() on the pipe and writes "read ret=R errno=E" (handler as above).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int out = -1;

static void say(const char *s) { (void)!write(out, s, strlen(s)); }

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void on_sig(int sig, siginfo_t *si, void *uc) {
    char line[160];
    (void)uc;
    int n = snprintf(line, sizeof line, "sig %d code=%d pid=%d uid=%u value=%d\n", sig, si->si_code,
                     (int)si->si_pid, (unsigned)si->si_uid, si->si_value.sival_int);
    (void)!write(out, line, n);
}

static int pipe_r = -1;

static void *reader(void *arg) {
    (void)arg;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR2);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    char line[128], buf[16];
    snprintf(line, sizeof line, "ready tid=%ld\n", (long)syscall(SYS_gettid));
    say(line);
    long r = syscall(SYS_read, pipe_r, buf, sizeof buf);
    snprintf(line, sizeof line, "read ret=%ld errno=%d\n", r, r < 0 ? errno : 0);
    say(line);
    for (;;) pause();
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    const char *mode = argv[2];
    long ms = argc > 3 ? atol(argv[3]) : 1000;
    out = open(argv[1], O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    int p[2];
    if (out != 3 || pipe(p) != 0 || p[0] != 4) return 3;
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 4242};
    if (ep != 6 || epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &ev) != 0) return 4;

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sig;
    sa.sa_flags = SA_SIGINFO | (argc > 4 && !strcmp(argv[4], "restart") ? SA_RESTART : 0);
    sigfillset(&sa.sa_mask);
    int hs[] = {SIGUSR1, SIGUSR2, SIGRTMIN + 1, SIGRTMIN + 2};
    for (unsigned i = 0; i < sizeof hs / sizeof hs[0]; i++) sigaction(hs[i], &sa, NULL);

    char line[256];
    long long t0 = now_ns();
    struct timespec rel = {ms / 1000, (ms % 1000) * 1000000L};
    long r = 0;
    char extra[64] = "";

    if (!strcmp(mode, "sigs")) {
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGUSR1);
        sigaddset(&set, SIGRTMIN + 1);
        sigaddset(&set, SIGRTMIN + 2);
        sigprocmask(SIG_BLOCK, &set, NULL);
        say("ready\n");
        char buf[16];
        r = read(p[0], buf, sizeof buf);
        snprintf(line, sizeof line, "read ret=%ld errno=%d\n", r, r < 0 ? errno : 0);
        say(line);
        sigprocmask(SIG_UNBLOCK, &set, NULL);
        say("unblocked\n");
        for (;;) pause();
    }

    if (!strcmp(mode, "thread_sigs")) {
        sigset_t all;
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, NULL);
        pipe_r = p[0];
        pthread_t t;
        if (pthread_create(&t, NULL, reader, NULL) != 0) return 6;
        for (;;) pause();
    }

    if (!strcmp(mode, "sigtimedwait")) {
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGUSR2);
        sigprocmask(SIG_BLOCK, &set, NULL);
    }
    say("ready\n");
    errno = 0;
    if (!strcmp(mode, "poll_inf") || !strcmp(mode, "poll_timeout")) {
        struct pollfd pf = {.fd = p[0], .events = POLLIN};
        r = syscall(SYS_poll, &pf, 1, !strcmp(mode, "poll_inf") ? -1 : (int)ms);
        snprintf(extra, sizeof extra, "revents=%d", pf.revents);
    } else if (!strcmp(mode, "nanosleep")) {
        r = syscall(SYS_nanosleep, &rel, NULL);
    } else if (!strcmp(mode, "clock_rel")) {
        r = syscall(SYS_clock_nanosleep, CLOCK_MONOTONIC, 0, &rel, NULL);
    } else if (!strcmp(mode, "clock_abs")) {
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_sec += rel.tv_sec;
        until.tv_nsec += rel.tv_nsec;
        if (until.tv_nsec >= 1000000000L) { until.tv_sec++; until.tv_nsec -= 1000000000L; }
        r = syscall(SYS_clock_nanosleep, CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL);
    } else if (!strcmp(mode, "futex")) {
        static int word;
        r = syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, 0, &rel, NULL, 0);
    } else if (!strcmp(mode, "select") || !strcmp(mode, "pselect")) {
        fd_set rs;
        FD_ZERO(&rs);
        FD_SET(p[0], &rs);
        if (!strcmp(mode, "select")) {
            struct timeval tv = {60, 0};
            r = syscall(SYS_select, p[0] + 1, &rs, NULL, NULL, &tv);
        } else {
            struct timespec ts = {60, 0};
            sigset_t m;
            sigemptyset(&m);
            struct { const sigset_t *ss; size_t len; } sm = {&m, 8};
            r = syscall(SYS_pselect6, p[0] + 1, &rs, NULL, NULL, &ts, &sm);
        }
        snprintf(extra, sizeof extra, "isset=%d", FD_ISSET(p[0], &rs) ? 1 : 0);
    } else if (!strcmp(mode, "epoll")) {
        struct epoll_event got = {0};
        r = syscall(SYS_epoll_wait, ep, &got, 1, -1);
        snprintf(extra, sizeof extra, "data=%llu", (unsigned long long)got.data.u64);
    } else if (!strcmp(mode, "read")) {
        char buf[64] = {0};
        r = syscall(SYS_read, p[0], buf, sizeof buf - 1);
        snprintf(extra, sizeof extra, "data=%s", buf);
    } else if (!strcmp(mode, "sigtimedwait")) {
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGUSR2);
        siginfo_t si;
        memset(&si, 0, sizeof si);
        struct timespec ts = {60, 0};
        r = syscall(SYS_rt_sigtimedwait, &set, &si, &ts, 8);
        snprintf(extra, sizeof extra, "sig=%d value=%d", si.si_signo, si.si_value.sival_int);
    } else {
        return 5;
    }
    int e = r < 0 ? errno : 0;
    snprintf(line, sizeof line, "done %s ret=%ld errno=%d elapsed_ms=%lld %s\n", mode, r, e,
             (now_ns() - t0) / 1000000, extra);
    say(line);
    for (;;) pause();
}
