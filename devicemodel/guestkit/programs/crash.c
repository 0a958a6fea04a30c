/* Triple-faults: an empty IDT turns the #UD into #GP, #DF, then shutdown. */
#include "lib.h"

int main(void)
{
    struct __attribute__((packed)) { uint16_t limit; uint32_t base; } empty = {0, 0};
    puts("crashing\n");
    __asm__ volatile("lidt %0; ud2" :: "m"(empty));
    return 0;
}
