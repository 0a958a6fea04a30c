/* vMSI-X on MSI seen by real guest code on KVM: the synthetic MSI-only passthrough device
 * (passthru,sim:4,vmsix_on_msi) must show MSI-X and no MSI; the guest programs its four
 * table entries with vectors 0x40..0x43 the way Linux does (enable with mask-all, write
 * the entries, clear mask-all, unmask each), then rings the device's doorbell (BAR0
 * offset 0: write k, the device raises message k) and must take vector 0x40+k.  A masked
 * entry and the function mask hold the message (PBA bit set) until they are cleared. */
#include "lib.h"

#define LAPIC 0xfee00000u
#define SIM_VENDOR 0x1b36
#define SIM_DEVICE 0x0005

extern void irq_stub_0x40(void), irq_stub_0x41(void), irq_stub_0x42(void),
    irq_stub_0x43(void);
static volatile int taken[4];

void irq_handler(int vector)
{
    if (vector >= 0x40 && vector <= 0x43)
        taken[vector - 0x40]++;
    mmio_write32(LAPIC + 0xb0, 0);
}

static void wait_for(int k, int n)
{
    for (int spins = 0; spins < 1000 && taken[k] < n; spins++)
        __asm__ volatile("sti; hlt; cli");
}

static int dev;
static int cap;

static void msix_ctrl(uint32_t clear, uint32_t set)
{
    uint32_t v = pci_read32(0, dev, 0, cap);
    pci_write32(0, dev, 0, cap, (v & ~clear) | set);
}

int main(void)
{
    for (dev = 0; dev < 32; dev++)
        if (pci_read32(0, dev, 0, 0) == (SIM_DEVICE << 16 | SIM_VENDOR))
            break;
    if (dev == 32)
        return 0x40;
    int msi = 0;
    for (cap = pci_read32(0, dev, 0, 0x34) & 0xfc; cap; ) {
        uint32_t hdr = pci_read32(0, dev, 0, cap);
        if ((hdr & 0xff) == 0x05)
            msi = cap;
        if ((hdr & 0xff) == 0x11)
            break;
        cap = (hdr >> 8) & 0xfc;
    }
    if (!cap || msi)
        return 0x41;                                   /* MSI-X, and no MSI */
    int n = ((pci_read32(0, dev, 0, cap) >> 16) & 0x7ff) + 1;
    if (n != 4)
        return 0x42;
    uint32_t regs = pci_read32(0, dev, 0, 0x10) & ~0xfu;
    uint32_t t = pci_read32(0, dev, 0, cap + 4), p = pci_read32(0, dev, 0, cap + 8);
    uint32_t table = (pci_read32(0, dev, 0, 0x10 + 4 * (t & 7)) & ~0xfu) + (t & ~7u);
    uint32_t pba = (pci_read32(0, dev, 0, 0x10 + 4 * (p & 7)) & ~0xfu) + (p & ~7u);
    puts("vmsix table at ");
    put_hex(table, 8);
    puts(" pba at ");
    put_hex(pba, 8);
    putc('\n');

    idt_set(0x40, irq_stub_0x40);
    idt_set(0x41, irq_stub_0x41);
    idt_set(0x42, irq_stub_0x42);
    idt_set(0x43, irq_stub_0x43);
    idt_load();
    mmio_write32(LAPIC + 0xf0, 0x1ff);
    pci_write32(0, dev, 0, 0x04, 0x406);               /* memory, bus master, INTx off */
    msix_ctrl(0, 3u << 30);                            /* enable + mask-all */
    for (int k = 0; k < 4; k++) {
        if (!(mmio_read32(table + 16 * k + 12) & 1))
            return 0x43;                               /* entries start masked */
        mmio_write32(table + 16 * k + 0, 0xfee00000u);
        mmio_write32(table + 16 * k + 4, 0);
        mmio_write32(table + 16 * k + 8, 0x40 + k);
    }
    msix_ctrl(1u << 30, 0);                            /* clear mask-all */
    for (int k = 0; k < 4; k++)
        mmio_write32(table + 16 * k + 12, 0);          /* request_irq: unmask */

    for (int k = 3; k >= 0; k--) {
        mmio_write32(regs, k);                         /* the device raises message k */
        wait_for(k, 1);
    }
    for (int k = 0; k < 4; k++)
        if (taken[k] != 1)
            return 0x44;
    puts("vmsix 4 vectors taken\n");

    mmio_write32(table + 16 * 2 + 12, 1);              /* mask entry 2 */
    mmio_write32(regs, 2);
    if (taken[2] != 1 || mmio_read32(pba) != 0x4)
        return 0x45;                                   /* held, in the PBA */
    puts("vmsix held while masked\n");
    mmio_write32(table + 16 * 2 + 12, 0);
    wait_for(2, 2);
    if (taken[2] != 2 || mmio_read32(pba) != 0)
        return 0x46;
    puts("vmsix delivered on unmask\n");

    msix_ctrl(0, 1u << 30);                            /* function mask */
    mmio_write32(regs, 1);
    if (taken[1] != 1 || mmio_read32(pba) != 0x2)
        return 0x47;
    msix_ctrl(1u << 30, 0);
    wait_for(1, 2);
    if (taken[1] != 2)
        return 0x48;
    puts("vmsix function mask held and released\n");
    return VERDICT_PASS;
}
