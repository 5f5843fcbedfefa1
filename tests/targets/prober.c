/* A prober: sets the pieces of process and thread state named on its
 * command line and, on each SIGUSR1, reads back from inside everything it
 * set, as one line "report k=v ..." in OUT. A test compares the line before
 * a dump and after the restore (tests/test_engine_probe.py): any difference
 * is state the engine lost.
 *   prober OUT [regs] [owner] [mlockfuture] [onfault] [sud] [altstack]
 *              [fileflags DIR] [vmaname] [autogroup] [landlock]
 * regs: the main thread waits in rt_sigsuspend inside an assembly routine with
 *   zmm0-31 (ymm0-15 without AVX-512), k0-7, MXCSR, the x87 control word and
 *   the x87 stack loaded with known values, and checks them when the wait
 *   returns; the report says whether each survived.
 * owner: F_SETOWN / F_SETOWN_EX / F_SETSIG on fds without O_ASYNC (a pipe,
 *   a socket: what SIGURG and a later O_ASYNC go by).
 * mlockfuture / onfault: mlockall(MCL_FUTURE [| MCL_ONFAULT]), nothing
 *   mapped after it; the report maps a new page, reads its VmFlags and
 *   unmaps it.
 * sud: syscall user dispatch on (selector ALLOW); the report blocks and
 *   makes one syscall, which must raise SIGSYS.
 * sudblock: the same with the selector on BLOCK all along and libc's text
 *   the allowed range (as Wine runs): the prober waits in libc's sigsuspend.
 * autogroup: its autogroup's nice set to 7 (it is a session leader).
 * landlock: a Landlock domain forbidding reading files.
 * nobody: uid and gid 65534 (after the words before it).
 * misc: interval timers, alarm, timer slack, tid address, robust list,
 *   gs base, personality, an rlimit, umask, a pipe's size, groups, fsgid,
 *   an ambient and a dropped bounding capability, two more threads (one's name).
 * threadattrs: misc, its other threads with keep-caps and the early MCE
 *   kill policy of its own (the leader has neither).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/landlock.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef PR_SET_VMA
#define PR_SET_VMA 0x53564d41
#define PR_SET_VMA_ANON_NAME 0
#endif
#ifndef PR_SET_SYSCALL_USER_DISPATCH
#define PR_SET_SYSCALL_USER_DISPATCH 59
#endif
#define PR_SYS_DISPATCH_ON 1
#define SYSCALL_DISPATCH_FILTER_ALLOW 0
#define SYSCALL_DISPATCH_FILTER_BLOCK 1
#ifndef SS_AUTODISARM
#define SS_AUTODISARM (1U << 31)
#endif
#ifndef MCL_ONFAULT
#define MCL_ONFAULT 4
#endif

static int out = -1;
static volatile sig_atomic_t want_report;
static char line[8192];
static size_t len;

static void die(const char *what) {
    dprintf(2, "prober: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void put(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void put(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    len += vsnprintf(line + len, sizeof line - len, fmt, ap);
    va_end(ap);
}

/* ---- registers ------------------------------------------------------------ */
struct regs {
    uint8_t z[32][64];
    uint64_t k[8];
    uint32_t mxcsr;
    uint16_t fcw;
    double st[8];
};
static struct regs want_regs, got_regs;
static int have_avx512;
/* regs_pause(in, out, avx512, mask): load, rt_sigsuspend(mask), store (SysV:
 * rdi, rsi, edx, rcx). SIGUSR1 is blocked outside the wait, so a report
 * signal sent before the wait is entered ends it rather than being lost.
 * The vector registers and k0-7 are caller-saved; MXCSR and the x87 control
 * word are put back to the caller's values before returning. */
