/* A virtio-blk driver in a few hundred instructions: finds the block function on bus 0
 * through CF8/CFC, drives it through the legacy I/O BAR (device 0x1001) or the modern
 * capabilities (device 0x1042, VERSION_1), with the queue's completions taken as MSI-X
 * vector 0x41 (config changes on 0x40).  It writes a pattern to sector 5, reads it back,
 * and reads sector 2, which the host filled before boot.  A legacy device is then reset
 * and driven again with MSI-X off: the completion comes as INTx on the IOAPIC (vector
 * 0x42, level, active low on pins 16-23: the guest has no ACPI to tell it the GSI),
 * acknowledged by reading the ISR.  Verdict on debugexit. */
#include "lib.h"

#define LAPIC 0xfee00000u
#define IOAPIC 0xfec00000u
#define VIRTIO_VENDOR 0x1af4
#define LEGACY_BLK 0x1001
#define MODERN_BLK 0x1042
#define DATA_SECTOR 5
#define HOST_SECTOR 2
#define QMAX 256

/* device status bits */
#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
/* descriptor flags, request types */
#define D_NEXT 1
#define D_WRITE 2
#define T_IN 0
#define T_OUT 1

static inline uint8_t mmio_read8(uintptr_t a) { return *(volatile uint8_t *)a; }
static inline uint16_t mmio_read16(uintptr_t a) { return *(volatile uint16_t *)a; }
static inline void mmio_write8(uintptr_t a, uint8_t v) { *(volatile uint8_t *)a = v; }
static inline void mmio_write16(uintptr_t a, uint16_t v) { *(volatile uint16_t *)a = v; }
#define barrier() __asm__ volatile("" ::: "memory")

extern void irq_stub_0x40(void), irq_stub_0x41(void), irq_stub_0x42(void);

struct desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct blk_hdr { uint32_t type, reserved; uint64_t sector; };

static uint8_t ring[3 * 4096] __attribute__((aligned(4096)));
static struct blk_hdr hdr;
static uint8_t wbuf[512], rbuf[512];
static volatile uint8_t req_status;
static volatile int irqs[3];

static int dev, modern;
static uint32_t io;                       /* legacy BAR0 */
static uintptr_t common, isr, devcfg, notify;  /* modern structures (isr: unused) */
static uint32_t notify_mult;
static uint16_t qsz, avail_idx, notify_off;
static struct desc *descs;
static volatile uint16_t *avail;
static volatile uint16_t *used;           /* flags, idx, then {u32 id, u32 len}[] */

static volatile int spurious;

/* INTx is counted only when the ISR says "queue" (Linux's vp_interrupt does the same):
 * the paravirtual KVM here can present one level-triggered interrupt twice. */
void irq_handler(int vector)
{
    if (vector == 0x42 && !(inb(io + 19) & 1))    /* ISR read: the device lowers INTx */
        spurious++;
    else if (vector >= 0x40 && vector <= 0x42)
        irqs[vector - 0x40]++;
    mmio_write32(LAPIC + 0xb0, 0);
}

static uint32_t bar_addr(int bar)
{
    uint32_t v = pci_read32(0, dev, 0, 0x10 + 4 * bar);
    return (v & 1) ? (v & ~3u) : (v & ~0xfu);
}

static void set_status(uint8_t s)
{
    if (modern)
        mmio_write8(common + 20, s);
    else
        outb(io + 18, s);
}

static uint8_t get_status(void)
{
    return modern ? mmio_read8(common + 20) : inb(io + 18);
}

/* Modern: locate the common, ISR, device and notify structures from the vendor caps. */
static int find_modern_caps(void)
{
    for (int cap = pci_read32(0, dev, 0, 0x34) & 0xfc; cap;) {
        uint32_t hdr0 = pci_read32(0, dev, 0, cap);
        if ((hdr0 & 0xff) == 0x09) {
            int type = (hdr0 >> 24) & 0xff;
            uint32_t bar = pci_read32(0, dev, 0, cap + 4) & 0xff;
            uint32_t off = pci_read32(0, dev, 0, cap + 8);
            if (bar <= 5 && type >= 1 && type <= 4) {
                uint32_t lo = pci_read32(0, dev, 0, 0x10 + 4 * bar);
                if ((lo & 7) == 4 && pci_read32(0, dev, 0, 0x14 + 4 * bar))
                    return 0x52;          /* a 64-bit BAR above 4 GiB: out of our reach */
                uintptr_t at = bar_addr(bar) + off;
                if (type == 1)
                    common = at;
                else if (type == 2) {
                    notify = at;
                    notify_mult = pci_read32(0, dev, 0, cap + 16);
                } else if (type == 3)
                    isr = at;
                else
                    devcfg = at;
            }
        }
        cap = (hdr0 >> 8) & 0xfc;
    }
    return (common && notify && isr && devcfg) ? 0 : 0x51;
}

