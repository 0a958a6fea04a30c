/* The AP start-up trampoline: copied to 0x8000 by smp.c; a SIPI with vector 0x08 starts
 * the AP here in real mode.  It loads a GDT of its own, enters protected mode and jumps
 * to ap_entry32, which gives the AP a stack and calls ap_main(). */
    .set TRAMP, 0x8000
    .section .text
    .code16
    .globl ap_trampoline, ap_trampoline_end
ap_trampoline:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl (tramp_gdt_desc - ap_trampoline + TRAMP)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $ap_entry32
    .align 8
tramp_gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF
    .quad 0x00CF92000000FFFF
tramp_gdt_desc:
    .word 23
    .long tramp_gdt - ap_trampoline + TRAMP
ap_trampoline_end:

    .code32
ap_entry32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl $ap_stack_top, %esp
    call ap_main
1:  cli
    hlt
    jmp 1b

    .section .bss
    .align 16
    .space 4096
ap_stack_top:
