/* Processes sharing an fd table (CLONE_FILES) or fs (CLONE_FS) without
 * being threads: tests/test_engine_tree_sharing.py.
 *
 *   sharer MODE DIR      (DIR absolute; "ready" written there atomically)
 *
 * share: P clones A (CLONE_FILES) and B (CLONE_FS), forks D (nothing
 *   shared); A clones G (CLONE_FILES | CLONE_FS): P, A and G hold one fd
 *   table, P and B one fs, A and G another fs. Once DIR/go exists, each
 *   acts and P writes DIR/result (one JSON object) with what it sees:
 *     B chdir(DIR/sub) and umask(077)  -> P's cwd and umask are B's;
 *     A and G open a file each         -> P holds both at the same numbers;
 *     G chdir(DIR/gsub)                -> A's cwd is G's, P's is not;
 *     D opens a file                   -> P does not hold it.
 * siblings: P clones A and B (CLONE_FILES), then unshare(CLONE_FILES):
 *   A and B share a table their parent no longer holds. After DIR/go, A
 *   opens a file; B and P write DIR/b.result and DIR/p.result: 1 when they
 *   hold it at A's number, 0 when not.
 * skip: P clones A (CLONE_FILES), A clones G (CLONE_FILES) and then
 *   unshares: G shares P's table past its parent A. After DIR/go, G opens
 *   a file; P and A write DIR/p.result and DIR/a.result the same way.
 * twophase: P clones A1 and A2 (CLONE_FILES), unshares, clones B
 *   (CLONE_FILES): P hands on two tables, one it left and its own.
 * vm-siblings: P clones A and B (CLONE_VM | CLONE_SIGHAND) and then
 *   execs sleep: A and B share memory and signal handlers, P neither.
 * Every process gives up after 900 s (a killed test run leaves nothing).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static const char *dir;
static time_t give_up;

static void die(const char *what) { perror(what); exit(1); }

static char *at(const char *name) {
    static char buf[8][4096];
    static int i;
    char *b = buf[i++ % 8];
    snprintf(b, sizeof buf[0], "%s/%s", dir, name);
    return b;
}

static void nap(void) {
    struct timespec ts = {0, 10 * 1000 * 1000};
    nanosleep(&ts, NULL);
    if (time(NULL) > give_up) _exit(9);
}

static void wait_file(const char *name) {
    while (access(at(name), F_OK)) nap();
}

static void put(const char *name, const char *text) {
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", at(name));
    FILE *f = fopen(tmp, "w");
    if (!f) die(tmp);
    fputs(text, f);
    fclose(f);
    if (rename(tmp, at(name))) die("rename");
}

static int get_int(const char *name) {
    FILE *f = fopen(at(name), "r");
    int v = -1;
    if (!f || fscanf(f, "%d", &v) != 1) die(name);
    fclose(f);
    return v;
}

static void forever(void) {
    for (;;) {
        sleep(1);
        if (time(NULL) > give_up) _exit(9);
    }
}

/* fork-like clone: no new stack, so no CLONE_VM */
static pid_t clone_fork(unsigned long flags) {
    pid_t p = syscall(SYS_clone, flags | SIGCHLD, 0, 0, 0, 0);
    if (p < 0) die("clone");
    return p;
}

static int open_new(const char *name) {
    int fd = open(at(name), O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) die(name);
    char n[32];
    snprintf(n, sizeof n, "%d\n", fd);
    char fdname[64];
    snprintf(fdname, sizeof fdname, "%s.fd", name);
    put(fdname, n);
    return fd;
}