__asm__(
    ".text\n.globl regs_pause\n.type regs_pause,@function\nregs_pause:\n"
    "  sub $16, %rsp\n  stmxcsr (%rsp)\n  fnstcw 4(%rsp)\n"
    "  test %edx, %edx\n  jz 1f\n"
    "  vmovdqu64 0*64(%rdi), %zmm0\n  vmovdqu64 1*64(%rdi), %zmm1\n  vmovdqu64 2*64(%rdi), %zmm2\n"
    "  vmovdqu64 3*64(%rdi), %zmm3\n  vmovdqu64 4*64(%rdi), %zmm4\n  vmovdqu64 5*64(%rdi), %zmm5\n"
    "  vmovdqu64 6*64(%rdi), %zmm6\n  vmovdqu64 7*64(%rdi), %zmm7\n  vmovdqu64 8*64(%rdi), %zmm8\n"
    "  vmovdqu64 9*64(%rdi), %zmm9\n  vmovdqu64 10*64(%rdi), %zmm10\n  vmovdqu64 11*64(%rdi), %zmm11\n"
    "  vmovdqu64 12*64(%rdi), %zmm12\n  vmovdqu64 13*64(%rdi), %zmm13\n  vmovdqu64 14*64(%rdi), %zmm14\n"
    "  vmovdqu64 15*64(%rdi), %zmm15\n  vmovdqu64 16*64(%rdi), %zmm16\n  vmovdqu64 17*64(%rdi), %zmm17\n"
    "  vmovdqu64 18*64(%rdi), %zmm18\n  vmovdqu64 19*64(%rdi), %zmm19\n  vmovdqu64 20*64(%rdi), %zmm20\n"
    "  vmovdqu64 21*64(%rdi), %zmm21\n  vmovdqu64 22*64(%rdi), %zmm22\n  vmovdqu64 23*64(%rdi), %zmm23\n"
    "  vmovdqu64 24*64(%rdi), %zmm24\n  vmovdqu64 25*64(%rdi), %zmm25\n  vmovdqu64 26*64(%rdi), %zmm26\n"
    "  vmovdqu64 27*64(%rdi), %zmm27\n  vmovdqu64 28*64(%rdi), %zmm28\n  vmovdqu64 29*64(%rdi), %zmm29\n"
    "  vmovdqu64 30*64(%rdi), %zmm30\n  vmovdqu64 31*64(%rdi), %zmm31\n"
    "  kmovq 2048+0(%rdi), %k0\n  kmovq 2048+8(%rdi), %k1\n  kmovq 2048+16(%rdi), %k2\n  kmovq 2048+24(%rdi), %k3\n"
    "  kmovq 2048+32(%rdi), %k4\n  kmovq 2048+40(%rdi), %k5\n  kmovq 2048+48(%rdi), %k6\n  kmovq 2048+56(%rdi), %k7\n"
    "  jmp 2f\n"
    "1:\n"
    "  vmovdqu 0*64(%rdi), %ymm0\n  vmovdqu 1*64(%rdi), %ymm1\n  vmovdqu 2*64(%rdi), %ymm2\n  vmovdqu 3*64(%rdi), %ymm3\n"
    "  vmovdqu 4*64(%rdi), %ymm4\n  vmovdqu 5*64(%rdi), %ymm5\n  vmovdqu 6*64(%rdi), %ymm6\n  vmovdqu 7*64(%rdi), %ymm7\n"
    "  vmovdqu 8*64(%rdi), %ymm8\n  vmovdqu 9*64(%rdi), %ymm9\n  vmovdqu 10*64(%rdi), %ymm10\n  vmovdqu 11*64(%rdi), %ymm11\n"
    "  vmovdqu 12*64(%rdi), %ymm12\n  vmovdqu 13*64(%rdi), %ymm13\n  vmovdqu 14*64(%rdi), %ymm14\n  vmovdqu 15*64(%rdi), %ymm15\n"
    "2:\n"
    "  ldmxcsr 2112(%rdi)\n  fldcw 2116(%rdi)\n"
    "  fldl 2120+56(%rdi)\n  fldl 2120+48(%rdi)\n  fldl 2120+40(%rdi)\n  fldl 2120+32(%rdi)\n"
    "  fldl 2120+24(%rdi)\n  fldl 2120+16(%rdi)\n  fldl 2120+8(%rdi)\n  fldl 2120+0(%rdi)\n"
    "  mov %rsi, %r8\n  mov %edx, %r9d\n"
    "  mov %rcx, %rdi\n  mov $8, %esi\n"
    "  mov $130, %eax\n  syscall\n"         /* rt_sigsuspend: -EINTR on the report signal */
    "  mov %r8, %rsi\n"
    "  stmxcsr 2112(%rsi)\n  fnstcw 2116(%rsi)\n"
    "  fstpl 2120+0(%rsi)\n  fstpl 2120+8(%rsi)\n  fstpl 2120+16(%rsi)\n  fstpl 2120+24(%rsi)\n"
    "  fstpl 2120+32(%rsi)\n  fstpl 2120+40(%rsi)\n  fstpl 2120+48(%rsi)\n  fstpl 2120+56(%rsi)\n"
    "  test %r9d, %r9d\n  jz 3f\n"
    "  vmovdqu64 %zmm0, 0*64(%rsi)\n  vmovdqu64 %zmm1, 1*64(%rsi)\n  vmovdqu64 %zmm2, 2*64(%rsi)\n"
    "  vmovdqu64 %zmm3, 3*64(%rsi)\n  vmovdqu64 %zmm4, 4*64(%rsi)\n  vmovdqu64 %zmm5, 5*64(%rsi)\n"
    "  vmovdqu64 %zmm6, 6*64(%rsi)\n  vmovdqu64 %zmm7, 7*64(%rsi)\n  vmovdqu64 %zmm8, 8*64(%rsi)\n"
    "  vmovdqu64 %zmm9, 9*64(%rsi)\n  vmovdqu64 %zmm10, 10*64(%rsi)\n  vmovdqu64 %zmm11, 11*64(%rsi)\n"
    "  vmovdqu64 %zmm12, 12*64(%rsi)\n  vmovdqu64 %zmm13, 13*64(%rsi)\n  vmovdqu64 %zmm14, 14*64(%rsi)\n"
    "  vmovdqu64 %zmm15, 15*64(%rsi)\n  vmovdqu64 %zmm16, 16*64(%rsi)\n  vmovdqu64 %zmm17, 17*64(%rsi)\n"
    "  vmovdqu64 %zmm18, 18*64(%rsi)\n  vmovdqu64 %zmm19, 19*64(%rsi)\n  vmovdqu64 %zmm20, 20*64(%rsi)\n"
    "  vmovdqu64 %zmm21, 21*64(%rsi)\n  vmovdqu64 %zmm22, 22*64(%rsi)\n  vmovdqu64 %zmm23, 23*64(%rsi)\n"
    "  vmovdqu64 %zmm24, 24*64(%rsi)\n  vmovdqu64 %zmm25, 25*64(%rsi)\n  vmovdqu64 %zmm26, 26*64(%rsi)\n"
    "  vmovdqu64 %zmm27, 27*64(%rsi)\n  vmovdqu64 %zmm28, 28*64(%rsi)\n  vmovdqu64 %zmm29, 29*64(%rsi)\n"
    "  vmovdqu64 %zmm30, 30*64(%rsi)\n  vmovdqu64 %zmm31, 31*64(%rsi)\n"
    "  kmovq %k0, 2048+0(%rsi)\n  kmovq %k1, 2048+8(%rsi)\n  kmovq %k2, 2048+16(%rsi)\n  kmovq %k3, 2048+24(%rsi)\n"
    "  kmovq %k4, 2048+32(%rsi)\n  kmovq %k5, 2048+40(%rsi)\n  kmovq %k6, 2048+48(%rsi)\n  kmovq %k7, 2048+56(%rsi)\n"
    "  jmp 4f\n"
    "3:\n"
    "  vmovdqu %ymm0, 0*64(%rsi)\n  vmovdqu %ymm1, 1*64(%rsi)\n  vmovdqu %ymm2, 2*64(%rsi)\n  vmovdqu %ymm3, 3*64(%rsi)\n"
    "  vmovdqu %ymm4, 4*64(%rsi)\n  vmovdqu %ymm5, 5*64(%rsi)\n  vmovdqu %ymm6, 6*64(%rsi)\n  vmovdqu %ymm7, 7*64(%rsi)\n"
    "  vmovdqu %ymm8, 8*64(%rsi)\n  vmovdqu %ymm9, 9*64(%rsi)\n  vmovdqu %ymm10, 10*64(%rsi)\n  vmovdqu %ymm11, 11*64(%rsi)\n"
    "  vmovdqu %ymm12, 12*64(%rsi)\n  vmovdqu %ymm13, 13*64(%rsi)\n  vmovdqu %ymm14, 14*64(%rsi)\n  vmovdqu %ymm15, 15*64(%rsi)\n"
    "4:\n"
    "  vzeroupper\n  ldmxcsr (%rsp)\n  fldcw 4(%rsp)\n  add $16, %rsp\n  ret\n");
