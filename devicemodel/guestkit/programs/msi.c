/* Takes interrupts: an MSI injected by the backend (vector 0x40), an MSI through an irqfd
 * (0x41), and an active-low level INTx on IOAPIC pin 20 (0x42); pokes an ioeventfd port.
 * Port 0xe1 asks the test to raise the next interrupt; 0xe2 is the ioeventfd. */
#include "lib.h"

#define LAPIC 0xfee00000u
#define IOAPIC 0xfec00000u
#define REQ_PORT 0xe1
#define EVENT_PORT 0xe2

extern void irq_stub_0x40(void), irq_stub_0x41(void), irq_stub_0x42(void);
static volatile int count[3];

void irq_handler(int vector)
{
    count[vector - 0x40]++;
    if (vector == 0x42)
        outb(REQ_PORT, 4);   /* the device deasserts its line before the EOI */
    mmio_write32(LAPIC + 0xb0, 0);   /* EOI */
}

static int wait_for(int i)
{
    for (int spins = 0; spins < 1000 && !count[i]; spins++)
        __asm__ volatile("sti; hlt; cli");
    return count[i];
}

static void ioapic_write(uint32_t reg, uint32_t v)
{
    mmio_write32(IOAPIC, reg);
    mmio_write32(IOAPIC + 0x10, v);
}

int main(void)
{
    idt_set(0x40, irq_stub_0x40);
    idt_set(0x41, irq_stub_0x41);
    idt_set(0x42, irq_stub_0x42);
    idt_load();
    mmio_write32(LAPIC + 0xf0, 0x1ff);   /* software-enable the LAPIC */

    outb(REQ_PORT, 1);
    if (!wait_for(0))
        return 0x30;
    puts("msi 0x40 taken\n");

    outb(REQ_PORT, 2);
    if (!wait_for(1))
        return 0x31;
    puts("irqfd 0x41 taken\n");

    /* pin 20: vector 0x42, fixed, physical, active low, level, unmasked, to APIC 0 */
    ioapic_write(0x10 + 2 * 20 + 1, 0);
    ioapic_write(0x10 + 2 * 20, 0x42 | (1u << 13) | (1u << 15));
    outb(REQ_PORT, 3);
    if (!wait_for(2))
        return 0x32;
    for (volatile int i = 0; i < 1000; i++)
        ;
    if (count[2] != 1)
        return 0x33;
    puts("intx 0x42 taken\n");

    outw(EVENT_PORT, 0x55);   /* same size as registered: KVM's ioeventfd */
    outb(EVENT_PORT, 0x66);   /* narrower: ACRN's len >= size rule, in the HSM half */
    return VERDICT_PASS;
}
