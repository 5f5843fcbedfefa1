/* A target that takes the credentials named on its command line, then on
 * each SIGUSR1 appends to OUT what it sees of them itself: its own
 * /proc/thread-self/status lines Uid, Gid, Groups, CapInh..CapAmb and its
 * loginuid and sessionid, from the leader and from a second thread.
 *   creds OUT [groups] [capdrop] [ambient] [user] [fsuid] [login5] [thread]
 * groups:     setgroups to its groups plus 4242 and 4343 (root)
 * capdrop:    drops CAP_SYS_MODULE (bounding set), CAP_NET_RAW (permitted),
 *             CAP_SYS_NICE (effective only): a daemon's shape
 * ambient:    inheritable and ambient CAP_NET_BIND_SERVICE
 * user:       uid 1000/1001/1002, gid 2000/2001/2002 keeping its permitted
 *             capabilities (PR_SET_KEEPCAPS), effective = permitted again
 * fsuid:      a filesystem uid and gid of their own (3000, 4000)
 * login5:     writes 5 to /proc/self/loginuid (a login: a new audit session)
 * thread:     a second thread, made after all of it (sleeps)
 * Prints "ready" once set up. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static int out = -1;
static volatile sig_atomic_t asked;

static void on_usr1(int sig) { (void)sig; asked = 1; }

static void die(const char *what) { dprintf(2, "%s: %s\n", what, strerror(errno)); exit(2); }

static void caps_get(struct __user_cap_data_struct d[2])
{
    struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
    if (syscall(SYS_capget, &h, d)) die("capget");
}

static void caps_set(struct __user_cap_data_struct d[2])
{
    struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
    if (syscall(SYS_capset, &h, d)) die("capset");
}

static void clear_bit(__u32 *set, int bit) { set[bit / 32 * 3] &= ~(1u << (bit % 32)); }

static void report_task(const char *who, const char *path)
{
    char buf[8192], line[16384];
    int fd = open(path, O_RDONLY), n, len = 0;
    if (fd < 0) return;
    n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    buf[n > 0 ? n : 0] = 0;
    len += snprintf(line + len, sizeof(line) - len, "%s", who);
    for (char *l = strtok(buf, "\n"); l; l = strtok(NULL, "\n"))
        if (!strncmp(l, "Uid:", 4) || !strncmp(l, "Gid:", 4) || !strncmp(l, "Groups:", 7) || !strncmp(l, "Cap", 3)) {
            for (char *c = l; *c; c++) if (*c == '\t') *c = ' ';
            len += snprintf(line + len, sizeof(line) - len, " | %s", l);
        }
    const char *files[] = {"/proc/thread-self/loginuid", "/proc/thread-self/sessionid"};
    for (int i = 0; i < 2; i++) {
        fd = open(files[i], O_RDONLY);
        n = fd < 0 ? 0 : read(fd, buf, 64);
        if (fd >= 0) close(fd);
        buf[n > 0 ? n : 0] = 0;
        len += snprintf(line + len, sizeof(line) - len, " | %s=%s", i ? "ses" : "luid", buf);
    }
    snprintf(line + len, sizeof(line) - len, "\n");
    write(out, line, strlen(line));
}

static volatile sig_atomic_t thread_asked;
static void *thread_main(void *arg)
{
    (void)arg;
    for (;;) {
        if (thread_asked) {
            report_task("report thread", "/proc/thread-self/status");
            thread_asked = 0;
        }
        usleep(2000);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    int want_thread = 0;
    out = open(argv[1], O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (out < 0) die("open");
    for (int i = 2; i < argc; i++) {
        const char *w = argv[i];
        if (!strcmp(w, "groups")) {
            gid_t g[64];
            int n = getgroups(62, g);
            if (n < 0) die("getgroups");
            g[n++] = 4242;
            g[n++] = 4343;
            if (setgroups(n, g)) die("setgroups");
        } else if (!strcmp(w, "capdrop")) {
            struct __user_cap_data_struct d[2];
            if (prctl(PR_CAPBSET_DROP, CAP_SYS_MODULE, 0, 0, 0)) die("capbset_drop");
            caps_get(d);
            clear_bit(&d[0].permitted, CAP_NET_RAW);
            clear_bit(&d[0].effective, CAP_NET_RAW);
            clear_bit(&d[0].effective, CAP_SYS_NICE);
            caps_set(d);
        } else if (!strcmp(w, "ambient")) {
            struct __user_cap_data_struct d[2];
            caps_get(d);
            d[0].inheritable |= 1u << CAP_NET_BIND_SERVICE;
            caps_set(d);
            if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_BIND_SERVICE, 0, 0)) die("ambient");
        } else if (!strcmp(w, "user")) {
            struct __user_cap_data_struct d[2];
            if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)) die("keepcaps");
            if (setresgid(2000, 2001, 2002)) die("setresgid");
            if (setresuid(1000, 1001, 1002)) die("setresuid");
            caps_get(d);
            d[0].effective = d[0].permitted;
            d[1].effective = d[1].permitted;
            caps_set(d);
            prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0);
        } else if (!strcmp(w, "fsuid")) {
            setfsgid(4000);
            setfsuid(3000);
        } else if (!strcmp(w, "login5")) {
            int fd = open("/proc/self/loginuid", O_WRONLY);
            if (fd < 0 || write(fd, "5", 1) != 1) die("loginuid");
            close(fd);
        } else if (!strcmp(w, "thread")) {
            want_thread = 1;
        } else {
            dprintf(2, "unknown word %s\n", w);
            return 2;
        }
    }
    pthread_t t;
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    /* the thread blocks SIGUSR1: the leader's wait must be what it wakes */
    pthread_sigmask(SIG_BLOCK, &usr1, NULL);
    if (want_thread && pthread_create(&t, NULL, thread_main, NULL)) die("pthread_create");
    /* SIGUSR1 stays blocked outside the wait: one sent before the wait
     * is entered ends it instead of being taken early and lost */
    sigset_t waitm;
    pthread_sigmask(SIG_BLOCK, NULL, &waitm);
    sigdelset(&waitm, SIGUSR1);
    signal(SIGUSR1, on_usr1);
    dprintf(out, "ready\n");
    for (;;) {
        sigsuspend(&waitm);
        if (asked) {
            asked = 0;
            report_task("report leader", "/proc/thread-self/status");
            if (want_thread) {
                thread_asked = 1;
                while (thread_asked) usleep(1000);
            }
            dprintf(out, "done\n");
        }
    }
}