void regs_pause(const struct regs *in, struct regs *outp, int avx512, const sigset_t *mask);

static void regs_init(void) {
    have_avx512 = __builtin_cpu_supports("avx512f");
    for (int r = 0; r < 32; r++)
        for (int b = 0; b < 64; b++) want_regs.z[r][b] = (uint8_t)(r * 64 + b * 7 + 1);
    for (int i = 0; i < 8; i++) want_regs.k[i] = 0x0101010101010101ull * (i + 1) ^ 0xf0f0f0f0a5a5a5a5ull;
    want_regs.mxcsr = 0xdfc0;     /* FTZ, DAZ, round up, every exception masked */
    want_regs.fcw = 0x0b7f;       /* round up, 64-bit precision */
    for (int i = 0; i < 8; i++) want_regs.st[i] = 1.25 + i * 1000.5;
}

static void regs_report(void) {
    int nz = have_avx512 ? 32 : 16, width = have_avx512 ? 64 : 32, bad = 0;
    for (int r = 0; r < nz; r++)
        if (memcmp(want_regs.z[r], got_regs.z[r], width)) { put("vec%d=BAD ", r); bad++; }
    if (have_avx512)
        for (int i = 0; i < 8; i++)
            if (want_regs.k[i] != got_regs.k[i]) { put("k%d=BAD ", i); bad++; }
    for (int i = 0; i < 8; i++)
        if (want_regs.st[i] != got_regs.st[i]) { put("st%d=BAD ", i); bad++; }
    put("mxcsr=%#x fcw=%#x regs_bad=%d ", got_regs.mxcsr, got_regs.fcw, bad);
}

