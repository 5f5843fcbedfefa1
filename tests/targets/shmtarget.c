/* System V shared memory segments: tests/test_engine_sysvshm.py.
 *
 *   shmtarget MODE DIR KEY      (DIR absolute; KEY in hex, unique per test)
 *
 * Every mode makes two segments:
 *   K: keyed (KEY), 3 pages + 100 bytes, mode 0640, created as uid/gid
 *      4321 (seteuid: cuid/cgid 4321), then IPC_SET to owner 1234:5678;
 *      attached read-write at A and read-only (SHM_RDONLY) at R;
 *   P: IPC_PRIVATE, 2 pages, attached read-write at B, then IPC_RMID'd.
 * Both filled with a pattern (byte i = (i * 7 + seed) & 0xff, the last
 * page of K left untouched: zero, never faulted in).
 * single: one process.
 * tree:   then forks a child C (it inherits both attaches: each segment's
 *         nattch counts the child's too).
 * split:  K's read-write attach is split by mprotect (refused).
 * DIR/ready gets one JSON line: {"k": id, "p": id, "a": A, "r": R, "b": B,
 * "child": pid}. Once DIR/go exists, each process checks what it sees and
 * writes DIR/result.PID (one JSON object): the pattern intact through
 * every attach, the ids' IPC_STAT (key, size, mode, owners, nattch), and
 * that a byte written at A by the child (tree) or by itself (single) is
 * read through R and by the other process. Gives up after 900 s.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PG 4096
#define KSIZE (3 * PG + 100)
#define PSIZE (2 * PG)

static const char *dir;
static time_t give_up;

static void die(const char *what) { perror(what); exit(1); }

static char *at(const char *name) {
    static char buf[4][4096];
    static int i;
    char *b = buf[i++ % 4];
    snprintf(b, sizeof buf[0], "%s/%s", dir, name);
    return b;
}

static void nap(void) {
    struct timespec ts = {0, 5 * 1000 * 1000};
    nanosleep(&ts, NULL);
    if (time(NULL) > give_up) _exit(9);
}

static void put(const char *name, const char *text) {
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", at(name));
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text) || close(fd) || rename(tmp, at(name)))
        die("put");
}

static void fill(unsigned char *p, size_t n, int seed) {
    for (size_t i = 0; i < n; i++) p[i] = (unsigned char)((i * 7 + seed) & 0xff);
}

/* the pattern, but at `skip` (where a process writes its token: the
 * other may have written it already) */
static long bad_at(const unsigned char *p, size_t n, int seed, size_t skip) {
    for (size_t i = 0; i < n; i++)
        if (i != skip && p[i] != (unsigned char)((i * 7 + seed) & 0xff)) return (long)i;
    return -1;
}

static long nonzero_at(const unsigned char *p, size_t from, size_t to) {
    for (size_t i = from; i < to; i++)
        if (p[i]) return (long)i;
    return -1;
}

static int k, pv;
static unsigned char *a, *r, *b;

static void stat_json(char *out, size_t n, int id) {
    struct shmid_ds ds;
    if (shmctl(id, IPC_STAT, &ds)) {
        snprintf(out, n, "{\"errno\": %d}", errno);
        return;
    }
    snprintf(out, n, "{\"key\": %d, \"size\": %zu, \"mode\": %u, \"uid\": %u, \"gid\": %u, \"cuid\": %u, "
             "\"cgid\": %u, \"nattch\": %lu}", ds.shm_perm.__key, ds.shm_segsz, ds.shm_perm.mode,
             ds.shm_perm.uid, ds.shm_perm.gid, ds.shm_perm.cuid, ds.shm_perm.cgid, (unsigned long)ds.shm_nattch);
}

/* After DIR/go: the checks of one process. `writer`: writes the token at
 * A[10]; the other waits until it sees it. */
static void verify(int writer, int child) {
    while (access(at("go"), F_OK)) nap();
    char ks[512], ps[512], out[2048], name[64];
    long pat_a = bad_at(a, 3 * PG, 1, 10), pat_r = bad_at(r, 3 * PG, 1, 10), pat_b = bad_at(b, PSIZE, 2, 20);
    long zero_tail = nonzero_at(a, 3 * PG, 4 * PG);
    int seen = 0;
    unsigned char token = child ? 0xC1 : 0xA5;
    if (writer) {
        a[10] = token;
        b[20] = token;
        seen = r[10] == token;
    } else {
        for (int i = 0; i < 2000 && !(r[10] == 0xC1 && b[20] == 0xC1); i++) nap();
        seen = r[10] == 0xC1 && b[20] == 0xC1;
    }
    stat_json(ks, sizeof ks, k);
    stat_json(ps, sizeof ps, pv);
    snprintf(out, sizeof out, "{\"pid\": %d, \"pat_a\": %ld, \"pat_r\": %ld, \"pat_b\": %ld, \"zero_tail\": %ld, "
             "\"seen\": %d, \"k\": %s, \"p\": %s}\n", getpid(), pat_a, pat_r, pat_b, zero_tail, seen, ks, ps);
    snprintf(name, sizeof name, "result.%d", getpid());
    put(name, out);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: shmtarget single|tree|split DIR KEY\n");
        return 2;
    }
    const char *mode = argv[1];
    dir = argv[2];
    key_t key = (key_t)strtoul(argv[3], NULL, 16);
    give_up = time(NULL) + 900;
    if (setegid(4321) || seteuid(4321)) die("seteuid");
    k = shmget(key, KSIZE, IPC_CREAT | IPC_EXCL | 0640);
    if (seteuid(0) || setegid(0)) die("seteuid back");
    if (k < 0) die("shmget K");
    struct shmid_ds ds;
    if (shmctl(k, IPC_STAT, &ds)) die("IPC_STAT");
    ds.shm_perm.uid = 1234;
    ds.shm_perm.gid = 5678;
    if (shmctl(k, IPC_SET, &ds)) die("IPC_SET");
    pv = shmget(IPC_PRIVATE, PSIZE, IPC_CREAT | 0600);
    if (pv < 0) die("shmget P");
    a = shmat(k, NULL, 0);
    r = shmat(k, NULL, SHM_RDONLY);
    b = shmat(pv, NULL, 0);
    if (a == (void *)-1 || r == (void *)-1 || b == (void *)-1) die("shmat");
    if (shmctl(pv, IPC_RMID, NULL)) die("IPC_RMID");
    fill(a, 3 * PG, 1);
    fill(b, PSIZE, 2);
    if (!strcmp(mode, "split") && mprotect(a, PG, PROT_READ)) die("mprotect");
    pid_t child = 0;
    if (!strcmp(mode, "tree")) {
        child = fork();
        if (child < 0) die("fork");
        if (child == 0) {
            verify(1, 1);
            for (;;) nap();
        }
    }
    char line[512];
    snprintf(line, sizeof line, "{\"k\": %d, \"p\": %d, \"a\": %lu, \"r\": %lu, \"b\": %lu, \"child\": %d}\n", k, pv,
             (unsigned long)a, (unsigned long)r, (unsigned long)b, (int)child);
    put("ready", line);
    verify(!child, 0);
    for (;;) nap();
}
