/* Enumerates PCI bus 0 through CF8/CFC and prints what it finds. */
#include "lib.h"

int main(void)
{
    uint32_t host = 0xffffffffu;
    int found = 0;

    for (int dev = 0; dev < 32; dev++) {
        uint32_t id = pci_read32(0, dev, 0, 0);
        if ((id & 0xffff) == 0xffff)
            continue;
        uint32_t class = pci_read32(0, dev, 0, 8) >> 8;
        puts("pci 00:");
        put_hex(dev, 2);
        puts(".0 ");
        put_hex(id & 0xffff, 4);
        putc(':');
        put_hex(id >> 16, 4);
        puts(" class ");
        put_hex(class, 6);
        putc('\n');
        if (dev == 0)
            host = id;
        found++;
    }
    puts("pci devices: ");
    put_hex(found, 2);
    putc('\n');
    if ((host & 0xffff) == 0xffff || (pci_read32(0, 0, 0, 8) >> 8) != 0x060000)
        return 0x20;   /* no host bridge at 0:0 */
    /* CF8 reads back what was written; the data port with the enable bit clear reads ones */
    outl(0xcf8, 0x80000008u);
    if (inl(0xcf8) != 0x80000008u)
        return 0x21;
    outl(0xcf8, 0x00000000u);
    if (inl(0xcfc) != 0xffffffffu)
        return 0x22;
    /* a 16-bit read at 0xcfe is register 2: the device id */
    outl(0xcf8, 0x80000000u);
    if (inw(0xcfe) != (host >> 16))
        return 0x23;
    return VERDICT_PASS;
}
