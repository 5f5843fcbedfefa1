/* A target that sets the process attributes named on its command line and
 * reports them, as the process itself sees them, on each SIGUSR1:
 *   attrs OUT [nice5] [batch|idle|fifo] [cpu0] [oom321] [slack] [pers] [nnp]
 *             [timers] [seccomp] [seccomp2] [ioidle] [cdf] [nothp] [subreaper]
 *             [keepcaps] [mceearly] [undumpable] [nobody]
 *             [interleave] [preferred] [mbind]   (NUMA memory policies, node 0)
 *             [tscsegv] [ksm] [mdwe]   (last: no executable memory made after it)
 *             [semundo]   (a private SysV semaphore raised with SEM_UNDO)
 *             [threadpol]   (a second thread with a NUMA policy of its own: bind)
 *             [membarrier]   (registered for private expedited barriers, plain and sync-core)
 * (nobody: setresuid/setresgid 65534 last, after everything else.)
 * Report lines: "report k=v ...", one per SIGUSR1; "fire N" after each
 * expiry of timer A (SIGRTMIN+1, periodic). Everything static about the
 * process goes into "report" (the test compares it before the dump and
 * after the restore); the timer's progress goes into "fire"/"dyn" fields.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/personality.h>
#include <grp.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/sem.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

struct sched_attr_v1 {
    uint32_t size, policy;
    uint64_t flags;
    int32_t nice;
    uint32_t priority;
    uint64_t runtime, deadline, period;
    uint32_t util_min, util_max;
};

static int out = -1;
static volatile int thread_mpol = -1, policy_thread_on;
static void die(const char *what);

/* A thread with its own policy, reading it back (only a thread can) for the report. */
static void *policy_thread(void *arg) {
    unsigned long node0 = 1;
    (void)arg;
    if (syscall(SYS_set_mempolicy, 2 /* MPOL_BIND */, &node0, 2)) die("set_mempolicy (thread)");
    for (;;) {
        int mode = -1;
        unsigned long nodes[4] = {0};
        if (syscall(SYS_get_mempolicy, &mode, nodes, 256, NULL, 0) == 0) thread_mpol = mode << 8 | (int)nodes[0];
        usleep(2000);
    }
    return NULL;
}
static volatile sig_atomic_t want_report, fires, last_val, last_id, last_code, last_ovr;
static timer_t tid[5];
static int ntimers;

static void on_usr1(int s) { (void)s; want_report = 1; }

static void on_timer(int s, siginfo_t *si, void *u) {
    (void)s; (void)u;
    fires++;
    last_val = si->si_value.sival_int;
    last_id = si->si_timerid;
    last_code = si->si_code;
    last_ovr = si->si_overrun;
}

static void die(const char *what) {
    dprintf(2, "%s: %s\n", what, strerror(errno));
    exit(1);
}

static void filter(int nr, unsigned ret, unsigned flags) {
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, nr, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, ret),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof f / sizeof f[0], f};
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog)) die("seccomp");
}

static timer_t mk(clockid_t clk, int notify, int signo, int val) {
    struct sigevent ev;
    timer_t t;
    memset(&ev, 0, sizeof ev);
    ev.sigev_notify = notify;
    ev.sigev_signo = signo;
    ev.sigev_value.sival_int = val;
    if (notify == SIGEV_THREAD_ID) ev._sigev_un._tid = getpid();
    if (timer_create(clk, &ev, &t)) die("timer_create");
    return t;
}

static void arm(timer_t t, long first_ms, long every_ms) {
    struct itimerspec its = {{every_ms / 1000, every_ms % 1000 * 1000000}, {first_ms / 1000, first_ms % 1000 * 1000000}};
    if (timer_settime(t, 0, &its, NULL)) die("timer_settime");
}

