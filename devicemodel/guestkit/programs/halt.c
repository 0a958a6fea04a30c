/* Halts with interrupts disabled: nothing can wake it, so the VM must stop by itself. */
#include "lib.h"

int main(void)
{
    puts("halting\n");
    for (;;)
        __asm__ volatile("cli; hlt");
    return 0;
}