/* 1 when fd is open here on the file DIR/name */
static int holds(int fd, const char *name) {
    struct stat a, b;
    if (fstat(fd, &a) || stat(at(name), &b)) return 0;
    return a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

static int cwd_is(const char *name) {
    char cwd[4096];
    return getcwd(cwd, sizeof cwd) && strcmp(cwd, at(name)) == 0;
}

static void share(void) {
    char ready[256];
    if (mkdir(at("sub"), 0755) && errno != EEXIST) die("sub");
    if (mkdir(at("gsub"), 0755) && errno != EEXIST) die("gsub");
    umask(022);
    pid_t a = clone_fork(CLONE_FILES);
    if (a == 0) {
        pid_t g = clone_fork(CLONE_FILES | CLONE_FS);
        if (g == 0) {
            wait_file("go");
            wait_file("a.txt.fd");          /* one open at a time: distinct numbers, in order */
            open_new("g.txt");
            if (chdir(at("gsub"))) die("chdir gsub");
            put("g.done", "1\n");
            forever();
        }
        char n[32];
        snprintf(n, sizeof n, "%d\n", g);
        put("g.pid", n);
        wait_file("go");
        open_new("a.txt");
        wait_file("g.done");
        put("a.result", cwd_is("gsub") ? "1\n" : "0\n");
        forever();
    }
    pid_t b = clone_fork(CLONE_FS);
    if (b == 0) {
        wait_file("go");
        if (chdir(at("sub"))) die("chdir sub");
        umask(077);
        put("b.done", "1\n");
        forever();
    }
    pid_t d = fork();
    if (d < 0) die("fork");
    if (d == 0) {
        wait_file("go");
        wait_file("g.done");
        open_new("d.txt");
        forever();
    }
    wait_file("g.pid");
    snprintf(ready, sizeof ready, "{\"kids\": {\"A\": %d, \"B\": %d, \"D\": %d, \"G\": %d}}\n", a, b, d,
             get_int("g.pid"));
    put("ready", ready);
    wait_file("go");
    wait_file("a.result");
    wait_file("b.done");
    wait_file("d.txt.fd");
    int afd = get_int("a.txt.fd"), gfd = get_int("g.txt.fd"), dfd = get_int("d.txt.fd");
    mode_t um = umask(0);
    umask(um);
    char out[512];
    snprintf(out, sizeof out, "{\"a_fd\": %d, \"g_fd\": %d, \"d_fd\": %d, \"p_holds_a\": %d, \"p_holds_g\": %d, "
             "\"p_holds_d\": %d, \"p_cwd_sub\": %d, \"p_umask\": %d, \"a_cwd_gsub\": %d}\n",
             afd, gfd, dfd, holds(afd, "a.txt"), holds(gfd, "g.txt"), holds(dfd, "d.txt"), cwd_is("sub"),
             (int)um, get_int("a.result"));
    put("result", out);
    forever();
}

/* after DIR/go: whether this process holds DIR/name at the number its opener wrote */
static void report(const char *name, const char *result) {
    char fdname[64];
    wait_file("go");
    snprintf(fdname, sizeof fdname, "%s.fd", name);
    wait_file(fdname);
    put(result, holds(get_int(fdname), name) ? "1\n" : "0\n");
    forever();
}

static void opener(const char *name) {
    wait_file("go");
    open_new(name);
    forever();
}

static void siblings(void) {
    pid_t a = clone_fork(CLONE_FILES);
    if (a == 0) opener("a.txt");
    pid_t b = clone_fork(CLONE_FILES);
    if (b == 0) report("a.txt", "b.result");
    if (unshare(CLONE_FILES)) die("unshare");
    char ready[256];
    snprintf(ready, sizeof ready, "{\"kids\": {\"A\": %d, \"B\": %d}}\n", a, b);
    put("ready", ready);
    report("a.txt", "p.result");
}

static void skip(void) {
    pid_t a = clone_fork(CLONE_FILES);
    if (a == 0) {
        pid_t g = clone_fork(CLONE_FILES);
        if (g == 0) opener("g.txt");
        if (unshare(CLONE_FILES)) die("unshare");
        char n[32];
        snprintf(n, sizeof n, "%d\n", g);
        put("g.pid", n);
        report("g.txt", "a.result");
    }
    wait_file("g.pid");
    char ready[256];
    snprintf(ready, sizeof ready, "{\"kids\": {\"A\": %d, \"G\": %d}}\n", a, get_int("g.pid"));
    put("ready", ready);
    report("g.txt", "p.result");
}

static void twophase(void) {
    pid_t a1 = clone_fork(CLONE_FILES);
    if (a1 == 0) forever();
    pid_t a2 = clone_fork(CLONE_FILES);
    if (a2 == 0) forever();
    if (unshare(CLONE_FILES)) die("unshare");
    pid_t b = clone_fork(CLONE_FILES);
    if (b == 0) forever();
    char ready[256];
    snprintf(ready, sizeof ready, "{\"kids\": {\"A1\": %d, \"A2\": %d, \"B\": %d}}\n", a1, a2, b);
    put("ready", ready);
    forever();
}

static int vm_child(void *arg) {
    (void)arg;
    for (;;) {
        struct timespec ts = {1, 0};
        syscall(SYS_nanosleep, &ts, NULL);      /* raw: no libc state on this small stack */
        if (time(NULL) > give_up) syscall(SYS_exit, 9);
    }
    return 0;
}

static void vm_siblings(void) {
    static char stacks[2][65536] __attribute__((aligned(16)));
    pid_t a = clone(vm_child, stacks[0] + sizeof stacks[0], CLONE_VM | CLONE_SIGHAND | SIGCHLD, NULL);
    pid_t b = clone(vm_child, stacks[1] + sizeof stacks[1], CLONE_VM | CLONE_SIGHAND | SIGCHLD, NULL);
    if (a < 0 || b < 0) die("clone");
    char ready[256];
    snprintf(ready, sizeof ready, "{\"kids\": {\"A\": %d, \"B\": %d}}\n", a, b);
    put("ready", ready);
    execl("/bin/sleep", "sleep", "900", (char *)NULL);    /* P leaves their memory and handlers */
    die("exec");
}

int main(int argc, char **argv) {
    if (argc != 3 || argv[2][0] != '/') { fprintf(stderr, "usage: %s MODE /DIR\n", argv[0]); return 2; }
    dir = argv[2];
    give_up = time(NULL) + 900;
    if (!strcmp(argv[1], "share")) share();
    else if (!strcmp(argv[1], "siblings")) siblings();
    else if (!strcmp(argv[1], "skip")) skip();
    else if (!strcmp(argv[1], "twophase")) twophase();
    else if (!strcmp(argv[1], "vm-siblings")) vm_siblings();
    fprintf(stderr, "unknown mode %s\n", argv[1]);
    return 2;
}