/* ---- fd owners ---------------------------------------------------------- */
#ifndef F_SETSIG
#define F_SETSIG 10
#define F_GETSIG 11
#endif
struct f_owner_ex_ { int type; pid_t pid; };
static int owner_fds[3] = {-1, -1, -1};

static void owner_setup(void) {
    int p[2], s[2];
    if (pipe(p) || socketpair(AF_UNIX, SOCK_STREAM, 0, s)) die("pipe/socketpair");
    if (fcntl(p[0], F_SETOWN, getpid()) || fcntl(p[0], F_SETSIG, SIGRTMIN + 2)) die("F_SETOWN pipe");
    struct f_owner_ex_ ex = {0 /* F_OWNER_TID */, (pid_t)syscall(SYS_gettid)};
    if (fcntl(s[0], F_SETOWN_EX, &ex)) die("F_SETOWN_EX socket");
    if (fcntl(s[1], F_SETOWN, -getpgrp())) die("F_SETOWN pgrp");
    owner_fds[0] = p[0];
    owner_fds[1] = s[0];
    owner_fds[2] = s[1];
}

static void owner_report(void) {
    for (int i = 0; i < 3; i++) {
        struct f_owner_ex_ ex = {-1, -1};
        if (owner_fds[i] < 0) continue;
        fcntl(owner_fds[i], F_GETOWN_EX, &ex);
        put("own%d=%d:%d sig%d=%d ", i, ex.type, ex.pid == getpid() || ex.pid == getpgrp() ? 1 : ex.pid, i,
            fcntl(owner_fds[i], F_GETSIG));
    }
}

/* ---- mlockall(MCL_FUTURE) ----------------------------------------------- */
static void vmflags_of(void *addr, char *buf, size_t n) {
    char want[64], l[512];
    FILE *f = fopen("/proc/self/smaps", "r");
    int on = 0;
    snprintf(want, sizeof want, "%lx-", (unsigned long)addr);
    snprintf(buf, n, "none");
    while (f && fgets(l, sizeof l, f)) {
        if (!strncmp(l, want, strlen(want))) on = 1;
        else if (on && !strncmp(l, "VmFlags:", 8)) {
            l[strcspn(l, "\n")] = 0;
            snprintf(buf, n, "%s", l + 9);
            for (char *c = buf; *c; c++) if (*c == ' ') *c = ',';
            break;
        }
    }
    if (f) fclose(f);
}

static int mlock_on;
static void mlock_report(void) {
    char fl[512];
    void *p = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) die("mmap");
    vmflags_of(p, fl, sizeof fl);
    munmap(p, 4096);
    put("newmap=%s ", fl);
}

/* ---- syscall user dispatch ---------------------------------------------- */
static volatile char sud_selector = SYSCALL_DISPATCH_FILTER_ALLOW;
static volatile sig_atomic_t sigsys_seen;
static int sud_on;
static void on_sigsys(int s, siginfo_t *si, void *uc) {
    (void)s; (void)uc;
    sud_selector = SYSCALL_DISPATCH_FILTER_ALLOW;
    sigsys_seen = si->si_code;
}
static int sud_block;      /* sudblock: BLOCK all along, libc's text the allowed range */
static long raw_getppid(void) {   /* a system call from the prober's own text */
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"((long)SYS_getppid) : "rcx", "r11", "memory");
    return r;
}
static void sud_report(void) {
    sigsys_seen = 0;
    sud_selector = SYSCALL_DISPATCH_FILTER_BLOCK;
    raw_getppid();
    sud_selector = sud_block ? SYSCALL_DISPATCH_FILTER_BLOCK : SYSCALL_DISPATCH_FILTER_ALLOW;
    put("sud_sigsys=%d ", (int)sigsys_seen);
}

/* The r-xp mapping holding `pause` (libc's text). */
static void libc_text(unsigned long *lo, unsigned long *hi) {
    char l[512];
    unsigned long a = (unsigned long)&pause, s, e;
    FILE *f = fopen("/proc/self/maps", "r");
    *lo = *hi = 0;
    while (f && fgets(l, sizeof l, f))
        if (sscanf(l, "%lx-%lx", &s, &e) == 2 && s <= a && a < e) { *lo = s; *hi = e; }
    if (f) fclose(f);
}

/* ---- sigaltstack with SS_AUTODISARM --------------------------------------- */
static int alt_on;
static void alt_report(void) {
    stack_t ss;
    sigaltstack(NULL, &ss);
    put("alt=%p:%zu:%#x ", ss.ss_sp, ss.ss_size, ss.ss_flags);
}

/* ---- status flags of regular files ------------------------------------- */
static int file_fds[6] = {-1, -1, -1, -1, -1, -1};
static void files_report(void) {
    for (int i = 0; i < 6; i++)
        if (file_fds[i] >= 0) put("fl%d=%#o ", i, fcntl(file_fds[i], F_GETFL));
}

/* ---- anonymous mapping name -------------------------------------------- */
static void *named;
static void name_report(void) {
    char want[64], l[512];
    FILE *f = fopen("/proc/self/maps", "r");
    snprintf(want, sizeof want, "%lx-", (unsigned long)named);
    while (f && fgets(l, sizeof l, f))
        if (!strncmp(l, want, strlen(want))) {
            char *n = strchr(l, '[');
            if (n) { n[strcspn(n, "\n")] = 0; put("vmaname=%s ", n); }
        }
    if (f) fclose(f);
}

/* ---- autogroup nice ----------------------------------------------------- */
static int ag_on;
static void ag_report(void) {
    char b[128] = "";
    int fd = open("/proc/self/autogroup", O_RDONLY), nice = -99;
    if (fd >= 0) { b[read(fd, b, sizeof b - 1) > 0 ? sizeof b - 1 : 0] = 0; close(fd); }
    char *n = strstr(b, "nice ");
    if (n) nice = atoi(n + 5);
    put("ag_nice=%d ", nice);
}

/* ---- landlock ----------------------------------------------------------- */
static int ll_on;
static void ll_report(void) {
    int fd = open("/etc/hostname", O_RDONLY);
    put("ll_open=%d ", fd >= 0 ? 0 : errno);
    if (fd >= 0) close(fd);
}

