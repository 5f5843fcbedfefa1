/* A target holding its files at the top of its RLIMIT_NOFILE (valgrind
 * keeps its own fds in the last ten below the limit): OUT on limit-1, a
 * pipe on limit-3 (read) and limit-2 (write); and low: another pipe on 3
 * (read) and 4 (write), OUT again on 5 to 63. Writes "ready", then on each
 * SIGUSR1 sends one byte through each pipe, reads it back and appends
 * "report N x" to OUT through limit-1 (or "fd K is not OUT" for each of 5
 * to 63 that is not OUT's open file any more). */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <linux/kcmp.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

static long kcmp(pid_t a, pid_t b, int type, int fa, int fb)
{
    return syscall(SYS_kcmp, a, b, type, fa, fb);
}

static volatile sig_atomic_t asked;
static void on_usr1(int s) { (void)s; asked = 1; }

int main(int argc, char **argv)
{
    struct rlimit rl;
    int p[2], count = 0;
    char c;
    if (argc < 2 || getrlimit(RLIMIT_NOFILE, &rl) || rl.rlim_cur < 16)
        return 2;
    int top = (int)rl.rlim_cur - 1;
    int out = open(argv[1], O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (out < 0 || pipe(p) || dup2(out, top) < 0 || dup2(p[0], top - 2) < 0 || dup2(p[1], top - 1) < 0)
        return 3;
    close(out); close(p[0]); close(p[1]);
    if (pipe(p) || p[0] != 3 || p[1] != 4)
        return 4;
    for (int fd = 5; fd <= 63; fd++)
        if (dup2(top, fd) != fd)
            return 5;
    sigset_t usr1, waitm;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigprocmask(SIG_BLOCK, &usr1, &waitm);
    sigdelset(&waitm, SIGUSR1);
    signal(SIGUSR1, on_usr1);
    dprintf(top, "ready %d\n", top);
    for (;;) {
        sigsuspend(&waitm);
        if (asked) {
            asked = 0;
            c = 'x';
            if (write(top - 1, &c, 1) != 1 || read(top - 2, &c, 1) != 1 || write(4, &c, 1) != 1 || read(3, &c, 1) != 1)
                dprintf(top, "pipe broken\n");
            for (int fd = 5; fd <= 63; fd++)
                if (kcmp(getpid(), getpid(), KCMP_FILE, fd, top) != 0)
                    dprintf(top, "fd %d is not OUT\n", fd);
            dprintf(top, "report %d %c\n", ++count, c);
        }
    }
}
