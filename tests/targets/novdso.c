/* A target without a vdso (zdtm vdso02's shape): unmaps its [vdso] and
 * [vvar*] blocks, writes "ready", then on each SIGUSR1 appends to OUT
 * "report N vdso=0|1" (N counts the reports; vdso: whether its own
 * /proc/self/maps shows one again). Only plain syscalls from then on
 * (glibc's clock_gettime would call into the vdso).
 * MODE (optional second argument) "code": unmaps the [vdso] only and
 * keeps the [vvar*] pages (valgrind's shape: its tools run the program's
 * code themselves and drop the vdso); "apart": moves the [vdso] away from
 * its [vvar*] pages (a block no kernel gives a new process). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static volatile sig_atomic_t asked;
static void on_usr1(int s) { (void)s; asked = 1; }

static int has_vdso(void)
{
    static char buf[65536];
    int fd = open("/proc/self/maps", O_RDONLY), n, len = 0;
    if (fd < 0) return -1;
    while ((n = read(fd, buf + len, sizeof(buf) - 1 - len)) > 0) len += n;
    close(fd);
    buf[len] = 0;
    return strstr(buf, "[vdso]") || strstr(buf, "[vvar") ? 1 : 0;
}

int main(int argc, char **argv)
{
    static char buf[65536];
    int out = open(argv[1], O_WRONLY | O_CREAT | O_APPEND, 0644), n, len = 0, count = 0;
    int fd = open("/proc/self/maps", O_RDONLY);
    while ((n = read(fd, buf + len, sizeof(buf) - 1 - len)) > 0) len += n;
    close(fd);
    buf[len] = 0;
    const char *mode = argc > 2 ? argv[2] : "all";
    for (char *l = strtok(buf, "\n"); l; l = strtok(NULL, "\n")) {
        unsigned long a, b;
        if (sscanf(l, "%lx-%lx", &a, &b) != 2)
            continue;
        if (strstr(l, "[vdso]") && !strcmp(mode, "apart")) {
            /* to a free spot one page above its own end, then MAP_FIXED there */
            void *to = mmap(NULL, 2 * (b - a) + 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            munmap(to, 2 * (b - a) + 4096);
            if (mremap((void *)a, b - a, b - a, MREMAP_MAYMOVE | MREMAP_FIXED, (char *)to + 4096) == MAP_FAILED)
                return 1;
        } else if (strstr(l, "[vdso]") || (strstr(l, "[vvar") && !strcmp(mode, "all")))
            munmap((void *)a, b - a);
    }
    /* SIGUSR1 only inside the wait, so one sent before it is not lost */
    sigset_t usr1, waitm;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigprocmask(SIG_BLOCK, &usr1, &waitm);
    sigdelset(&waitm, SIGUSR1);
    signal(SIGUSR1, on_usr1);
    dprintf(out, "ready vdso=%d\n", has_vdso());
    for (;;) {
        sigsuspend(&waitm);
        if (asked) {
            asked = 0;
            dprintf(out, "report %d vdso=%d\n", ++count, has_vdso());
        }
    }
}