/* MSI-X on: entry 0 → vector 0x40 (config), entry 1 → 0x41 (queue 0); off: INTx. */
static int setup_msix(int on)
{
    int cap = pci_read32(0, dev, 0, 0x34) & 0xfc;
    while (cap && (pci_read32(0, dev, 0, cap) & 0xff) != 0x11)
        cap = (pci_read32(0, dev, 0, cap) >> 8) & 0xfc;
    if (!cap)
        return 0x53;
    uint32_t mc = pci_read32(0, dev, 0, cap);
    if (!on) {
        pci_write32(0, dev, 0, cap, mc & ~(1u << 31));
        return 0;
    }
    uint32_t t = pci_read32(0, dev, 0, cap + 4);
    uint32_t table = bar_addr(t & 7) + (t & ~7u);
    for (int k = 0; k < 2; k++) {
        mmio_write32(table + 16 * k + 0, 0xfee00000u);    /* to APIC 0 */
        mmio_write32(table + 16 * k + 4, 0);
        mmio_write32(table + 16 * k + 8, 0x40 + k);       /* fixed, edge */
        mmio_write32(table + 16 * k + 12, 0);             /* unmasked */
    }
    pci_write32(0, dev, 0, cap, mc | (1u << 31));
    return 0;
}

static uint32_t devcfg32(int off)
{
    if (modern)
        return mmio_read32(devcfg + off);
    /* the legacy device config follows the MSI-X vector registers while MSI-X is on */
    int msix_on = 0;
    for (int cap = pci_read32(0, dev, 0, 0x34) & 0xfc; cap;) {
        uint32_t h = pci_read32(0, dev, 0, cap);
        if ((h & 0xff) == 0x11)
            msix_on = h >> 31;
        cap = (h >> 8) & 0xfc;
    }
    return inl(io + (msix_on ? 24 : 20) + off);
}

/* Reset, ACK, DRIVER, features, FEATURES_OK (modern), vectors, queue 0, DRIVER_OK. */
static int virtio_init(int use_msix)
{
    set_status(0);
    for (int i = 0; i < 1000 && get_status(); i++)
        ;
    if (get_status())
        return 0x54;
    set_status(S_ACK);
    set_status(S_ACK | S_DRIVER);
    if (modern) {
        mmio_write32(common + 0, 1);                      /* device features 32..63 */
        if (!(mmio_read32(common + 4) & 1))
            return 0x55;                                  /* no VERSION_1 */
        mmio_write32(common + 8, 0);
        mmio_write32(common + 12, 0);
        mmio_write32(common + 8, 1);
        mmio_write32(common + 12, 1);                     /* VERSION_1 only */
        set_status(S_ACK | S_DRIVER | S_FEATURES_OK);
        if (!(get_status() & S_FEATURES_OK))
            return 0x56;
    } else {
        (void)inl(io + 0);
        outl(io + 4, 0);                                  /* no optional features */
    }
    int r = setup_msix(use_msix);
    if (r)
        return r;
    if (modern) {
        mmio_write16(common + 16, use_msix ? 0 : 0xffff); /* config vector */
        mmio_write16(common + 22, 0);                     /* queue_select */
        mmio_write16(common + 26, use_msix ? 1 : 0xffff);
        if (use_msix && (mmio_read16(common + 16) != 0 || mmio_read16(common + 26) != 1))
            return 0x57;
        qsz = mmio_read16(common + 24);
    } else {
        outw(io + 14, 0);                                 /* queue_select */
        if (use_msix) {
            outw(io + 20, 0);
            outw(io + 22, 1);
            if (inw(io + 20) != 0 || inw(io + 22) != 1)
                return 0x57;
        }
        qsz = inw(io + 12);
    }
    if (qsz == 0 || qsz > QMAX || (qsz & (qsz - 1)))
        return 0x58;
    for (unsigned i = 0; i < sizeof(ring); i++)
        ring[i] = 0;
    avail_idx = 0;
    uint32_t desc_at = (uint32_t)ring;
    uint32_t avail_at = desc_at + 16 * qsz;
    uint32_t used_at = (avail_at + 6 + 2 * qsz + 4095) & ~4095u;  /* legacy layout */
    descs = (struct desc *)desc_at;
    avail = (volatile uint16_t *)avail_at;
    used = (volatile uint16_t *)used_at;
    if (modern) {
        mmio_write32(common + 32, desc_at);
        mmio_write32(common + 36, 0);
        mmio_write32(common + 40, avail_at);
        mmio_write32(common + 44, 0);
        mmio_write32(common + 48, used_at);
        mmio_write32(common + 52, 0);
        notify_off = mmio_read16(common + 30);
        mmio_write16(common + 28, 1);                     /* queue_enable */
    } else {
        outl(io + 8, desc_at >> 12);                      /* queue PFN */
    }
    set_status(get_status() | S_DRIVER_OK);
    return (get_status() & S_DRIVER_OK) ? 0 : 0x59;
}

