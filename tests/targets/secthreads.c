/* Seccomp filters in a multi-threaded process (tests/test_engine_seccomp_threads.py).
 *
 *   secthreads OUT shared    the leader installs F0 (getppid -> EDOM), then
 *                            starts t1, t2, t3 (all share F0); t1 adds F1
 *                            (uname -> ERANGE) of its own.
 *   secthreads OUT separate  t1 and t2 each install F0 themselves: equal
 *                            programs, two filter objects.
 *   secthreads OUT separate3 t1, t2 and t3 each do.
 *   secthreads OUT nested    as shared, but t3 is started by t1 once F1 is
 *                            in: t3 shares F0 and F1 with t1.
 *
 * Writes "tid N TID" per thread and "ready". On SIGUSR1 every thread reports
 * what its filters do now ("see N getppid=E uname=E getsid=E"), then t2 asks
 * for SECCOMP_FILTER_FLAG_TSYNC with F2 (getpgid -> ENOTTY), which must fail
 * naming t1 (t1 is not on t2's chain), then t1 asks for TSYNC with F3
 * (getsid -> EXDEV), which succeeds only when the leader, t2 and t3 share
 * F0 with t1; every thread reports again ("after N ...") and "done".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

#define NT 4    /* the leader is 0 */

static FILE *out;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static volatile int req[NT], done[NT];
static volatile sig_atomic_t go;
static pid_t tids[NT];
static int separate, separate3, nested;

static void say(const char *fmt, ...)
{
	va_list ap;
	pthread_mutex_lock(&lock);
	va_start(ap, fmt);
	vfprintf(out, fmt, ap);
	va_end(ap);
	fflush(out);
	pthread_mutex_unlock(&lock);
}

static long filter(int nr, int err, unsigned flags)
{
	struct sock_filter f[] = {
		BPF_STMT(BPF_LD + BPF_W + BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP + BPF_JEQ + BPF_K, nr, 0, 1),
		BPF_STMT(BPF_RET + BPF_K, SECCOMP_RET_ERRNO | err),
		BPF_STMT(BPF_RET + BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog p = {.len = 4, .filter = f};
	return syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &p);
}

static int err_of(long r)
{
	return r < 0 ? errno : 0;
}

static void see(int i, const char *what)
{
	struct utsname u;
	int a = err_of(syscall(SYS_getppid)), b = err_of(syscall(SYS_uname, &u)), c = err_of(syscall(SYS_getsid, 0));
	say("%s %d getppid=%d uname=%d getsid=%d\n", what, i, a, b, c);
}

static void act(int i, int r)
{
	if (r == 1)
		see(i, "see");
	else if (r == 2) {
		long ret = filter(SYS_getpgid, ENOTTY, SECCOMP_FILTER_FLAG_TSYNC);
		say("tsync %d ret=%ld errno=%d\n", i, ret, ret < 0 ? errno : 0);
	} else if (r == 3) {
		long ret = filter(SYS_getsid, EXDEV, SECCOMP_FILTER_FLAG_TSYNC);
		say("tsync %d ret=%ld errno=%d\n", i, ret, ret < 0 ? errno : 0);
	} else if (r == 4)
		see(i, "after");
}

static void *thread(void *arg)
{
	int i = (int)(long)arg;
	pid_t me = syscall(SYS_gettid);
	if (((separate && (i == 1 || i == 2)) || separate3) && filter(SYS_getppid, EDOM, 0))
		say("FAIL filter %d %s\n", i, strerror(errno));
	if (!separate && !separate3 && i == 1 && filter(SYS_uname, ERANGE, 0))
		say("FAIL filter %d %s\n", i, strerror(errno));
	if (nested && i == 1) {
		pthread_t t3;
		pthread_create(&t3, NULL, thread, (void *)3L);
		while (!tids[3])
			usleep(500);
	}
	say("tid %d %d\n", i, me);
	tids[i] = me;    /* the leader goes on once this thread's filters are in */
	for (;;) {
		int r = req[i];
		if (r != done[i]) {
			act(i, r);
			done[i] = r;
		}
		usleep(500);
	}
	return NULL;
}

static void on_usr1(int sig)
{
	(void)sig;
	go = 1;
}

static void run(int i, int r)
{
	if (i == 0) {
		act(0, r);
		return;
	}
	req[i] = r;
	while (done[i] != r)
		usleep(500);
}

int main(int argc, char **argv)
{
	pthread_t th[NT];
	sigset_t usr1;
	if (argc < 3)
		return 2;
	out = fopen(argv[1], "a");
	if (!out)
		return 2;
	separate = !strcmp(argv[2], "separate");
	separate3 = !strcmp(argv[2], "separate3");
	nested = !strcmp(argv[2], "nested");
	signal(SIGUSR1, on_usr1);
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	pthread_sigmask(SIG_BLOCK, &usr1, NULL);     /* the threads leave it to the leader */
	if (!separate && !separate3 && filter(SYS_getppid, EDOM, 0))
		say("FAIL filter 0 %s\n", strerror(errno));
	tids[0] = getpid();
	say("tid 0 %d\n", tids[0]);
	for (long i = 1; i < NT; i++) {
		if (!(nested && i == 3))    /* nested: t1 starts t3 */
			pthread_create(&th[i], NULL, thread, (void *)i);
		while (!tids[i])
			usleep(500);
	}
	say("ready\n");
	pthread_sigmask(SIG_UNBLOCK, &usr1, NULL);
	while (!go)
		pause();
	for (int i = 0; i < NT; i++)
		run(i, 1);
	run(2, 2);
	run(1, 3);
	for (int i = 0; i < NT; i++)
		run(i, 4);
	say("done\n");
	for (;;)
		pause();
}