static void report(void) {
    char buf[2048];
    int n = 0;
    struct sched_attr_v1 a;
    memset(&a, 0, sizeof a);
    if (syscall(SYS_sched_getattr, 0, &a, sizeof a, 0)) die("sched_getattr");
    cpu_set_t cpus;
    if (sched_getaffinity(0, sizeof cpus, &cpus)) die("sched_getaffinity");
    unsigned long mask = 0;
    for (int i = 0; i < 64; i++)
        if (CPU_ISSET(i, &cpus)) mask |= 1UL << i;
    char oom[32] = "";
    int fd = open("/proc/self/oom_score_adj", O_RDONLY);
    ssize_t k = read(fd, oom, sizeof oom - 1);
    close(fd);
    oom[k > 0 ? k - 1 : 0] = 0;
    errno = 0;
    int nice = getpriority(PRIO_PROCESS, 0);
    long slack = prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0);
    /* The default it falls back to: set 0, read, put back. */
    prctl(PR_SET_TIMERSLACK, 0, 0, 0, 0);
    long slackdef = prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0);
    prctl(PR_SET_TIMERSLACK, slack, 0, 0, 0);
    errno = 0;
    long ppid = syscall(SYS_getppid);
    int ppid_errno = ppid < 0 ? errno : 0;
    char cdf[32] = "";
    fd = open("/proc/self/coredump_filter", O_RDONLY);
    k = fd < 0 ? -1 : read(fd, cdf, sizeof cdf - 1);
    if (fd >= 0) close(fd);
    cdf[k > 0 ? k - 1 : 0] = 0;
    int mpol = -1;
    unsigned long mnodes[4] = {0};    /* 256 nodes: get_mempolicy wants at least nr_node_ids */
    if (syscall(SYS_get_mempolicy, &mpol, mnodes, 256, NULL, 0)) die("get_mempolicy");
    if (policy_thread_on) {     /* a fresh reading, not the one from before a dump */
        thread_mpol = -1;
        while (thread_mpol < 0) usleep(1000);
    }
    int tsc = -1;
    prctl(PR_GET_TSC, &tsc, 0, 0, 0);
    int subreaper = -1;
    prctl(PR_GET_CHILD_SUBREAPER, &subreaper, 0, 0, 0);
    n += snprintf(buf + n, sizeof buf - n,
                  "report mb=%ld:%ld thread_mpol=%#x tsc=%d mdwe=%d ksm=%d mpol=%#x:%lx ioprio=%ld cdf=%s thp_off=%d subreaper=%d keepcaps=%d mce=%d dumpable=%d uid=%d ",
                  syscall(SYS_membarrier, 1 << 3 /* PRIVATE_EXPEDITED */, 0, 0),
                  syscall(SYS_membarrier, 1 << 5 /* PRIVATE_EXPEDITED_SYNC_CORE */, 0, 0), thread_mpol, tsc, prctl(66 /* PR_GET_MDWE */, 0, 0, 0, 0), prctl(68 /* PR_GET_MEMORY_MERGE */, 0, 0, 0, 0),
                  mpol, mnodes[0], syscall(SYS_ioprio_get, 1, 0), cdf, prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0), subreaper,
                  prctl(PR_GET_KEEPCAPS, 0, 0, 0, 0), prctl(PR_MCE_KILL_GET, 0, 0, 0, 0),
                  prctl(PR_GET_DUMPABLE, 0, 0, 0, 0), (int)getuid());
    n += snprintf(buf + n, sizeof buf - n,
                  "nice=%d policy=%u flags=%lu prio=%u cpus=%lx oom=%s slack=%ld slackdef=%ld pers=%#x "
                  "nnp=%d seccomp=%d getppid_errno=%d restore_ids=%d",
                  nice, a.policy, (unsigned long)a.flags, a.priority, mask, oom, slack, slackdef,
                  personality(0xffffffff), prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0), prctl(PR_GET_SECCOMP, 0, 0, 0, 0),
                  ppid_errno, prctl(77 /* PR_TIMER_CREATE_RESTORE_IDS */, 2 /* _GET */, 0, 0, 0));
    for (int i = 0; i < ntimers; i++) {
        struct itimerspec its;
        errno = 0;
        int r = syscall(SYS_timer_gettime, (long)(intptr_t)tid[i], &its);
        n += snprintf(buf + n, sizeof buf - n, " t%ld=%s:%ld.%09ld:%s:ovr%d", (long)(intptr_t)tid[i],
                      r ? strerror(errno) : "ok", (long)its.it_interval.tv_sec, its.it_interval.tv_nsec,
                      r ? "-" : (its.it_value.tv_sec || its.it_value.tv_nsec) ? "armed" : "disarmed",
                      r ? -1 : (int)syscall(SYS_timer_getoverrun, (long)(intptr_t)tid[i]));
    }
    n += snprintf(buf + n, sizeof buf - n, " | dyn fires=%d val=%#x id=%d code=%d ovr=%d\n",
                  (int)fires, (unsigned)last_val, (int)last_id, (int)last_code, (int)last_ovr);
    if (write(out, buf, n) != n) die("write");
}

