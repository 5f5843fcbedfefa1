/* A target with varied signal state for the dump's batched reads
 * (engine/dumpbatch.py): handlers with flags and masks, an ignored signal
 * with flags, SIGCHLD's SA_NOCLDSTOP under SIG_DFL, a sigaltstack, interval
 * timers that do not fire while it sleeps. argv[1] (optional) adds one case:
 *   trap-ign      SIGTRAP ignored
 *   trap-pending  SIGTRAP blocked and pending
 *   rt-pending    SIGRTMAX blocked, one instance queued (si_value 4242)
 * Then it writes "ready\n" to argv[2] and sleeps in pause(). On SIGUSR1 it
 * unblocks everything and appends each handled signal as
 * "sig SIGNO CODE VALUE" to argv[2]. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>
#include <fcntl.h>

static const char *out;

static void note(int sig, siginfo_t *si, void *uc) {
    (void)uc;
    char buf[96];
    int n = snprintf(buf, sizeof buf, "sig %d %d %d\n", sig, si->si_code, si->si_value.sival_int);
    int fd = open(out, O_WRONLY | O_APPEND);
    if (fd >= 0) { if (write(fd, buf, n) < 0) {} close(fd); }
}

static void wake(int sig) { (void)sig; }

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "plain";
    out = argc > 2 ? argv[2] : "/dev/null";
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = note;
    sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_NODEFER;
    sigaddset(&sa.sa_mask, SIGHUP);
    sigaddset(&sa.sa_mask, SIGRTMIN + 3);
    sigaction(SIGUSR2, &sa, NULL);
    sigaction(SIGRTMAX, &sa, NULL);
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigaction(SIGTRAP, &sa, NULL);
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_IGN;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGPIPE, &sa, NULL);
    sa.sa_handler = SIG_DFL;
    sa.sa_flags = SA_NOCLDSTOP;
    sigaction(SIGCHLD, &sa, NULL);
    sa.sa_handler = wake;
    sa.sa_flags = 0;
    sigaction(SIGUSR1, &sa, NULL);
    stack_t ss = { .ss_sp = malloc(65536), .ss_size = 65536, .ss_flags = 0 };
    sigaltstack(&ss, NULL);
    struct itimerval it = { { 1000, 5 }, { 2000, 7 } };
    setitimer(ITIMER_REAL, &it, NULL);
    struct itimerval iv = { { 3000, 0 }, { 4000, 0 } };
    setitimer(ITIMER_VIRTUAL, &iv, NULL);
    sigset_t set;
    sigemptyset(&set);
    if (!strcmp(mode, "trap-ign")) {
        sa.sa_handler = SIG_IGN;
        sigaction(SIGTRAP, &sa, NULL);
    } else if (!strcmp(mode, "trap-pending")) {
        sigaddset(&set, SIGTRAP);
        sigprocmask(SIG_BLOCK, &set, NULL);
        raise(SIGTRAP);
    } else if (!strcmp(mode, "rt-pending")) {
        sigaddset(&set, SIGRTMAX);
        sigprocmask(SIG_BLOCK, &set, NULL);
        union sigval v = { .sival_int = 4242 };
        sigqueue(getpid(), SIGRTMAX, v);
    }
    int fd = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || write(fd, "ready\n", 6) != 6) return 1;
    close(fd);
    pause();    /* until SIGUSR1 */
    sigemptyset(&set);
    sigprocmask(SIG_SETMASK, &set, NULL);
    for (;;) pause();
}
