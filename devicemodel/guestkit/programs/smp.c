/* Starts the second vCPU with INIT-SIPI-SIPI through the in-kernel LAPIC; the AP
 * reports its APIC id on port 0xe3.  Then both vCPUs write 0..N-1 to a port of their
 * own (BSP 0xe6, AP 0xe7) at the same time: two request slots in flight at once. */
#include "lib.h"

#define LAPIC 0xfee00000u
#define AP_PORT 0xe3
#define BSP_LOOP 0xe6
#define AP_LOOP 0xe7
#define LOOP_N 200

extern char ap_trampoline[], ap_trampoline_end[];
static volatile int ap_up, ap_done;

void ap_main(void)
{
    uint32_t id = mmio_read32(LAPIC + 0x20) >> 24;
    outb(AP_PORT, (uint8_t)id);
    ap_up = 1;
    for (uint32_t i = 0; i < LOOP_N; i++)
        outb(AP_LOOP, (uint8_t)i);
    ap_done = 1;
}

static void icr(uint32_t dest, uint32_t low)
{
    mmio_write32(LAPIC + 0x310, dest << 24);
    mmio_write32(LAPIC + 0x300, low);
}

int main(void)
{
    char *dst = (char *)0x8000;
    for (char *p = ap_trampoline; p < ap_trampoline_end; p++)
        *dst++ = *p;
    mmio_write32(LAPIC + 0xf0, 0x1ff);
    puts("bsp apic ");
    put_hex(mmio_read32(LAPIC + 0x20) >> 24, 2);
    putc('\n');
    icr(1, 0x4500);          /* INIT, level assert */
    icr(1, 0x4608);          /* SIPI, vector 0x08 -> 0x8000 */
    icr(1, 0x4608);
    for (uint32_t spins = 0; !ap_up; spins++)
        if (spins > 20000000u)
            return 0x50;
    puts("ap up\n");
    for (uint32_t i = 0; i < LOOP_N; i++)
        outb(BSP_LOOP, (uint8_t)i);
    for (uint32_t spins = 0; !ap_done; spins++)
        if (spins > 20000000u)
            return 0x51;
    puts("both loops done\n");
    return VERDICT_PASS;
}