/* ---- a grab bag of per-process and per-thread values ------------------- */
#include <linux/capability.h>
#include <asm/prctl.h>
#include <sys/fsuid.h>
#include <sys/personality.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <pthread.h>
static int misc_on, misc_pipe[2] = {-1, -1};
static int tid_word;
static struct { void *next; long off; void *pending; } robust_head;
static volatile pid_t thread_tid;
static int thread_own_attrs;
static void *misc_thread(void *arg) {
    sigset_t usr1;
    (void)arg;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);      /* the report signal is the main thread's: its pause() must end */
    pthread_sigmask(SIG_BLOCK, &usr1, NULL);
    prctl(PR_SET_NAME, "probe-thread");
    prctl(PR_SET_TIMERSLACK, 4321);
    if (thread_own_attrs) {     /* per thread: keep-caps, MCE policy, rdtsc faulting */
        prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0);
        prctl(PR_MCE_KILL, PR_MCE_KILL_SET, PR_MCE_KILL_EARLY, 0, 0);
    }
    thread_tid = syscall(SYS_gettid);
    for (;;) pause();
    return NULL;
}
static void misc_setup(void) {
    struct itimerval v = {{3, 250000}, {300, 0}}, p = {{7, 0}, {700, 0}};
    if (setitimer(ITIMER_VIRTUAL, &v, NULL) || setitimer(ITIMER_PROF, &p, NULL)) die("setitimer");
    alarm(5000);
    prctl(PR_SET_TIMERSLACK, 98765);
    syscall(SYS_set_tid_address, &tid_word);
    robust_head.next = &robust_head;
    robust_head.off = -16;
    syscall(SYS_set_robust_list, &robust_head, sizeof robust_head);
    if (syscall(SYS_arch_prctl, ARCH_SET_GS, 0x1234000)) die("ARCH_SET_GS");
    personality(PER_LINUX | ADDR_NO_RANDOMIZE | READ_IMPLIES_EXEC);
    struct rlimit rl = {1000, 2000};
    setrlimit(RLIMIT_NOFILE, &rl);
    umask(027);
    if (pipe(misc_pipe) || fcntl(misc_pipe[0], F_SETPIPE_SZ, 1 << 18) < 0) die("pipe size");
    gid_t g[3] = {4, 24, 27};
    if (setgroups(3, g)) die("setgroups");
    setfsgid(24);
    /* inheritable + ambient CAP_NET_RAW, bounding without CAP_SYS_BOOT */
    struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct d[2];
    if (syscall(SYS_capget, &h, d)) die("capget");
    d[0].inheritable |= 1u << CAP_NET_RAW;
    if (syscall(SYS_capset, &h, d)) die("capset");
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_RAW, 0, 0)) die("ambient");
    if (prctl(PR_CAPBSET_DROP, CAP_SYS_BOOT, 0, 0, 0)) die("bounding");
    pthread_t t;
    for (int i = 0; i < 2; i++) {   /* two: engine/threads.py reads several threads side by side */
        thread_tid = 0;
        pthread_create(&t, NULL, misc_thread, NULL);
        while (!thread_tid) usleep(1000);
    }
    misc_on = 1;
}
static void misc_report(void) {
    struct itimerval v, p;
    getitimer(ITIMER_VIRTUAL, &v);
    getitimer(ITIMER_PROF, &p);
    struct itimerval r;
    getitimer(ITIMER_REAL, &r);
    put("itv=%ld.%06ld itp=%ld.%06ld real_armed=%d ", v.it_interval.tv_sec, v.it_interval.tv_usec,
        p.it_interval.tv_sec, p.it_interval.tv_usec, r.it_value.tv_sec > 4000);
    put("slack=%d ", prctl(PR_GET_TIMERSLACK));
    int *ta = NULL;
    prctl(PR_GET_TID_ADDRESS, &ta);
    put("tidaddr=%d ", ta == &tid_word);
    void *head; size_t len;
    syscall(SYS_get_robust_list, 0, &head, &len);
    put("robust=%d:%zu ", head == &robust_head, len);
    unsigned long gs = 0;
    syscall(SYS_arch_prctl, ARCH_GET_GS, &gs);
    put("gs=%#lx pers=%#x ", gs, personality(0xffffffff));
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    mode_t m = umask(0); umask(m);
    put("nofile=%lu:%lu umask=%#o pipesz=%d ", (unsigned long)rl.rlim_cur, (unsigned long)rl.rlim_max, m,
        fcntl(misc_pipe[0], F_GETPIPE_SZ));
    gid_t g[16]; int n = getgroups(16, g);
    put("groups=%d:%d,%d,%d fsgid=%d ", n, g[0], n > 1 ? g[1] : -1, n > 2 ? g[2] : -1, setfsgid(-1));
    put("amb=%d bnd_boot=%d ", prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, CAP_NET_RAW, 0, 0),
        prctl(PR_CAPBSET_READ, CAP_SYS_BOOT, 0, 0, 0));
    char path[64], name[32] = "";
    snprintf(path, sizeof path, "/proc/self/task/%d/comm", (int)thread_tid);
    int fd = open(path, O_RDONLY);
    if (fd >= 0) { name[read(fd, name, sizeof name - 1) > 0 ? strcspn(name, "\n") : 0] = 0; close(fd); }
    put("tname=%s ", name);
}