/* One request, header + data + status; waits (HLT) for the queue interrupt. */
static int blk_request(uint32_t type, uint32_t sector, uint8_t *buf, int vector)
{
    hdr.type = type;
    hdr.reserved = 0;
    hdr.sector = sector;
    descs[0] = (struct desc){(uint32_t)&hdr, sizeof(hdr), D_NEXT, 1};
    descs[1] = (struct desc){(uint32_t)buf, 512, D_NEXT | (type == T_IN ? D_WRITE : 0), 2};
    descs[2] = (struct desc){(uint32_t)&req_status, 1, D_WRITE, 0};
    req_status = 0xff;
    int before = irqs[vector - 0x40];
    avail[2 + avail_idx % qsz] = 0;
    barrier();
    avail[1] = ++avail_idx;
    barrier();
    if (modern)
        mmio_write16(notify + notify_off * notify_mult, 0);
    else
        outw(io + 16, 0);
    for (int spins = 0; spins < 1000 && irqs[vector - 0x40] == before; spins++)
        __asm__ volatile("sti; hlt; cli");
    if (irqs[vector - 0x40] == before)
        return 0x60;                                      /* no interrupt */
    if (used[1] != avail_idx) {                           /* interrupt, nothing used */
        puts("used idx ");
        put_hex(used[1], 4);
        puts(", expected ");
        put_hex(avail_idx, 4);
        putc('\n');
        return 0x61;
    }
    volatile uint32_t *elem = (volatile uint32_t *)(used + 2) + 2 * ((avail_idx - 1) % qsz);
    if (elem[0] != 0 || elem[1] != (type == T_IN ? 513u : 1u))
        return 0x62;
    return req_status == 0 ? 0 : 0x63;
}

static uint8_t host_byte(int i) { return (uint8_t)(i * 7 + HOST_SECTOR); }
static uint8_t guest_byte(int i, int round) { return (uint8_t)(i * 13 + 0x5a + round); }

/* Write sector 5, read it back, read the host's sector 2. */
static int exercise(int vector, int round)
{
    for (int i = 0; i < 512; i++) {
        wbuf[i] = guest_byte(i, round);
        rbuf[i] = 0;
    }
    int r = blk_request(T_OUT, DATA_SECTOR, wbuf, vector);
    if (r)
        return r;
    r = blk_request(T_IN, DATA_SECTOR, rbuf, vector);
    if (r)
        return r | 0x04;
    for (int i = 0; i < 512; i++)
        if (rbuf[i] != guest_byte(i, round))
            return 0x68;
    r = blk_request(T_IN, HOST_SECTOR, rbuf, vector);
    if (r)
        return r | 0x08;
    for (int i = 0; i < 512; i++)
        if (rbuf[i] != host_byte(i))
            return 0x69;
    return 0;
}

static void ioapic_write(uint32_t reg, uint32_t v)
{
    mmio_write32(IOAPIC, reg);
    mmio_write32(IOAPIC + 0x10, v);
}

int main(void)
{
    uint32_t id = 0;
    for (dev = 0; dev < 32; dev++) {
        id = pci_read32(0, dev, 0, 0);
        if ((id & 0xffff) == VIRTIO_VENDOR
            && ((id >> 16) == LEGACY_BLK || (id >> 16) == MODERN_BLK))
            break;
    }
    if (dev == 32)
        return 0x50;
    modern = (id >> 16) == MODERN_BLK;
    pci_write32(0, dev, 0, 0x04, 0x7);                    /* I/O, memory, bus master */
    if (modern) {
        int r = find_modern_caps();
        if (r)
            return r;
    } else {
        io = bar_addr(0);
    }
    puts(modern ? "virtio-blk modern at " : "virtio-blk legacy at ");
    put_hex(dev, 2);
    putc('\n');

    idt_set(0x40, irq_stub_0x40);
    idt_set(0x41, irq_stub_0x41);
    idt_set(0x42, irq_stub_0x42);
    idt_load();
    mmio_write32(LAPIC + 0xf0, 0x1ff);

    int r = virtio_init(1);
    if (r)
        return r;
    puts("capacity ");
    put_hex(devcfg32(0), 8);
    putc('\n');
    r = exercise(0x41, 0);
    if (r)
        return r;
    puts("msix: write, read back, host sector ok; irqs ");
    put_hex(irqs[1], 2);
    putc('\n');
    if (irqs[1] != 3 || irqs[0] || irqs[2])
        return 0x6a;
    if (modern)
        return VERDICT_PASS;

    /* legacy again with MSI-X off: INTx, level, active low (the _PRT's PCI polarity) */
    for (int pin = 16; pin < 24; pin++) {
        ioapic_write(0x10 + 2 * pin + 1, 0);
        ioapic_write(0x10 + 2 * pin, 0x42 | (1u << 13) | (1u << 15));
    }
    r = virtio_init(0);
    if (r)
        return r | 0x80;
    /* open an interrupt window across a few exits: an idle line must stay quiet */
    __asm__ volatile("sti");
    for (int i = 0; i < 4; i++)
        (void)get_status();
    __asm__ volatile("cli");
    if (irqs[2] || spurious)
        return 0x6b;                                      /* an idle line interrupted */
    r = exercise(0x42, 1);
    if (r)
        return r | 0x80;
    puts("intx: write, read back, host sector ok; irqs ");
    put_hex(irqs[2], 2);
    puts(" spurious ");
    put_hex(spurious, 2);
    putc('\n');
    if (irqs[2] != 3 || irqs[1] != 3)
        return 0x6c;
    return VERDICT_PASS;
}
