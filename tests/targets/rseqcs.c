/* A thread spinning inside an rseq critical section (glibc's own rseq
 * registration, sys/rseq.h). The section never ends by itself: the only way
 * out is the kernel's abort (preemption, migration, signal), whose handler
 * counts in `aborts` and enters the section again. A checkpoint stops the
 * thread, so on its next return to user space, in the dumped process
 * (--leave-running) and in the restored one, the section must be aborted:
 * `aborts` must grow. Continued inside the section with no abort, a real
 * per-CPU algorithm would commit what it computed for another CPU.
 *
 * usage: rseqcs OUT   writes "ready ABORTS RSEQ_CS" (the addresses of `aborts`
 *                     and of its rseq area's rseq_cs field) or "norseq"
 */
#define _GNU_SOURCE
#include <stddef.h>
#include <stdio.h>
#include <sys/rseq.h>

volatile unsigned long aborts __asm__("rseqcs_aborts");

#if defined(__x86_64__)
static void spin(struct rseq *rs)
{
	__asm__ volatile(
		"0:\n\t"
		"leaq rseqcs_desc(%%rip), %%rax\n\t"
		"movq %%rax, %c[off](%[rs])\n\t"
		"1:\n\t"
		"pause\n\t"
		"jmp 1b\n\t"
		"2:\n\t"
		".byte 0x0f, 0xb9, 0x3d\n\t"        /* ud1: the signature's carrier */
		".long 0x53053053\n\t"               /* RSEQ_SIG (glibc's registration) */
		"3:\n\t"
		"lock incq rseqcs_aborts(%%rip)\n\t"
		"jmp 0b\n\t"
		".pushsection .data.rel.local, \"aw\"\n\t"
		".balign 32\n\t"
		"rseqcs_desc:\n\t"
		".long 0, 0\n\t"                     /* version, flags */
		".quad 1b, 2b - 1b, 3b\n\t"          /* start_ip, post_commit_offset, abort_ip */
		".popsection\n\t"
		: : [rs] "r"(rs), [off] "i"(offsetof(struct rseq, rseq_cs)) : "rax", "memory");
}
#elif defined(__aarch64__)
static void spin(struct rseq *rs)
{
	__asm__ volatile(
		"0:\n\t"
		"adrp x9, rseqcs_desc\n\t"
		"add x9, x9, :lo12:rseqcs_desc\n\t"
		"str x9, [%[rs], %[off]]\n\t"
		"1:\n\t"
		"yield\n\t"
		"b 1b\n\t"
		"2:\n\t"
		".inst 0xd428bc00\n\t"               /* RSEQ_SIG on aarch64 (brk #0x45e0) */
		"3:\n\t"
		"adrp x10, rseqcs_aborts\n\t"
		"add x10, x10, :lo12:rseqcs_aborts\n\t"
		"ldr x11, [x10]\n\t"
		"add x11, x11, #1\n\t"
		"str x11, [x10]\n\t"
		"b 0b\n\t"
		".pushsection .data.rel.local, \"aw\"\n\t"
		".balign 32\n\t"
		"rseqcs_desc:\n\t"
		".long 0, 0\n\t"
		".quad 1b, 2b - 1b, 3b\n\t"
		".popsection\n\t"
		: : [rs] "r"(rs), [off] "i"(offsetof(struct rseq, rseq_cs)) : "x9", "x10", "x11", "memory");
}
#endif

int main(int argc, char **argv)
{
	FILE *out = fopen(argv[1], "w");
	if (!out)
		return 2;
	if (__rseq_size == 0) {         /* rseq off (GLIBC_TUNABLES, old kernel) */
		fputs("norseq\n", out);
		fclose(out);
		return 0;
	}
	struct rseq *rs = (struct rseq *)((char *)__builtin_thread_pointer() + __rseq_offset);
	fprintf(out, "ready %p %p\n", (void *)&aborts, (void *)&rs->rseq_cs);
	fclose(out);
	spin(rs);
	return 0;
}
