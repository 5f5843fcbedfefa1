/* inotify watching a file deleted while open (tests/test_engine_inotify_ghost.py).
 *
 *   inoghost OUT DIR   creates DIR/f (O_RDWR, "abc"), watches DIR and DIR/f,
 *                      burns two wds so the file's is not the next one,
 *                      unlinks DIR/f (kept open), drains the events, writes
 *                      "wd dir D file F" and "ready".
 * On SIGUSR1: reads the deleted file back through its fd, closes it, and
 * writes every event that arrives ("ev WD MASK"), then "done".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/inotify.h>
#include <unistd.h>

static volatile sig_atomic_t go;
static void on_usr1(int sig) { (void)sig; go = 1; }

static void drain(int ifd, FILE *out)
{
	char buf[4096] __attribute__((aligned(8)));
	for (;;) {
		ssize_t n = read(ifd, buf, sizeof(buf));
		if (n <= 0)
			return;
		for (char *p = buf; p < buf + n;) {
			struct inotify_event *e = (struct inotify_event *)p;
			if (out)
				fprintf(out, "ev %d %#x\n", e->wd, e->mask);
			p += sizeof(*e) + e->len;
		}
	}
}

int main(int argc, char **argv)
{
	char path[4096], got[8] = {0};
	unsigned mask = IN_DELETE | IN_CLOSE_WRITE | IN_DELETE_SELF | IN_CREATE;
	FILE *out;
	int ifd, fd, wdd, wdf;
	if (argc < 3 || !(out = fopen(argv[1], "a")))
		return 2;
	setvbuf(out, NULL, _IOLBF, 0);
	signal(SIGUSR1, on_usr1);
	snprintf(path, sizeof(path), "%s/f", argv[2]);
	ifd = inotify_init1(IN_NONBLOCK);
	fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0644);
	if (ifd < 0 || fd < 0 || write(fd, "abc", 3) != 3)
		return 3;
	wdd = inotify_add_watch(ifd, argv[2], mask);
	for (int i = 0; i < 2; i++)
		inotify_rm_watch(ifd, inotify_add_watch(ifd, "/", IN_CREATE));
	wdf = inotify_add_watch(ifd, path, mask);
	if (wdd < 0 || wdf < 0 || unlink(path))
		return 4;
	usleep(10000);
	drain(ifd, NULL);
	fprintf(out, "wd dir %d file %d\nready\n", wdd, wdf);
	while (!go)
		pause();
	if (pread(fd, got, 3, 0) != 3)
		fprintf(out, "FAIL pread %s\n", strerror(errno));
	fprintf(out, "content %s\n", got);
	close(fd);
	usleep(100000);
	drain(ifd, out);
	fprintf(out, "done\n");
	for (;;)
		pause();
}
