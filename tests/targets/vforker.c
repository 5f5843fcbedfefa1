/* tests/test_engine_tree.py: a parent held in vfork() by a child that
 * neither execs nor exits for a while (they share memory: CLONE_VM).
 * usage: vforker READYFILE [MS]: with MS, the child execs `sleep 60`
 * after MS milliseconds (a shell's vfork child, slow to exec). */
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    pid_t p = vfork();
    if (p == 0) {
        close(open(argv[1], O_CREAT | O_WRONLY, 0644));
        if (argc > 2) {
            usleep(atoi(argv[2]) * 1000);
            execl("/bin/sleep", "sleep", "60", (char *)0);
        }
        sleep(60);
        _exit(3);
    }
    for (;;) pause();
}