/* ---- mappings of special kinds ------------------------------------------ */
#include <linux/aio_abi.h>
static void *maps_at[8];
static int maps_n;
static aio_context_t aio_ctx;
static void maps_add(const char *w) {
    void *p = MAP_FAILED;
    if (!strcmp(w, "secret")) {
        int fd = syscall(447 /* memfd_secret */, 0);
        if (fd < 0) die("memfd_secret");
        if (ftruncate(fd, 8192)) die("ftruncate secret");
        p = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p != MAP_FAILED) memset(p, 0x5a, 8192);
    } else if (!strcmp(w, "aio")) {
        if (syscall(SYS_io_setup, 16, &aio_ctx)) die("io_setup");
        p = (void *)aio_ctx;
    } else if (!strcmp(w, "growsdown")) {
        p = mmap(NULL, 16384, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_GROWSDOWN, -1, 0);
    } else if (!strcmp(w, "madv")) {
        p = mmap(NULL, 6 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) die("mmap");
        madvise(p, 4096, MADV_DONTFORK);
        madvise((char *)p + 4096, 4096, MADV_WIPEONFORK);
        madvise((char *)p + 2 * 4096, 4096, MADV_DONTDUMP);
        madvise((char *)p + 3 * 4096, 4096, MADV_HUGEPAGE);
        madvise((char *)p + 4 * 4096, 4096, MADV_NOHUGEPAGE);
        for (int i = 0; i < 5; i++) maps_at[maps_n++] = (char *)p + i * 4096;
        p = (char *)p + 5 * 4096;
    } else if (!strcmp(w, "mseal")) {
        p = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p != MAP_FAILED && syscall(462 /* mseal */, p, 4096, 0)) die("mseal");
    }
    if (p == MAP_FAILED) die(w);
    maps_at[maps_n++] = p;
}
static void maps_report(void) {
    char fl[512];
    for (int i = 0; i < maps_n; i++) {
        vmflags_of(maps_at[i], fl, sizeof fl);
        put("map%d=%s ", i, fl);
    }
    if (aio_ctx) {
        struct io_event ev;
        struct timespec ts = {0, 0};
        put("aio_getevents=%ld ", syscall(SYS_io_getevents, aio_ctx, 0, 1, &ev, &ts));
    }
}

/* ---- address-space layout as the process sees it ----------------------- */
#include <sys/auxv.h>
static int layout_on;
static void layout_report(void) {
    char l[4096];
    put("vdso_aux=%#lx brk=%p ", getauxval(AT_SYSINFO_EHDR), sbrk(0));
    FILE *f = fopen("/proc/self/maps", "r");
    while (f && fgets(l, sizeof l, f))
        if (strstr(l, "[vdso]") || strstr(l, "[vvar") || strstr(l, "[stack]")) {
            unsigned long a, b;
            sscanf(l, "%lx-%lx", &a, &b);
            put("%s=%#lx-%#lx ", strstr(l, "[vdso]") ? "vdso" : strstr(l, "[stack]") ? "stack" : "vvar", a, b);
        }
    if (f) fclose(f);
    /* /proc/self/stat fields 26-28 (start/end code, start stack), 45-52 (data, brk, arg, env, exit code) */
    int fd = open("/proc/self/stat", O_RDONLY);
    ssize_t n = fd >= 0 ? read(fd, l, sizeof l - 1) : -1;
    if (fd >= 0) close(fd);
    if (n > 0) {
        l[n] = 0;
        char *c = strrchr(l, ')') + 2;
        int field = 3;
        for (char *tok = strtok(c, " \n"); tok; tok = strtok(NULL, " \n"), field++)
            if ((field >= 26 && field <= 28) || (field >= 45 && field <= 51)) put("stat%d=%s ", field, tok);
    }
    unsigned long auxv[64] = {0};
    fd = open("/proc/self/auxv", O_RDONLY);
    n = fd >= 0 ? read(fd, auxv, sizeof auxv) : -1;
    if (fd >= 0) close(fd);
    unsigned long h = 1469598103934665603ul;
    for (ssize_t i = 0; i < n / 8; i++) h = (h ^ auxv[i]) * 1099511628211ul;
    put("auxv=%zd:%#lx ", n, h);
}

static void on_usr1(int s) { (void)s; want_report = 1; }

static void report(void) {
    len = 0;
    put("report ");
    if (owner_fds[0] >= 0) owner_report();
    if (mlock_on) mlock_report();
    if (sud_on) sud_report();
    if (alt_on) alt_report();
    files_report();
    if (named) name_report();
    if (ag_on) ag_report();
    if (ll_on) ll_report();
    if (misc_on) misc_report();
    if (maps_n) maps_report();
    if (layout_on) layout_report();
    put("\n");
    if (write(out, line, len) != (ssize_t)len) die("write");
}

