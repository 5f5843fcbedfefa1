/* A small process tree for the image fuzz (harness/imagefuzz.py):
 *
 *   fuzz_tree READY DIR
 *
 * In DIR: the parent holds an O_RDWR file "shared" (offset 3) and a pipe
 * with 4 queued bytes, both inherited by its child (shared open files); a
 * second child exits 7 and stays a zombie. The live child sleeps in
 * pause(); a third child, made by clone(CLONE_FILES | CLONE_FS), shares the
 * parent's fd table and fs (tree.json "share") and sleeps too. READY gets
 * "parent child zombie sharer" once all is set up.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sched.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void die(const char *what) { perror(what); exit(1); }

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s READY DIR\n", argv[0]); return 2; }
    if (chdir(argv[2])) die("chdir");
    int fd = open("shared", O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0 || write(fd, "abc", 3) != 3) die("shared");
    int p[2];
    if (pipe(p) || write(p[1], "pipe", 4) != 4) die("pipe");
    pid_t zombie = fork();
    if (zombie < 0) die("fork");
    if (zombie == 0) _exit(7);
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) { for (;;) pause(); }
    /* fork-like (no new stack, no CLONE_VM), sharing the table and fs */
    pid_t sharer = syscall(SYS_clone, CLONE_FILES | CLONE_FS | SIGCHLD, 0, 0, 0, 0);
    if (sharer < 0) die("clone");
    if (sharer == 0) { for (;;) pause(); }
    siginfo_t si;
    if (waitid(P_PID, zombie, &si, WEXITED | WNOWAIT)) die("waitid");
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", argv[1]);
    FILE *f = fopen(tmp, "w");
    if (!f) die("ready");
    fprintf(f, "%d %d %d %d\n", getpid(), child, zombie, sharer);
    fclose(f);
    if (rename(tmp, argv[1])) die("rename");
    for (;;) pause();
}
