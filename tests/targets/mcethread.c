/* A second thread with its own machine-check kill policy (QEMU's vCPU
 * threads ask for early kill; the leader keeps the default). Writes
 * "ready", then on each SIGUSR1 appends "report N leader=L thread=T" to
 * OUT: L the leader's PR_MCE_KILL_GET, T the thread's, which the thread
 * reads itself when asked through a pipe. */
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <unistd.h>

static int ask[2], answer[2];
static volatile sig_atomic_t asked;
static void on_usr1(int s) { (void)s; asked = 1; }

static void *vcpu(void *arg)
{
    char c;
    (void)arg;
    if (prctl(PR_MCE_KILL, PR_MCE_KILL_SET, PR_MCE_KILL_EARLY, 0, 0))
        return NULL;
    while (read(ask[0], &c, 1) == 1) {
        c = (char)prctl(PR_MCE_KILL_GET, 0, 0, 0, 0);
        if (write(answer[1], &c, 1) != 1)
            break;
    }
    return NULL;
}

int main(int argc, char **argv)
{
    pthread_t t;
    sigset_t usr1, waitm;
    int count = 0;
    char c;
    int out = open(argv[1], O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (argc < 2 || out < 0 || pipe(ask) || pipe(answer))
        return 2;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigprocmask(SIG_BLOCK, &usr1, &waitm);      /* the thread inherits it blocked */
    sigdelset(&waitm, SIGUSR1);
    signal(SIGUSR1, on_usr1);
    if (pthread_create(&t, NULL, vcpu, NULL))
        return 3;
    c = 0;
    if (write(ask[1], &c, 1) != 1 || read(answer[0], &c, 1) != 1)   /* the thread has set its own */
        return 4;
    dprintf(out, "ready leader=%d thread=%d\n", prctl(PR_MCE_KILL_GET, 0, 0, 0, 0), c);
    for (;;) {
        sigsuspend(&waitm);
        if (asked) {
            asked = 0;
            c = 0;
            if (write(ask[1], &c, 1) != 1 || read(answer[0], &c, 1) != 1)
                dprintf(out, "thread gone\n");
            dprintf(out, "report %d leader=%d thread=%d\n", ++count, prctl(PR_MCE_KILL_GET, 0, 0, 0, 0), c);
        }
    }
}
