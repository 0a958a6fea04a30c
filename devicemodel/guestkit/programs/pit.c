/* Where does the in-kernel PIT's IRQ0 arrive?  The MADT says ISA IRQ0 is GSI 2, so a
 * guest that follows it programs IOAPIC pin 2; pin 0 is programmed too, with another
 * vector, to see a routing that ignores the override.  The PIC stays masked.  Channel 0
 * runs in mode 2 at 1 kHz; the guest counts ticks per pin and prints them. */
#include "lib.h"

#define LAPIC 0xfee00000u
#define IOAPIC 0xfec00000u
#define PIT_HZ 1193182u

extern void irq_stub_0x40(void), irq_stub_0x41(void);
static volatile int ticks[2];

void irq_handler(int vector)
{
    if (vector == 0x40 || vector == 0x41)
        ticks[vector - 0x40]++;
    mmio_write32(LAPIC + 0xb0, 0);
}

static void ioapic_route(int pin, uint32_t vector)
{
    mmio_write32(IOAPIC, 0x10 + 2 * pin + 1);
    mmio_write32(IOAPIC + 0x10, 0);                  /* to APIC 0 */
    mmio_write32(IOAPIC, 0x10 + 2 * pin);
    mmio_write32(IOAPIC + 0x10, vector);             /* fixed, edge, active high, unmasked */
}

int main(void)
{
    idt_set(0x40, irq_stub_0x40);
    idt_set(0x41, irq_stub_0x41);
    idt_load();
    mmio_write32(LAPIC + 0xf0, 0x1ff);
    outb(0x21, 0xff);                                /* both 8259s masked */
    outb(0xa1, 0xff);
    ioapic_route(2, 0x40);
    ioapic_route(0, 0x41);
    uint16_t count = PIT_HZ / 1000;
    outb(0x43, 0x34);                                /* channel 0, lo/hi, mode 2 */
    outb(0x40, count & 0xff);
    outb(0x40, count >> 8);
    for (int spins = 0; spins < 1000 && ticks[0] + ticks[1] < 5; spins++)
        __asm__ volatile("sti; hlt; cli");
    outb(0x43, 0x30);                                /* channel 0 to mode 0: one last edge */
    outb(0x40, 0);
    outb(0x40, 0);
    puts("pit ioapic pin 02 ticks ");
    put_hex(ticks[0], 2);
    puts(", pin 00 ticks ");
    put_hex(ticks[1], 2);
    putc('\n');
    return ticks[0] >= 5 && !ticks[1] ? VERDICT_PASS : 0x70;
}
