    .text
    .globl probe
probe:                          # long probe(int fd, void *buf, long n, unsigned long out[2])
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    push %rcx                   # out
    movabs $0x1111111111111111, %rbx
    movabs $0x2222222222222222, %rbp
    movabs $0x3333333333333333, %r12
    movabs $0x4444444444444444, %r13
    movabs $0x5555555555555555, %r14
    movabs $0x6666666666666666, %r15
    movabs $0x7777777777777777, %r8
    movabs $0x8888888888888888, %r9
    movabs $0x9999999999999999, %r10
    movdqu kxmm(%rip), %xmm8
    xor %eax, %eax              # read(fd, buf, n)
    syscall
    xor %ecx, %ecx              # mask of registers that changed
    movabs $0x1111111111111111, %r11
    cmp %r11, %rbx
    je 1f
    or $1, %ecx
1:  movabs $0x2222222222222222, %r11
    cmp %r11, %rbp
    je 1f
    or $2, %ecx
1:  movabs $0x3333333333333333, %r11
    cmp %r11, %r12
    je 1f
    or $4, %ecx
1:  movabs $0x4444444444444444, %r11
    cmp %r11, %r13
    je 1f
    or $8, %ecx
1:  movabs $0x5555555555555555, %r11
    cmp %r11, %r14
    je 1f
    or $16, %ecx
1:  movabs $0x6666666666666666, %r11
    cmp %r11, %r15
    je 1f
    or $32, %ecx
1:  movabs $0x7777777777777777, %r11
    cmp %r11, %r8
    je 1f
    or $64, %ecx
1:  movabs $0x8888888888888888, %r11
    cmp %r11, %r9
    je 1f
    or $128, %ecx
1:  movabs $0x9999999999999999, %r11
    cmp %r11, %r10
    je 1f
    or $256, %ecx
1:  movq %xmm8, %rdx
    cmp kxmm(%rip), %rdx
    je 1f
    or $512, %ecx
1:  pshufd $0x4e, %xmm8, %xmm8
    movq %xmm8, %rdx
    cmp kxmm+8(%rip), %rdx
    je 1f
    or $1024, %ecx
1:  pop %rdx                    # out
    mov %rax, (%rdx)
    mov %rcx, 8(%rdx)
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    ret
    .balign 16
kxmm:
    .quad 0xaaaaaaaaaaaaaaaa, 0xbbbbbbbbbbbbbbbb