/* Strict mode allows read, write, exit and rt_sigreturn only: block in
 * read() on a self-pipe; SIGUSR1 asks for a line, SIGUSR2 for a forbidden
 * call (the kernel must then kill the process with SIGKILL). */
static int selfpipe[2];
static void poke_r(int s) { (void)s; if (write(selfpipe[1], "r", 1)) {} }
static void poke_g(int s) { (void)s; if (write(selfpipe[1], "g", 1)) {} }

static void strict_loop(void) {
    if (pipe(selfpipe)) die("pipe");
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_flags = SA_RESTART;
    sa.sa_handler = poke_r;
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_handler = poke_g;
    sigaction(SIGUSR2, &sa, NULL);
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT, 0, 0, 0)) die("PR_SET_SECCOMP");
    /* ready once in strict mode (write is allowed there): the test reads
     * Seccomp: 1 as soon as it sees the line */
    if (write(out, "ready\n", 6) != 6) _exit(1);
    for (int n = 1;; n++) {
        char c;
        if (read(selfpipe[0], &c, 1) != 1) continue;
        if (c == 'g') syscall(SYS_getppid);
        char line[] = "strict alive\n";
        if (write(out, line, sizeof line - 1)) {}
    }
}

int main(int argc, char **argv) {
    out = open(argv[1], O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (out < 0) die("open");
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_sigaction = on_timer;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGRTMIN + 1, &sa, NULL);
    for (int i = 2; i < argc; i++) {
        const char *w = argv[i];
        if (!strcmp(w, "nice5")) {
            if (setpriority(PRIO_PROCESS, 0, 5)) die("setpriority");
        } else if (!strcmp(w, "batch") || !strcmp(w, "idle") || !strcmp(w, "fifo")) {
            struct sched_param p = {.sched_priority = w[0] == 'f' ? 3 : 0};
            int pol = w[0] == 'b' ? SCHED_BATCH | SCHED_RESET_ON_FORK : w[0] == 'i' ? SCHED_IDLE : SCHED_FIFO;
            if (sched_setscheduler(0, pol, &p)) die("sched_setscheduler");
        } else if (!strcmp(w, "cpu0")) {
            cpu_set_t c;
            CPU_ZERO(&c);
            CPU_SET(0, &c);
            if (sched_setaffinity(0, sizeof c, &c)) die("sched_setaffinity");
        } else if (!strcmp(w, "oom321")) {
            int fd = open("/proc/self/oom_score_adj", O_WRONLY);
            if (fd < 0 || write(fd, "321", 3) != 3) die("oom_score_adj");
            close(fd);
        } else if (!strcmp(w, "slack")) {
            /* Its default (what PR_SET_TIMERSLACK 0 returns to) is the
             * parent's slack at fork: the test sets that to 77777. */
            if (prctl(PR_SET_TIMERSLACK, 123456, 0, 0, 0)) die("PR_SET_TIMERSLACK");
        } else if (!strcmp(w, "pers")) {
            if (personality(ADDR_NO_RANDOMIZE | READ_IMPLIES_EXEC) < 0) die("personality");
        } else if (!strcmp(w, "ioidle")) {
            if (syscall(SYS_ioprio_set, 1, 0, 3 << 13)) die("ioprio_set");
        } else if (!strcmp(w, "cdf")) {
            int fd = open("/proc/self/coredump_filter", O_WRONLY);
            if (fd < 0 || write(fd, "0x7", 3) != 3) die("coredump_filter");
            close(fd);
        } else if (!strcmp(w, "nothp")) {
            if (prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)) die("PR_SET_THP_DISABLE");
        } else if (!strcmp(w, "subreaper")) {
            if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) die("PR_SET_CHILD_SUBREAPER");
        } else if (!strcmp(w, "keepcaps")) {
            if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)) die("PR_SET_KEEPCAPS");
        } else if (!strcmp(w, "mceearly")) {
            if (prctl(PR_MCE_KILL, PR_MCE_KILL_SET, PR_MCE_KILL_EARLY, 0, 0)) die("PR_MCE_KILL");
        } else if (!strcmp(w, "undumpable")) {
            if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)) die("PR_SET_DUMPABLE");
        } else if (!strcmp(w, "interleave") || !strcmp(w, "preferred")) {
            /* MPOL_INTERLEAVE | MPOL_F_STATIC_NODES, MPOL_PREFERRED | MPOL_F_RELATIVE_NODES */
            unsigned long node0 = 1;
            int mode = w[0] == 'i' ? 3 | 1 << 15 : 1 | 1 << 14;
            if (syscall(SYS_set_mempolicy, mode, &node0, 2)) die("set_mempolicy");
        } else if (!strcmp(w, "threadpol")) {
            pthread_t th;
            if (pthread_create(&th, NULL, policy_thread, NULL)) die("pthread_create");
            policy_thread_on = 1;
            while (thread_mpol < 0) usleep(1000);
        } else if (!strcmp(w, "membarrier")) {
            if (syscall(SYS_membarrier, 1 << 4, 0, 0) || syscall(SYS_membarrier, 1 << 6, 0, 0)) die("membarrier");
        } else if (!strcmp(w, "semundo")) {
            struct sembuf up = {0, 1, SEM_UNDO};
            int id = semget(IPC_PRIVATE, 1, 0600);
            if (id < 0 || semop(id, &up, 1)) die("semop");
        } else if (!strcmp(w, "tscsegv")) {
            if (prctl(PR_SET_TSC, PR_TSC_SIGSEGV, 0, 0, 0)) die("PR_SET_TSC");
        } else if (!strcmp(w, "ksm")) {
            if (prctl(67 /* PR_SET_MEMORY_MERGE */, 1, 0, 0, 0)) die("PR_SET_MEMORY_MERGE");
        } else if (!strcmp(w, "mdwe")) {
            if (prctl(65 /* PR_SET_MDWE */, 1 /* PR_MDWE_REFUSE_EXEC_GAIN */, 0, 0, 0)) die("PR_SET_MDWE");
        } else if (!strcmp(w, "mbind")) {
            unsigned long node0 = 1;
            void *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (m == MAP_FAILED || syscall(SYS_mbind, m, 4096, 2 /* MPOL_BIND */, &node0, 2, 0)) die("mbind");
        } else if (!strcmp(w, "nobody")) {
            /* after the loop */
        } else if (!strcmp(w, "nnp")) {
            if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) die("PR_SET_NO_NEW_PRIVS");
        } else if (!strcmp(w, "timers")) {
            /* IDs 0 (A), 1 (deleted), 2 (C), 3 (D), 4 (E) */
            tid[0] = mk(CLOCK_MONOTONIC, SIGEV_SIGNAL, SIGRTMIN + 1, 0xabc);
            timer_t b = mk(CLOCK_MONOTONIC, SIGEV_SIGNAL, SIGRTMIN + 1, 0xb);
            tid[1] = mk(CLOCK_REALTIME, SIGEV_SIGNAL, SIGUSR2, 0x1234);
            tid[2] = mk(CLOCK_BOOTTIME, SIGEV_NONE, 0, 0x55);
            tid[3] = mk(CLOCK_MONOTONIC, SIGEV_THREAD_ID, SIGRTMIN + 2, 0x66);
            tid[4] = b;
            timer_delete(b);
            arm(tid[1], 5000, 1000);
            arm(tid[1], 0, 0);            /* stopped again: disarmed, interval gone */
            arm(tid[2], 1000000, 7000);   /* SIGEV_NONE: only timer_gettime sees it */
            arm(tid[0], 500, 500);
            ntimers = 5;
        } else if (!strcmp(w, "overrun")) {
            /* A CPU-time timer expires ~30 times while its signal is
             * blocked: the handler then sees si_overrun ~29, and
             * timer_getoverrun keeps reporting it (it only advances with
             * this process's CPU time, which the idle loop hardly uses). */
            sigset_t m;
            sigemptyset(&m);
            sigaddset(&m, SIGRTMIN + 1);
            sigprocmask(SIG_BLOCK, &m, NULL);
            tid[0] = mk(CLOCK_PROCESS_CPUTIME_ID, SIGEV_SIGNAL, SIGRTMIN + 1, 0xabc);
            ntimers = 1;
            arm(tid[0], 1, 1);
            struct timespec t0, t1;
            clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t0);
            do clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t1);
            while ((t1.tv_sec - t0.tv_sec) * 1000000000L + t1.tv_nsec - t0.tv_nsec < 30000000L);
            sigprocmask(SIG_UNBLOCK, &m, NULL);
        } else if (!strcmp(w, "seccompkill")) {
            /* Calls ckpt injects to read or rebuild the process: without
             * PTRACE_O_SUSPEND_SECCOMP they would kill it. */
            filter(SYS_getitimer, SECCOMP_RET_KILL_PROCESS, 0);
            filter(SYS_sigaltstack, SECCOMP_RET_KILL_PROCESS, 0);
            filter(SYS_rseq, SECCOMP_RET_KILL_PROCESS, 0);
            filter(SYS_munmap, SECCOMP_RET_KILL_PROCESS, 0);
        } else if (!strcmp(w, "strict")) {
            strict_loop();
        } else if (!strcmp(w, "seccomp")) {
            filter(SYS_getppid, SECCOMP_RET_ERRNO | EPERM, 0);
        } else if (!strcmp(w, "seccomp2")) {
            /* The newer filter wins among equal actions: EACCES if the
             * order is kept. */
            filter(SYS_getppid, SECCOMP_RET_ERRNO | EACCES, SECCOMP_FILTER_FLAG_LOG);
        } else {
            errno = EINVAL;
            die(w);
        }
    }
    for (int i = 2; i < argc; i++)
        if (!strcmp(argv[i], "nobody") &&
            (setgroups(0, NULL) || setresgid(65534, 65534, 65534) || setresuid(65534, 65534, 65534) ||
             /* the change of ids made it fs.suid_dumpable; as daemons do: */
             prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)))
            die("nobody");
    if (write(out, "ready\n", 6) != 6) die("write");
    int seen = 0;
    for (;;) {
        struct timespec ts = {0, 20 * 1000000};
        nanosleep(&ts, NULL);
        if (fires != seen) {
            seen = fires;
            dprintf(out, "fire %d id=%d val=%#x code=%d\n", seen, (int)last_id, (unsigned)last_val, (int)last_code);
        }
        if (want_report) {
            want_report = 0;
            report();
        }
    }
}