int main(int argc, char **argv) {
    int regs = 0;
    if (argc < 2) return 2;
    out = open(argv[1], O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (out < 0) die("open out");
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    for (int i = 2; i < argc; i++) {
        const char *w = argv[i];
        if (!strcmp(w, "regs")) regs = 1;
        else if (!strcmp(w, "owner")) owner_setup();
        else if (!strcmp(w, "mlockfuture") || !strcmp(w, "onfault")) {
            /* a heap first (the report's stdio lives in it), below the trim threshold: no mapping
             * is made after mlockall, as a process that locks only what it maps from now on */
            void *a = malloc(60000), *b = malloc(60000);
            free(b);
            free(a);
            if (mlockall(MCL_FUTURE | (w[0] == 'o' ? MCL_ONFAULT : 0))) die("mlockall");
            mlock_on = 1;
        } else if (!strcmp(w, "sud") || !strcmp(w, "sudblock")) {
            struct sigaction ss = {0};
            unsigned long lo = 0, hi = 0;
            ss.sa_sigaction = on_sigsys;
            ss.sa_flags = SA_SIGINFO;
            sigaction(SIGSYS, &ss, NULL);
            sud_block = w[3] == 'b';
            if (sud_block) libc_text(&lo, &hi);
            if (prctl(PR_SET_SYSCALL_USER_DISPATCH, PR_SYS_DISPATCH_ON, lo, hi - lo, &sud_selector)) die("SUD");
            if (sud_block) sud_selector = SYSCALL_DISPATCH_FILTER_BLOCK;
            sud_on = 1;
        } else if (!strcmp(w, "altstack")) {
            stack_t ss = {.ss_sp = malloc(65536), .ss_size = 65536, .ss_flags = SS_AUTODISARM};
            if (sigaltstack(&ss, NULL)) die("sigaltstack");
            alt_on = 1;
        } else if (!strcmp(w, "fileflags") && i + 1 < argc) {
            const char *dir = argv[++i];
            static const int fl[6] = {O_RDWR | O_SYNC, O_RDWR | O_DSYNC, O_RDONLY | O_NOATIME,
                                      O_WRONLY | O_DIRECT, O_RDONLY | O_NONBLOCK, O_RDWR | O_SYNC | O_APPEND};
            for (int k = 0; k < 6; k++) {
                char p[4096];
                snprintf(p, sizeof p, "%s/f%d", dir, k);
                int fd = open(p, fl[k] | O_CREAT, 0644);
                if (fd < 0) die(p);
                file_fds[k] = fd;
            }
        } else if (!strcmp(w, "vmaname")) {
            named = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, named, 8192, "probe name")) die("anon name");
        } else if (!strcmp(w, "autogroup")) {
            int fd = open("/proc/self/autogroup", O_WRONLY);
            if (fd < 0 || write(fd, "7", 1) != 1) die("autogroup");
            close(fd);
            ag_on = 1;
        } else if (!strcmp(w, "landlock")) {
            struct landlock_ruleset_attr ra = {.handled_access_fs = LANDLOCK_ACCESS_FS_READ_FILE};
            int rs = syscall(SYS_landlock_create_ruleset, &ra, sizeof ra, 0);
            if (rs < 0) die("landlock_create_ruleset");
            if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || syscall(SYS_landlock_restrict_self, rs, 0))
                die("landlock_restrict_self");
            close(rs);
            ll_on = 1;
        } else if (!strcmp(w, "secret") || !strcmp(w, "aio") || !strcmp(w, "growsdown") || !strcmp(w, "madv") ||
                   !strcmp(w, "mseal")) {
            maps_add(w);
        } else if (!strcmp(w, "layout")) {
            layout_on = 1;
            free(malloc(200000));   /* a heap (brk moved) */
            sbrk(12345);
        } else if (!strcmp(w, "misc") || !strcmp(w, "threadattrs")) {
            thread_own_attrs = w[0] == 't';
            misc_setup();
        } else if (!strcmp(w, "nobody")) {        /* last: every other word is set as root */
            if (setgroups(0, NULL) || setresgid(65534, 65534, 65534) || setresuid(65534, 65534, 65534))
                die("nobody");
        } else {
            dprintf(2, "prober: unknown word %s\n", w);
            return 2;
        }
    }
    regs_init();
    /* The report signal only inside the wait: with pause() a SIGUSR1 sent
     * between "ready" (or a report) and the next pause() was taken early and
     * the wait slept on, and the test timed out under load. */
    sigset_t usr1m, waitm;
    sigemptyset(&usr1m);
    sigaddset(&usr1m, SIGUSR1);
    sigprocmask(SIG_BLOCK, &usr1m, &waitm);
    sigdelset(&waitm, SIGUSR1);
    dprintf(out, "ready %d\n", getpid());
    for (;;) {
        if (regs) {
            memset(&got_regs, 0, sizeof got_regs);
            regs_pause(&want_regs, &got_regs, have_avx512, &waitm);
        } else {
            sigsuspend(&waitm);
        }
        if (want_report) {
            want_report = 0;
            report();
            if (regs) {
                len = 0;
                put("regs ");
                regs_report();
                put("\n");
                if (write(out, line, len) != (ssize_t)len) die("write");
            }
        }
    }
}
