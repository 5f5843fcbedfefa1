/* A process holding one of everything a mutant engine breaks (see
 * harness/mutants.py and tests/test_harness_mutants.py).
 *
 *   mutant_sink READY DIR sink|count|pend
 *
 * In DIR: umask 027, RLIMIT_NOFILE soft 512, I/O priority idle, core dump
 * filter 0x7, SIGUSR2 caught, SIGWINCH
 * blocked, an O_APPEND file at offset 100, an O_CLOEXEC file and a dup of it
 * sharing one offset (1234), a non-blocking pipe with 10 queued bytes, a
 * fired one-shot timerfd, an eventfd with count 5, an epoll watching the
 * pipe (data 0x1111) and the eventfd (data 0x2222), a unix datagram pair
 * with two queued messages, an inotify instance watching DIR and "data", a
 * deleted file of mode 0600, a loopback TCP connection with 1000 bytes to
 * read at its accepted end, and 1 MiB of patterned anonymous memory.
 * A random secret and a counter live only in memory; READY gets
 * "pid secret-address counter-address memory-address" once all is set up.
 *
 * sink: sleeps in pause(). count: the counter advances every 10 ms.
 * pend: like sink, with SIGUSR1 blocked and pending.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <netinet/in.h>
#include <time.h>
#include <unistd.h>

static volatile uint64_t secret;
static volatile uint64_t counter;

static void on_usr2(int sig) { (void)sig; }

static void die(const char *what) { perror(what); exit(1); }

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: %s READY DIR sink|count|pend\n", argv[0]); return 2; }
    const char *mode = argv[3];
    uint64_t s;
    if (getrandom(&s, sizeof s, 0) != sizeof s) die("getrandom");
    secret = s | 1;
    if (chdir(argv[2])) die("chdir");
    umask(027);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = 512;
    if (setrlimit(RLIMIT_NOFILE, &rl)) die("setrlimit");
    if (syscall(SYS_ioprio_set, 1, 0, 3 << 13)) die("ioprio_set");
    int cdf = open("/proc/self/coredump_filter", O_WRONLY);
    if (cdf < 0 || write(cdf, "0x7", 3) != 3) die("coredump_filter");
    close(cdf);
    struct sigaction sa = {0};
    sa.sa_handler = on_usr2;
    sigaction(SIGUSR2, &sa, NULL);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGWINCH);
    if (!strcmp(mode, "pend")) sigaddset(&set, SIGUSR1);
    sigprocmask(SIG_BLOCK, &set, NULL);

    char buf[2000];
    memset(buf, 'a', sizeof buf);
    int log = open("log", O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (log < 0 || write(log, buf, 100) != 100) die("log");
    int data = open("data", O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (data < 0 || write(data, buf, 2000) != 2000) die("data");
    int dup_data = dup(data);
    lseek(data, 1234, SEEK_SET);
    int p[2];
    if (pipe2(p, O_NONBLOCK) || write(p[1], "0123456789", 10) != 10) die("pipe");
    int tfd = timerfd_create(CLOCK_MONOTONIC, 0);
    struct itimerspec its = {{0, 0}, {0, 1000}};
    if (tfd < 0 || timerfd_settime(tfd, 0, &its, NULL)) die("timerfd");
    int efd = eventfd(5, 0);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 0x1111};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &ev)) die("epoll pipe");
    ev.data.u64 = 0x2222;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, efd, &ev)) die("epoll eventfd");
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_DGRAM, 0, sv)) die("socketpair");
    if (send(sv[0], "first", 5, 0) != 5 || send(sv[0], "second!", 7, 0) != 7) die("send");
    int ghost = open("ghost", O_RDWR | O_CREAT, 0600);
    if (ghost < 0 || fchmod(ghost, 0600) || write(ghost, buf, 300) != 300 || unlink("ghost")) die("ghost");
    size_t len = 1 << 20;
    unsigned char *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) die("mmap");
    for (size_t i = 0; i < len; i++) mem[i] = (unsigned char)(i * 7 + 1);
    (void)dup_data;
    /* last: nothing changes in DIR after this, so no event is pending */
    int in = inotify_init1(0);
    if (in < 0 || inotify_add_watch(in, ".", IN_CREATE) < 0 || inotify_add_watch(in, "data", IN_MODIFY) < 0)
        die("inotify");

    /* a loopback TCP connection, 1000 bytes waiting at its accepted end:
     * fds 16 (client) and 17 (accepted; the listener's 15 is closed) */
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t slen = sizeof sin;
    int lst = socket(AF_INET, SOCK_STREAM, 0);
    if (lst < 0 || bind(lst, (struct sockaddr *)&sin, sizeof sin) || listen(lst, 1) ||
        getsockname(lst, (struct sockaddr *)&sin, &slen)) die("listen");
    int cli = socket(AF_INET, SOCK_STREAM, 0);
    if (cli < 0 || connect(cli, (struct sockaddr *)&sin, sizeof sin)) die("connect");
    int acc = accept(lst, NULL, NULL);
    if (acc < 0 || close(lst) || write(cli, buf, 1000) != 1000) die("tcp");

    usleep(20000);   /* the timerfd has fired */
    if (!strcmp(mode, "pend")) raise(SIGUSR1);

    char tmp[4096], line[128];
    snprintf(tmp, sizeof tmp, "%s.tmp", argv[1]);
    FILE *f = fopen(tmp, "w");
    if (!f) die("ready");
    snprintf(line, sizeof line, "%d %p %p %p\n", getpid(), (void *)&secret, (void *)&counter, (void *)mem);
    fputs(line, f);
    fclose(f);
    if (rename(tmp, argv[1])) die("rename");
    for (;;) {
        if (!strcmp(mode, "count")) {
            counter++;
            usleep(10000);
        } else {
            pause();
        }
    }
}
