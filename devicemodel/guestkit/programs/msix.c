/* Takes an MSI-X interrupt from acrn-dm's PCI test device `dummy` (msix option): finds
 * it on bus 0 through CF8/CFC, walks its capability list to MSI-X, programs table entry
 * 0 (vector 0x43) through the table BAR, and makes the device fire by writing its I/O
 * BAR.  A masked entry must hold the message until it is unmasked. */
#include "lib.h"

#define LAPIC 0xfee00000u
#define DUMMY_VENDOR 0x10dd

extern void irq_stub_0x43(void);
static volatile int taken;

void irq_handler(int vector)
{
    if (vector == 0x43)
        taken++;
    mmio_write32(LAPIC + 0xb0, 0);
}

/* Wait with HLT: the emulator only opens an interrupt window at a VM entry. */
static void wait_for(int n)
{
    for (int spins = 0; spins < 1000 && taken < n; spins++)
        __asm__ volatile("sti; hlt; cli");
}

int main(void)
{
    int dev;
    for (dev = 0; dev < 32; dev++)
        if ((pci_read32(0, dev, 0, 0) & 0xffff) == DUMMY_VENDOR)
            break;
    if (dev == 32)
        return 0x40;
    uint32_t iobase = pci_read32(0, dev, 0, 0x10) & ~3u;
    int cap = pci_read32(0, dev, 0, 0x34) & 0xfc;
    while (cap && (pci_read32(0, dev, 0, cap) & 0xff) != 0x11)
        cap = (pci_read32(0, dev, 0, cap) >> 8) & 0xfc;
    if (!cap)
        return 0x41;
    uint32_t table = pci_read32(0, dev, 0, cap + 4);
    uint32_t bar = pci_read32(0, dev, 0, 0x10 + 4 * (table & 7)) & ~0xfu;
    uint32_t entry0 = bar + (table & ~7u);
    puts("msix table at ");
    put_hex(entry0, 8);
    putc('\n');

    idt_set(0x43, irq_stub_0x43);
    idt_load();
    mmio_write32(LAPIC + 0xf0, 0x1ff);
    pci_write32(0, dev, 0, 0x04, 0x7);                 /* I/O, memory, bus master */
    mmio_write32(entry0 + 0, 0xfee00000u);             /* to APIC 0 */
    mmio_write32(entry0 + 4, 0);
    mmio_write32(entry0 + 8, 0x43);                    /* fixed, vector 0x43 */
    mmio_write32(entry0 + 12, 1);                      /* masked */
    uint32_t mc = pci_read32(0, dev, 0, cap);
    pci_write32(0, dev, 0, cap, mc | (1u << 31));      /* MSI-X enable */

    uint32_t pba_off = pci_read32(0, dev, 0, cap + 8);
    uint32_t pba = (pci_read32(0, dev, 0, 0x10 + 4 * (pba_off & 7)) & ~0xfu) + (pba_off & ~7u);
    outl(iobase + 4, 0);                               /* fire entry 0 while masked */
    if (taken || !(mmio_read32(pba) & 1))
        return 0x42;                                   /* must be held, pending bit set */
    puts("msix held while masked\n");
    mmio_write32(entry0 + 12, 0);                      /* unmask: the held message goes */
    wait_for(1);
    if (taken != 1 || (mmio_read32(pba) & 1))
        return 0x43;
    puts("msix pending delivered on unmask\n");
    outl(iobase + 4, 0);
    wait_for(2);
    if (taken != 2)
        return 0x44;
    puts("msix 0x43 taken\n");
    return VERDICT_PASS;
}
