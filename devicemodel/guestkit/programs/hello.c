/* Prints over COM1 (string and byte I/O), does MMIO and string input, ends via debugexit. */
#include "lib.h"

#define TEST_MMIO 0xd0000000u
#define TEST_PORT 0xe0

int main(void)
{
    uint8_t buf[4] = {0};
    uint8_t *p = buf;
    uint32_t n = sizeof(buf);

    puts("hello from a KVM guest\n");
    putc('o');
    putc('k');
    putc('\n');
    mmio_write32(TEST_MMIO, 0xcafef00du);
    if (mmio_read32(TEST_MMIO + 4) != 0x12345678u)
        return 0x10;
    __asm__ volatile("cld; rep insb" : "+D"(p), "+c"(n) : "d"(TEST_PORT) : "memory");
    for (int i = 0; i < 4; i++)
        if (buf[i] != 0xa0 + i)
            return 0x11;
    puts("hello done\n");
    return VERDICT_PASS;
}
