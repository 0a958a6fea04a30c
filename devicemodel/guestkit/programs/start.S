/* Entry of every guest test program: 32-bit protected mode, paging off, any GDT.
 * Loads our own flat GDT (interrupt gates need a valid CS descriptor), a stack,
 * calls main() and reports its verdict byte on the debugexit port 0xF4. */
    .code32
    .section .text.start, "ax"
    .globl _start
_start:
    cli
    lgdt gdt_desc
    ljmp $0x08, $1f
1:  movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %fs
    movw %ax, %gs
    movw %ax, %ss
    movl $stack_top, %esp
    call main
    outb %al, $0xf4
2:  cli
    hlt
    jmp 2b

/* Interrupt stubs: save the scratch registers, call irq_handler(vector), return.
 * They return with POPF; RET instead of IRET: on the paravirtual KVM of the development
 * machines guest kernel mode runs in KVM's instruction emulator, which cannot execute a
 * protected-mode IRET.  Same privilege level, so the frame is EIP, CS, EFLAGS. */
    .macro IRQ_STUB vec
    .globl irq_stub_\vec
irq_stub_\vec:
    pushl %eax
    pushl %ecx
    pushl %edx
    pushl $\vec
    call irq_handler
    addl $4, %esp
    popl %edx
    popl %ecx
    movl 4(%esp), %eax      /* [eax][EIP][CS][EFLAGS] */
    xchgl %eax, 12(%esp)    /* EFLAGS slot := EIP */
    movl %eax, 8(%esp)      /* CS slot := EFLAGS */
    popl %eax
    addl $4, %esp           /* [EFLAGS][EIP] */
    popfl
    ret
    .endm
    IRQ_STUB 0x40
    IRQ_STUB 0x41
    IRQ_STUB 0x42
    IRQ_STUB 0x43

    .section .data
    .align 8
gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF    /* 0x08: code, base 0, 4 GiB */
    .quad 0x00CF92000000FFFF    /* 0x10: data, base 0, 4 GiB */
gdt_desc:
    .word gdt_desc - gdt - 1
    .long gdt

    .section .bss
    .align 16
    .space 8192
stack_top:
