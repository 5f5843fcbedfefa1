/* A POSIX timer whose signal is pending (tests/test_engine_timer_pending.py).
 *
 *   tmrpend OUT oneshot    timer 0 (a placeholder, deleted) then timer 1:
 *                          CLOCK_MONOTONIC, SIGEV_SIGNAL SIGRTMIN+2, value
 *                          42, a 1 ms one-shot, the signal blocked: it fires
 *                          and stays pending.
 *   tmrpend OUT periodic   the same with a 1 ms interval.
 *   tmrpend OUT thread     as oneshot, but the timer notifies a thread of
 *                          its own (SIGEV_THREAD_ID): the signal is pending
 *                          in that thread's queue, and that thread takes it.
 *   tmrpend OUT rearm      as oneshot; on SIGUSR1 the timer is set again
 *                          before the pending signal is taken: the kernel
 *                          drops a timer's own pending signal then, so only
 *                          the new expiry's signal is there ("rearm ...").
 * Writes "ready" once the signal is pending. On SIGUSR1 takes it
 * (sigtimedwait) and writes what a program can see of it and of the timer,
 * then sets the timer once more and takes that signal too, then "done".
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t go;
static void on_usr1(int sig) { (void)sig; go = 1; }

static volatile pid_t worker_tid;
static volatile int worker_go;
static FILE *wout;
static timer_t wt;

static void *worker(void *arg)
{
	sigset_t set, pend;
	siginfo_t si;
	struct timespec zero = {0, 0};
	int sig = (int)(long)arg;
	sigemptyset(&set);
	sigaddset(&set, sig);
	worker_tid = syscall(SYS_gettid);
	while (!worker_go)
		usleep(1000);
	int got = sigtimedwait(&set, &si, &zero);
	fprintf(wout, "thread got %d code %d timer %d overrun %d value %d getoverrun %d\n", got == sig,
		si.si_code, si.si_timerid, si.si_overrun, si.si_value.sival_int, timer_getoverrun(wt));
	sigpending(&pend);
	fprintf(wout, "pending after %d\ndone\n", sigismember(&pend, sig));
	return NULL;
}

int main(int argc, char **argv)
{
	FILE *out;
	timer_t t0, t;
	sigset_t set, pend;
	struct sigevent ev;
	struct itimerspec its = {{0, 0}, {0, 1000000}}, cur;
	siginfo_t si;
	struct timespec zero = {0, 0}, second = {1, 0};
	int sig = SIGRTMIN + 2, periodic;
	if (argc < 3 || !(out = fopen(argv[1], "a")))
		return 2;
	setvbuf(out, NULL, _IOLBF, 0);
	periodic = !strcmp(argv[2], "periodic");
	signal(SIGUSR1, on_usr1);
	/* SIGUSR1 blocked too, outside the wait: a worker thread (inheriting
	 * the mask) never takes it in the main thread's place, and one sent
	 * between the test of `go` and the wait is not lost (sigsuspend) */
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigprocmask(SIG_BLOCK, &set, NULL);
	sigemptyset(&set);
	sigaddset(&set, sig);
	sigprocmask(SIG_BLOCK, &set, NULL);
	memset(&ev, 0, sizeof(ev));
	ev.sigev_notify = SIGEV_SIGNAL;
	ev.sigev_signo = sig;
	ev.sigev_value.sival_int = 42;
	if (!strcmp(argv[2], "thread")) {
		pthread_t th;
		wout = out;
		pthread_create(&th, NULL, worker, (void *)(long)sig);    /* inherits the blocked signal */
		while (!worker_tid)
			usleep(1000);
		ev.sigev_notify = SIGEV_THREAD_ID;
		ev._sigev_un._tid = worker_tid;
	}
	if (timer_create(CLOCK_MONOTONIC, &ev, &t0) || timer_create(CLOCK_MONOTONIC, &ev, &t) || timer_delete(t0))
		return 3;
	wt = t;
	if (periodic)
		its.it_interval.tv_nsec = 1000000;
	if (timer_settime(t, 0, &its, NULL))
		return 4;
	if (!strcmp(argv[2], "thread")) {
		char path[64], line[256];
		int seen = 0;
		snprintf(path, sizeof(path), "/proc/self/task/%d/status", worker_tid);
		while (!seen) {     /* its own queue: SigPnd of the thread */
			FILE *f = fopen(path, "r");
			usleep(1000);
			while (f && fgets(line, sizeof(line), f))
				if (!strncmp(line, "SigPnd:", 7))
					seen = strtoull(line + 8, NULL, 16) >> (sig - 1) & 1;
			if (f)
				fclose(f);
		}
	} else {
		do {
			usleep(1000);
			sigpending(&pend);
		} while (!sigismember(&pend, sig));
	}
	fprintf(out, "ready\n");
	sigset_t waiting;
	sigprocmask(SIG_BLOCK, NULL, &waiting);
	sigdelset(&waiting, SIGUSR1);
	while (!go)
		sigsuspend(&waiting);
	if (!strcmp(argv[2], "thread")) {
		worker_go = 1;
		for (;;)
			pause();
	}
	if (!strcmp(argv[2], "rearm")) {
		int n = 0;
		if (timer_settime(t, 0, &its, NULL))
			fprintf(out, "FAIL settime\n");
		usleep(20000);
		while (sigtimedwait(&set, &si, &zero) == sig)
			fprintf(out, "rearm %d code %d timer %d overrun %d value %d\n", n++, si.si_code, si.si_timerid,
				si.si_overrun, si.si_value.sival_int);
		fprintf(out, "rearm taken %d\ndone\n", n);
		for (;;)
			pause();
	}
	for (int round = 0; round < 2; round++) {
		int got = sigtimedwait(&set, &si, round ? &second : &zero);
		timer_gettime(t, &cur);
		fprintf(out, "round %d got %d code %d timer %d overrun %d value %d getoverrun %d value %ld.%09ld\n",
			round, got == sig, si.si_code, si.si_timerid, si.si_overrun, si.si_value.sival_int,
			timer_getoverrun(t), (long)cur.it_value.tv_sec, (long)cur.it_value.tv_nsec);
		sigpending(&pend);
		fprintf(out, "pending after %d\n", sigismember(&pend, sig));
		if (!round && timer_settime(t, 0, &its, NULL))
			fprintf(out, "FAIL settime\n");
	}
	fprintf(out, "done\n");
	for (;;)
		pause();
}
