/* A thread whose own registers a test reads back from its memory (see
 * tests/test_harness_mutants.py: clobber-thread-regs, eintr-not-restart).
 *
 *   mutant_regs READY
 *
 * A second thread sets its callee-saved registers (rbx, rbp, r12-r15) and
 * xmm8 to known values once, then loops in nanosleep(10 ms) forever, all
 * in assembly (no compiler code runs between its calls): after each call
 * it stores those registers in seen[0..5], xmm8 in xmm, and a call's
 * non-zero result (an EINTR a restore handed it) in bad, and counts its
 * calls in calls. The main thread sleeps in pause(). READY gets "pid
 * seen-address bad-address xmm-address calls-address". x86_64 only.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
#include <time.h>

unsigned long seen[6];
unsigned long bad;
unsigned long xmm[2];
unsigned long calls;
unsigned long xmm_init[2] = {0x7777, 0x8888};
struct timespec tick = {0, 10000000};

static void *loop(void *arg)
{
    (void)arg;
    __asm__ volatile(
        "mov $0x1111, %%rbx\n\t"
        "mov $0x2222, %%rbp\n\t"
        "mov $0x3333, %%r12\n\t"
        "mov $0x4444, %%r13\n\t"
        "mov $0x5555, %%r14\n\t"
        "mov $0x6666, %%r15\n\t"
        "movdqu xmm_init(%%rip), %%xmm8\n"
        "1:\n\t"
        "mov $35, %%eax\n\t"            /* nanosleep(&tick, NULL) */
        "lea tick(%%rip), %%rdi\n\t"
        "xor %%esi, %%esi\n\t"
        "syscall\n\t"
        "test %%rax, %%rax\n\t"
        "jz 2f\n\t"
        "mov %%rax, bad(%%rip)\n"
        "2:\n\t"
        "mov %%rbx, seen(%%rip)\n\t"
        "mov %%rbp, seen+8(%%rip)\n\t"
        "mov %%r12, seen+16(%%rip)\n\t"
        "mov %%r13, seen+24(%%rip)\n\t"
        "mov %%r14, seen+32(%%rip)\n\t"
        "mov %%r15, seen+40(%%rip)\n\t"
        "movdqu %%xmm8, xmm(%%rip)\n\t"
        "incq calls(%%rip)\n\t"
        "jmp 1b\n"
        ::: "memory");
    return NULL;
}

int main(int argc, char **argv)
{
    pthread_t t;
    if (argc != 2 || pthread_create(&t, NULL, loop, NULL))
        return 2;
    while (!seen[0])
        usleep(1000);
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", argv[1]);
    FILE *f = fopen(tmp, "w");
    if (!f)
        return 3;
    fprintf(f, "%d %lx %lx %lx %lx\n", getpid(), (unsigned long)seen, (unsigned long)&bad, (unsigned long)xmm,
            (unsigned long)&calls);
    fclose(f);
    rename(tmp, argv[1]);
    for (;;)
        pause();
}
