/* An adversarial virtio driver inside a real KVM guest: breaks the driver "MUST"s of the
 * virtio 1.2 spec one at a time against each device the host put on bus 0, and prints one
 * line per case on COM1:  case <device>/<case> <PASS|REJECT|WEDGED|FAIL> [code].
 *
 * Devices (slot: what): 4 virtio-blk legacy, 5 virtio-rnd driven through the modern
 * capabilities, 6 virtio-console legacy, 7 virtio-blk modern.  Every device is brought up
 * before the cases.  While one device is attacked the others are left alone (no reset,
 * no re-init), so after each case every other device must still move data on the queue
 * it already had (WEDGED otherwise).  The target is then reset and must work again
 * (WEDGED otherwise).  Completions are polled (MSI-X is on, entries masked):
 * each poll is a COM1 LSR read, an exit that lets the host's event loop run.
 *
 * Verdicts are virtio-villain's: PASS the device did what the spec asks; REJECT it
 * dropped the request or set DEVICE_NEEDS_RESET; FAIL it did something wrong (completed a
 * malformed chain, changed a read-only field); WEDGED another device or the target after
 * reset stopped working. */
#include "lib.h"

#define VIRTIO_VENDOR 0x1af4
#define QMAX 256
#define NQ 4

/* device status */
#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40
/* descriptor flags */
#define D_NEXT 1
#define D_WRITE 2
#define D_INDIRECT 4
#define F_INDIRECT (1u << 28)
#define MAX_INDIRECT 1024
/* legacy BAR0 */
#define L_HF 0
#define L_GF 4
#define L_PFN 8
#define L_NUM 12
#define L_SEL 14
#define L_NOTIFY 16
#define L_STATUS 18
#define L_ISR 19
#define L_CFGVEC 20
#define L_QVEC 22
#define L_CONFIG 24 /* MSI-X is always on here */
/* modern common config */
#define C_DFSEL 0
#define C_DF 4
#define C_GFSEL 8
#define C_GF 12
#define C_CFGVEC 16
#define C_STATUS 20
#define C_QSEL 22
#define C_QSIZE 24
#define C_QVEC 26
#define C_QENABLE 28
#define C_QNOFF 30
#define C_QDESC 32
#define C_QAVAIL 40
#define C_QUSED 48

#define HOST_SECTOR 2
#define POLL_LONG 20000 /* a request that must complete */
#define POLL_SHORT 400  /* a request that must not */

enum { BLK, RND, CON };
enum { V_PASS, V_REJECT, V_WEDGED, V_FAIL };
static const char *const vname[] = {"PASS", "REJECT", "WEDGED", "FAIL"};

static inline uint8_t mmio_read8(uintptr_t a) { return *(volatile uint8_t *)a; }
static inline uint16_t mmio_read16(uintptr_t a) { return *(volatile uint16_t *)a; }
static inline void mmio_write8(uintptr_t a, uint8_t v) { *(volatile uint8_t *)a = v; }
static inline void mmio_write16(uintptr_t a, uint16_t v) { *(volatile uint16_t *)a = v; }
#define barrier() __asm__ volatile("" ::: "memory")

struct desc { uint64_t addr; uint32_t len; uint16_t flags, next; };

struct vq {
    uint16_t size, avail_idx, used_seen;
    struct desc *desc;
    volatile uint16_t *avail;
    volatile uint16_t *used;
};

struct vdev {
    const char *name;
    int slot, kind, modern, nq;       /* nq: queues this driver sets up */
    int dead;                         /* stopped working once: not checked again */
    uint32_t io;                      /* legacy BAR0 */
    uintptr_t common, isr, devcfg, notify, msix_table;
    uint32_t mult;
    int msix_cap, msix_entries;
    uint32_t base;                    /* rings: base + q * 0x4000; scratch: base + 0x10000 */
    struct vq q[NQ];
};

static struct vdev devs[] = {
    {.name = "blk-legacy", .slot = 4, .kind = BLK, .modern = 0, .nq = 1},
    {.name = "rnd-modern", .slot = 5, .kind = RND, .modern = 1, .nq = 1},
    {.name = "console-legacy", .slot = 6, .kind = CON, .modern = 0, .nq = 2},
    {.name = "blk-modern", .slot = 7, .kind = BLK, .modern = 1, .nq = 1},
};
#define NDEV ((int)(sizeof(devs) / sizeof(devs[0])))

static int detail;    /* a code printed after FAIL/WEDGED: which check tripped */
static int bad;       /* FAIL or WEDGED seen */
static uint32_t marker;
static uint32_t console_lines;  /* console writes completed: the host counts its file */

/* ---------------------------------------------------------------------------------- */
static void yield(void) { (void)inb(COM1 + 5); }

static uint32_t scratch(struct vdev *d) { return d->base + 0x10000; }
#define HDR(d) (scratch(d))
#define STATUS_BYTE(d) (scratch(d) + 0x10)
#define DATA(d) (scratch(d) + 0x200)
#define TABLE(d) (scratch(d) + 0x1000)   /* up to 0x5000 bytes: MAX_INDIRECT + 1 entries */
#define TABLE2(d) (scratch(d) + 0x8000)

static uint32_t bar_addr(int slot, int bar)
{
    uint32_t v = pci_read32(0, slot, 0, 0x10 + 4 * bar);
    return (v & 1) ? (v & ~3u) : (v & ~0xfu);
}

static uint8_t get_status(struct vdev *d)
{
    return d->modern ? mmio_read8(d->common + C_STATUS) : inb(d->io + L_STATUS);
}

static void set_status(struct vdev *d, uint8_t s)
{
    if (d->modern)
        mmio_write8(d->common + C_STATUS, s);
    else
        outb(d->io + L_STATUS, s);
}

static int needs_reset(struct vdev *d) { return (get_status(d) & S_NEEDS_RESET) != 0; }

static void select_queue(struct vdev *d, uint16_t q)
{
    if (d->modern)
        mmio_write16(d->common + C_QSEL, q);
    else
        outw(d->io + L_SEL, q);
}

static void notify(struct vdev *d, uint16_t q)
{
    if (d->modern)
        mmio_write16(d->notify + q * d->mult, q);
    else
        outw(d->io + L_NOTIFY, q);
}

static uint32_t cfg_read32(struct vdev *d, int off)
{
    return d->modern ? mmio_read32(d->devcfg + off) : inl(d->io + L_CONFIG + off);
}

static void cfg_write32(struct vdev *d, int off, uint32_t v)
{
    if (d->modern)
        mmio_write32(d->devcfg + off, v);
    else
        outl(d->io + L_CONFIG + off, v);
}

static uint32_t host_features(struct vdev *d, int sel)
{
    if (!d->modern)
        return sel ? 0 : inl(d->io + L_HF);
    mmio_write32(d->common + C_DFSEL, sel);
    return mmio_read32(d->common + C_DF);
}

static void write_features(struct vdev *d, int sel, uint32_t f)
{
    if (!d->modern) {
        if (!sel)
            outl(d->io + L_GF, f);
        return;
    }
    mmio_write32(d->common + C_GFSEL, sel);
    mmio_write32(d->common + C_GF, f);
}

static uint32_t read_features(struct vdev *d, int sel)
{
    if (!d->modern)
        return sel ? 0 : inl(d->io + L_GF);
    mmio_write32(d->common + C_GFSEL, sel);
    return mmio_read32(d->common + C_GF);
}

/* ---------------------------------------------------------------------------------- */
static int probe(struct vdev *d, int index)
{
    uint32_t id = pci_read32(0, d->slot, 0, 0);
    if ((id & 0xffff) != VIRTIO_VENDOR)
        return 0x10;
    pci_write32(0, d->slot, 0, 0x04, 0x7);                /* I/O, memory, bus master */
    d->base = 0x400000 + 0x40000 * index;
    for (int cap = pci_read32(0, d->slot, 0, 0x34) & 0xfc; cap;) {
        uint32_t h = pci_read32(0, d->slot, 0, cap);
        if ((h & 0xff) == 0x11) {
            d->msix_cap = cap;
            d->msix_entries = ((h >> 16) & 0x7ff) + 1;
            uint32_t t = pci_read32(0, d->slot, 0, cap + 4);
            d->msix_table = bar_addr(d->slot, t & 7) + (t & ~7u);
        } else if ((h & 0xff) == 0x09 && d->modern) {
            int type = (h >> 24) & 0xff;
            uint32_t bar = pci_read32(0, d->slot, 0, cap + 4) & 0xff;
            uint32_t off = pci_read32(0, d->slot, 0, cap + 8);
            if (bar <= 5 && type >= 1 && type <= 4) {
                uintptr_t at = bar_addr(d->slot, bar) + off;
                if (type == 1)
                    d->common = at;
                else if (type == 2) {
                    d->notify = at;
                    d->mult = pci_read32(0, d->slot, 0, cap + 16);
                } else if (type == 3)
                    d->isr = at;
                else
                    d->devcfg = at;
            }
        }
        cap = (h >> 8) & 0xfc;
    }
    if (!d->msix_cap)
        return 0x11;
    if (d->modern && !(d->common && d->notify && d->isr && d->devcfg))
        return 0x12;
    if (!d->modern)
        d->io = bar_addr(d->slot, 0);
    /* MSI-X on for good (the legacy config then starts at 24), every entry masked:
     * completions are polled, and no interrupt ever reaches this interrupt-less guest */
    for (int k = 0; k < d->msix_entries; k++) {
        mmio_write32(d->msix_table + 16 * k + 0, 0xfee00000u);
        mmio_write32(d->msix_table + 16 * k + 4, 0);
        mmio_write32(d->msix_table + 16 * k + 8, 0x40);
        mmio_write32(d->msix_table + 16 * k + 12, 1);
    }
    uint32_t mc = pci_read32(0, d->slot, 0, d->msix_cap);
    pci_write32(0, d->slot, 0, d->msix_cap, mc | (1u << 31));
    return 0;
}

static int reset(struct vdev *d)
{
    set_status(d, 0);
    for (int i = 0; i < POLL_LONG; i++)
        if (get_status(d) == 0)
            return 0;
    return 0x20;                                          /* the device never drained */
}

static void zero(uint32_t at, uint32_t n)
{
    __asm__ volatile("cld; rep stosl" : "+D"(at), "+c"(n) : "a"(0) : "memory");
}

/* Ring addresses of queue q (the legacy layout, also used for the modern interface). */
static void ring_layout(struct vdev *d, int q, uint16_t size)
{
    struct vq *v = &d->q[q];
    uint32_t desc_at = d->base + 0x4000 * q;
    uint32_t avail_at = desc_at + 16 * size;
    uint32_t used_at = (avail_at + 6 + 2 * size + 4095) & ~4095u;
    zero(desc_at, 0x4000 / 4);
    v->size = size;
    v->avail_idx = v->used_seen = 0;
    v->desc = (struct desc *)desc_at;
    v->avail = (volatile uint16_t *)avail_at;
    v->used = (volatile uint16_t *)used_at;
}

/* Queue q: size, vector, ring addresses, enable.  0 or an error code. */
static int setup_queue(struct vdev *d, int q, uint64_t far)
{
    select_queue(d, q);
    uint16_t size = d->modern ? mmio_read16(d->common + C_QSIZE) : inw(d->io + L_NUM);
    if (size == 0 || size > QMAX || (size & (size - 1)))
        return 0x21;
    ring_layout(d, q, size);
    struct vq *v = &d->q[q];
    uint64_t desc_at = far ? far : (uint32_t)v->desc;
    uint64_t avail_at = far ? far + 0x1000 : (uint32_t)v->avail;
    uint64_t used_at = far ? far + 0x2000 : (uint32_t)v->used;
    if (d->modern) {
        mmio_write16(d->common + C_QVEC, 1 + q);
        mmio_write32(d->common + C_QDESC, (uint32_t)desc_at);
        mmio_write32(d->common + C_QDESC + 4, (uint32_t)(desc_at >> 32));
        mmio_write32(d->common + C_QAVAIL, (uint32_t)avail_at);
        mmio_write32(d->common + C_QAVAIL + 4, (uint32_t)(avail_at >> 32));
        mmio_write32(d->common + C_QUSED, (uint32_t)used_at);
        mmio_write32(d->common + C_QUSED + 4, (uint32_t)(used_at >> 32));
        mmio_write16(d->common + C_QENABLE, 1);
    } else {
        outw(d->io + L_QVEC, 1 + q);
        outl(d->io + L_PFN, (uint32_t)(desc_at >> 12));
    }
    return 0;
}

/* Reset, ACK, DRIVER, features (INDIRECT_DESC if indirect, VERSION_1 on modern),
 * FEATURES_OK (modern), config vector, queues in `qmask`, DRIVER_OK if driver_ok. */
static int init(struct vdev *d, int indirect, uint32_t qmask, int driver_ok)
{
    int r = reset(d);
    if (r)
        return r;
    set_status(d, S_ACK);
    set_status(d, S_ACK | S_DRIVER);
    uint32_t lo = host_features(d, 0) & (indirect ? F_INDIRECT : 0);
    write_features(d, 0, lo);
    uint8_t st = S_ACK | S_DRIVER;
    if (d->modern) {
        if (!(host_features(d, 1) & 1))
            return 0x22;
        write_features(d, 1, 1);                          /* VERSION_1 */
        st |= S_FEATURES_OK;
        set_status(d, st);
        if (!(get_status(d) & S_FEATURES_OK))
            return 0x23;
        mmio_write16(d->common + C_CFGVEC, 0);
    } else {
        outw(d->io + L_CFGVEC, 0);
    }
    for (int q = 0; q < d->nq; q++)
        if (qmask & (1u << q)) {
            r = setup_queue(d, q, 0);
            if (r)
                return r;
        }
    if (driver_ok) {
        set_status(d, st | S_DRIVER_OK);
        if (get_status(d) != (st | S_DRIVER_OK))
            return 0x24;
    }
    return 0;
}

static int init_default(struct vdev *d) { return init(d, 1, (1u << d->nq) - 1, 1); }

/* ---------------------------------------------------------------------------------- */
/* The queue a case attacks: the transmit queue of the console, queue 0 otherwise. */
static int dq(struct vdev *d) { return d->kind == CON ? 1 : 0; }

/* A valid request at t[0..n-1] (chained 0 -> 1 -> ...); returns n.  *data is the index
 * of its data buffer, the one the buffer cases corrupt. */
static int build_request(struct vdev *d, struct desc *t, int *data)
{
    uint8_t *status = (uint8_t *)STATUS_BYTE(d);
    if (d->kind == BLK) {
        uint32_t *hdr = (uint32_t *)HDR(d);
        hdr[0] = 0;                                        /* IN: read */
        hdr[1] = 0;
        hdr[2] = HOST_SECTOR;
        hdr[3] = 0;
        *status = 0xff;
        t[0] = (struct desc){HDR(d), 16, D_NEXT, 1};
        t[1] = (struct desc){DATA(d), 512, D_NEXT | D_WRITE, 2};
        t[2] = (struct desc){STATUS_BYTE(d), 1, D_WRITE, 0};
        *data = 1;
        return 3;
    }
    if (d->kind == RND) {
        t[0] = (struct desc){DATA(d), 16, D_WRITE, 0};
        *data = 0;
        return 1;
    }
    /* console: "adv <marker>\n" on port 0 */
    char *m = (char *)DATA(d);
    const char *p = "adv ";
    int n = 0;
    while (*p)
        m[n++] = *p++;
    for (int i = 7; i >= 0; i--)
        m[n++] = "0123456789abcdef"[(marker >> (4 * i)) & 0xf];
    m[n++] = '\n';
    marker++;
    t[0] = (struct desc){DATA(d), n, 0, 0};
    *data = 0;
    return 1;
}

/* Put head on the available ring and notify. */
static void publish(struct vdev *d, int q, uint16_t head)
{
    struct vq *v = &d->q[q];
    v->avail[2 + v->avail_idx % v->size] = head;
    barrier();
    v->avail[1] = ++v->avail_idx;
    barrier();
    notify(d, q);
}

/* Poll for a new used entry: 1 and its length in *len, or 0 after `polls` exits. */
static int wait_used(struct vdev *d, int q, int polls, uint32_t *len)
{
    struct vq *v = &d->q[q];
    for (int i = 0; i < polls; i++) {
        barrier();
        uint16_t idx = v->used[1];
        if (idx != v->used_seen) {
            volatile uint32_t *e = (volatile uint32_t *)(v->used + 2) + 2 * (v->used_seen % v->size);
            if (len)
                *len = e[1];
            v->used_seen++;
            return 1;
        }
        yield();
    }
    return 0;
}

/* One real request on the device's queue as it stands: 0 if it moved data, else a code. */
static int work(struct vdev *d)
{
    int q = dq(d), data;
    struct vq *v = &d->q[q];
    if (!v->size)
        return 0x30;
    uint8_t *buf = (uint8_t *)DATA(d);
    for (int i = 0; i < 512; i++)
        buf[i] = 0;
    build_request(d, v->desc, &data);
    publish(d, q, 0);
    uint32_t len = 0;
    if (!wait_used(d, q, POLL_LONG, &len))
        return needs_reset(d) ? 0x31 : 0x32;
    if (d->kind == BLK) {
        if (len != 513 || *(uint8_t *)STATUS_BYTE(d) != 0)
            return 0x33;
        for (int i = 0; i < 512; i++)
            if (buf[i] != (uint8_t)(i * 7 + HOST_SECTOR))
                return 0x34;
    } else if (d->kind == RND) {
        if (len == 0 || len > 16)
            return 0x35;
    } else {
        console_lines++;
    }
    return 0;
}

/* After a malformed ring: NEEDS_RESET or nothing used is a REJECT; a completion, FAIL.
 * Each poll reads the status (an exit), so NEEDS_RESET ends the wait early. */
static int expect_refused(struct vdev *d, int q)
{
    struct vq *v = &d->q[q];
    for (int i = 0; i < POLL_SHORT; i++) {
        barrier();
        if (v->used[1] != v->used_seen) {
            detail = 0x40;
            return V_FAIL;
        }
        if (needs_reset(d)) {
            barrier();
            if (v->used[1] == v->used_seen)
                return V_REJECT;
            detail = 0x40;                                /* completed, then NEEDS_RESET */
            return V_FAIL;
        }
    }
    return V_REJECT;                                      /* dropped */
}

/* ---------------------------------------------------------------------------------- */
/* the cases: each returns a verdict (V_FAIL with `detail` set) */

static int c_avail_idx_jump(struct vdev *d)
{
    int q = dq(d), data;
    struct vq *v = &d->q[q];
    build_request(d, v->desc, &data);
    v->avail[2] = 0;
    barrier();
    v->avail[1] = v->size + 5;                            /* size + 5 new buffers? */
    barrier();
    notify(d, q);
    return expect_refused(d, q);
}

static int c_head_oob(struct vdev *d)
{
    int q = dq(d), data;
    struct vq *v = &d->q[q];
    build_request(d, v->desc, &data);
    publish(d, q, v->size + 3);
    return expect_refused(d, q);
}

static int c_desc_loop(struct vdev *d)
{
    int q = dq(d), data;
    struct vq *v = &d->q[q];
    int n = build_request(d, v->desc, &data);
    v->desc[n - 1].flags |= D_NEXT;                       /* the last one points back to 0 */
    v->desc[n - 1].next = 0;
    publish(d, q, 0);
    return expect_refused(d, q);
}

static int c_chain_wraps_queue(struct vdev *d)
{
    int q = dq(d);
    struct vq *v = &d->q[q];
    uint16_t flags = d->kind == CON ? D_NEXT : D_NEXT | D_WRITE;
    for (int i = 0; i < v->size; i++)                     /* size descriptors, then wraps */
        v->desc[i] = (struct desc){DATA(d), 16, flags, (uint16_t)((i + 1) % v->size)};
    publish(d, q, 0);
    return expect_refused(d, q);
}

static int c_indirect_oversized(struct vdev *d)
{
    int q = dq(d);
    struct vq *v = &d->q[q];
    struct desc *t = (struct desc *)TABLE(d);
    uint16_t flags = d->kind == CON ? D_NEXT : D_NEXT | D_WRITE;
    for (int i = 0; i <= MAX_INDIRECT; i++)
        t[i] = (struct desc){DATA(d), 16, flags, (uint16_t)(i + 1)};
    t[MAX_INDIRECT].flags &= ~D_NEXT;
    v->desc[0] = (struct desc){TABLE(d), 16 * (MAX_INDIRECT + 1), D_INDIRECT, 0};
    publish(d, q, 0);
    return expect_refused(d, q);
}

static int c_nested_indirect(struct vdev *d)
{
    int q = dq(d), data;
    struct vq *v = &d->q[q];
    int n = build_request(d, (struct desc *)TABLE2(d), &data);
    struct desc *t = (struct desc *)TABLE(d);
    t[0] = (struct desc){TABLE2(d), 16 * n, D_INDIRECT, 0};
    v->desc[0] = (struct desc){TABLE(d), 16, D_INDIRECT, 0};
    publish(d, q, 0);
    return expect_refused(d, q);
}

static int c_indirect_not_negotiated(struct vdev *d)
{
    int r = init(d, 0, (1u << d->nq) - 1, 1);
    if (r) {
        detail = r;
        return V_FAIL;
    }
    int q = dq(d), data;
    struct vq *v = &d->q[q];
    int n = build_request(d, (struct desc *)TABLE(d), &data);
    v->desc[0] = (struct desc){TABLE(d), 16 * n, D_INDIRECT, 0};
    publish(d, q, 0);
    return expect_refused(d, q);
}

static int bad_buffer(struct vdev *d, uint64_t addr, uint32_t len)
{
    int q = dq(d), data;
    struct vq *v = &d->q[q];
    build_request(d, v->desc, &data);
    v->desc[data].addr = addr;
    v->desc[data].len = len;
    publish(d, q, 0);
    return expect_refused(d, q);
}

static int c_buffer_outside_ram(struct vdev *d) { return bad_buffer(d, 0xF0000000000ull, 512); }
static int c_buffer_in_pci_hole(struct vdev *d) { return bad_buffer(d, 0xFEE00000ull, 512); }
static int c_buffer_wraps_2_64(struct vdev *d) { return bad_buffer(d, ~0ull - 7, 64); }

static int c_rings_outside_ram(struct vdev *d)
{
    int r = init(d, 1, 0, 0);
    if (r) {
        detail = r;
        return V_FAIL;
    }
    for (int q = 0; q < d->nq; q++)
        setup_queue(d, q, 0x7F00000000ull);
    set_status(d, get_status(d) | S_DRIVER_OK);
    notify(d, dq(d));
    for (int i = 0; i < 50; i++)
        yield();
    if (needs_reset(d))
        return V_REJECT;
    detail = 0x41;                                        /* rings outside RAM accepted */
    return V_FAIL;
}

static int c_readonly_config_write(struct vdev *d)
{
    /* blk: capacity; console: cols, rows, max_nr_ports; rnd: no config at all */
    uint32_t before0 = cfg_read32(d, 0), before1 = cfg_read32(d, 4);
    cfg_write32(d, 0, 0xa5a5a5a5);
    cfg_write32(d, 4, 0x5a5a5a5a);
    if (cfg_read32(d, 0) != before0 || cfg_read32(d, 4) != before1) {
        detail = 0x42;
        return V_FAIL;
    }
    return V_PASS;
}

/* Modern: features written between FEATURES_OK and DRIVER_OK, and after DRIVER_OK.
 * Legacy has no FEATURES_OK (features may change until DRIVER_OK): after DRIVER_OK. */
static int c_features_written_late(struct vdev *d)
{
    int r = init(d, 1, (1u << d->nq) - 1, 0);            /* FEATURES_OK, not DRIVER_OK */
    if (r) {
        detail = r;
        return V_FAIL;
    }
    uint32_t lo = read_features(d, 0), hi = read_features(d, 1);
    if (d->modern) {
        write_features(d, 0, 0xffffffff);
        write_features(d, 1, 0xffffffff);
        if (read_features(d, 0) != lo || read_features(d, 1) != hi) {
            detail = 0x43;
            return V_FAIL;
        }
    }
    set_status(d, get_status(d) | S_DRIVER_OK);
    write_features(d, 0, d->modern ? 0 : 0xffffffff);
    write_features(d, 1, 0);
    if (read_features(d, 0) != lo || read_features(d, 1) != hi) {
        detail = 0x44;
        return V_FAIL;
    }
    int e = work(d);                                      /* runs on what was negotiated */
    if (e) {
        detail = e;
        return needs_reset(d) ? V_REJECT : V_FAIL;
    }
    return V_PASS;
}

static int c_features_not_offered(struct vdev *d)
{
    reset(d);
    set_status(d, S_ACK | S_DRIVER);
    write_features(d, 0, 0xffffffff);
    write_features(d, 1, 0xffffffff);
    set_status(d, S_ACK | S_DRIVER | S_FEATURES_OK);
    if (!(get_status(d) & S_FEATURES_OK))
        return V_REJECT;
    uint32_t lo = read_features(d, 0), hi = read_features(d, 1);
    if ((lo & ~host_features(d, 0)) || (hi & ~host_features(d, 1))) {
        detail = 0x45;                                    /* kept features never offered */
        return V_FAIL;
    }
    return V_PASS;
}

static int c_driver_ok_without_features_ok(struct vdev *d)
{
    reset(d);
    set_status(d, S_ACK | S_DRIVER);
    write_features(d, 1, 1);
    for (int q = 0; q < d->nq; q++)
        setup_queue(d, q, 0);
    set_status(d, S_ACK | S_DRIVER | S_DRIVER_OK);
    if (needs_reset(d))
        return V_REJECT;
    detail = 0x46;
    return V_FAIL;
}

static int c_notify_disabled_queue(struct vdev *d)
{
    int q = dq(d), data;
    int r = init(d, 1, 0, 1);                             /* DRIVER_OK, no queue enabled */
    if (r) {
        detail = r;
        return V_FAIL;
    }
    ring_layout(d, q, 16);                                /* a request where a ring would be */
    build_request(d, d->q[q].desc, &data);
    for (int k = 0; k < d->nq; k++)
        notify(d, k);
    return needs_reset(d) ? V_REJECT : V_PASS;
}

static int c_notify_bad_queue_index(struct vdev *d)
{
    uint16_t idx[] = {(uint16_t)d->nq + 2, 7, 99, 0x7fff, 0xffff};
    for (unsigned k = 0; k < sizeof(idx) / sizeof(idx[0]); k++) {
        if (d->modern && idx[k] * d->mult >= 0x1000)
            continue;                                     /* past the notify region */
        notify(d, idx[k]);
    }
    if (d->modern)                                        /* a misaligned notify address */
        mmio_write16(d->notify + 2, 0);
    return needs_reset(d) ? V_REJECT : V_PASS;
}

static int c_msix_vector_out_of_range(struct vdev *d)
{
    int r = init(d, 1, (1u << d->nq) - 1, 0);
    if (r) {
        detail = r;
        return V_FAIL;
    }
    uint16_t qv, cv;
    select_queue(d, dq(d));
    if (d->modern) {
        mmio_write16(d->common + C_QVEC, d->msix_entries + 5);
        qv = mmio_read16(d->common + C_QVEC);
        mmio_write16(d->common + C_CFGVEC, 0x7fff);
        cv = mmio_read16(d->common + C_CFGVEC);
    } else {
        outw(d->io + L_QVEC, d->msix_entries + 5);
        qv = inw(d->io + L_QVEC);
        outw(d->io + L_CFGVEC, 0x7fff);
        cv = inw(d->io + L_CFGVEC);
    }
    if (qv != 0xffff || cv != 0xffff) {                   /* the spec: read back NO_VECTOR */
        detail = 0x47;
        return V_FAIL;
    }
    set_status(d, get_status(d) | S_DRIVER_OK);           /* and run with it */
    int e = work(d);
    if (e) {
        detail = e;
        return needs_reset(d) ? V_REJECT : V_FAIL;
    }
    return V_PASS;
}

static int c_msix_table_garbage(struct vdev *d)
{
    /* entries pointing nowhere (not the APIC window), unmasked, reserved bits set */
    for (int k = 0; k < d->msix_entries; k++) {
        mmio_write32(d->msix_table + 16 * k + 0, 0x12345678u);
        mmio_write32(d->msix_table + 16 * k + 4, 0xffffffffu);
        mmio_write32(d->msix_table + 16 * k + 8, 0xffffffffu);
        mmio_write32(d->msix_table + 16 * k + 12, 0xfffffffeu);
    }
    mmio_write32(d->msix_table + 16 * d->msix_entries + 8, 0xffffffffu);  /* past the table */
    int e = work(d);
    for (int k = 0; k < d->msix_entries; k++) {           /* back to masked, harmless */
        mmio_write32(d->msix_table + 16 * k + 0, 0xfee00000u);
        mmio_write32(d->msix_table + 16 * k + 4, 0);
        mmio_write32(d->msix_table + 16 * k + 8, 0x40);
        mmio_write32(d->msix_table + 16 * k + 12, 1);
    }
    if (e) {
        detail = e;
        return needs_reset(d) ? V_REJECT : V_FAIL;
    }
    return V_PASS;
}

static int c_status_isr_garbage(struct vdev *d)
{
    reset(d);
    set_status(d, 0x7f);                                  /* every bit but FAILED at once */
    if (d->modern)
        mmio_write8(d->isr, 0xff);                        /* the ISR is read-only */
    else
        outb(d->io + L_ISR, 0xff);
    for (int i = 0; i < 4; i++)
        (void)(d->modern ? mmio_read8(d->isr) : inb(d->io + L_ISR));
    set_status(d, 0x80 | S_ACK);                          /* FAILED */
    set_status(d, 0x35);
    return needs_reset(d) ? V_REJECT : V_PASS;
}

static int c_queue_select_out_of_range(struct vdev *d)
{
    int r = init(d, 1, 0, 0);
    if (r) {
        detail = r;
        return V_FAIL;
    }
    select_queue(d, 0xffff);
    uint16_t size;
    if (d->modern) {
        mmio_write16(d->common + C_QSIZE, 4);
        mmio_write32(d->common + C_QDESC, 0x1000);
        mmio_write16(d->common + C_QENABLE, 1);
        size = mmio_read16(d->common + C_QSIZE);
    } else {
        outl(d->io + L_PFN, 0x1234);
        size = inw(d->io + L_NUM);
    }
    if (size != 0) {
        detail = 0x48;
        return V_FAIL;
    }
    for (int q = 0; q < d->nq; q++)                       /* the real queues still work */
        if (setup_queue(d, q, 0)) {
            detail = 0x49;
            return V_FAIL;
        }
    set_status(d, get_status(d) | S_DRIVER_OK);
    int e = work(d);
    if (e) {
        detail = e;
        return needs_reset(d) ? V_REJECT : V_FAIL;
    }
    return V_PASS;
}

static int c_queue_rewritten_while_enabled(struct vdev *d)
{
    select_queue(d, dq(d));
    if (d->modern) {
        mmio_write32(d->common + C_QDESC, 0x1234000);
        mmio_write16(d->common + C_QSIZE, 2);
    } else {
        outl(d->io + L_PFN, 0x7ffff);
    }
    int e = work(d);                                      /* the old ring, or a refusal */
    if (e)
        return (needs_reset(d) || e == 0x32) ? V_REJECT : (detail = e, V_FAIL);
    return V_PASS;
}

static int c_blk_beyond_disk(struct vdev *d)
{
    int q = 0, data;
    struct vq *v = &d->q[q];
    build_request(d, v->desc, &data);
    ((uint32_t *)HDR(d))[3] = 0x80000000u;                /* sector 2^63 */
    publish(d, q, 0);
    if (!wait_used(d, q, POLL_LONG, 0))
        return needs_reset(d) ? V_REJECT : (detail = 0x4a, V_FAIL);
    if (*(uint8_t *)STATUS_BYTE(d) != 1) {                /* VIRTIO_BLK_S_IOERR */
        detail = 0x4b;
        return V_FAIL;
    }
    return V_PASS;
}

static int c_blk_no_status_byte(struct vdev *d)
{
    int q = 0, data;
    struct vq *v = &d->q[q];
    build_request(d, v->desc, &data);
    v->desc[1].flags = 0;                                 /* readable data, no status */
    v->desc[1].next = 0;
    publish(d, q, 0);
    return expect_refused(d, q);
}

static int c_readable_after_writable(struct vdev *d)
{
    int q = dq(d);
    struct vq *v = &d->q[q];
    v->desc[0] = (struct desc){DATA(d), 16, D_WRITE | D_NEXT, 1};
    v->desc[1] = (struct desc){DATA(d) + 16, 16, 0, 0};
    publish(d, q, 0);
    return expect_refused(d, q);
}

enum { ANY, MODERN_ONLY, BLK_ONLY };
struct case_def { const char *name; int (*fn)(struct vdev *); int fresh, only; };
/* fresh: the case starts from a device initialized the default way */
static const struct case_def cases[] = {
    {"avail_idx_jump", c_avail_idx_jump, 1},
    {"head_index_oob", c_head_oob, 1},
    {"descriptor_loop", c_desc_loop, 1},
    {"chain_wraps_queue", c_chain_wraps_queue, 1},
    {"indirect_oversized", c_indirect_oversized, 1},
    {"nested_indirect", c_nested_indirect, 1},
    {"indirect_not_negotiated", c_indirect_not_negotiated, 0},
    {"readable_after_writable", c_readable_after_writable, 1},
    {"buffer_outside_ram", c_buffer_outside_ram, 1},
    {"buffer_in_pci_hole", c_buffer_in_pci_hole, 1},
    {"buffer_wraps_2^64", c_buffer_wraps_2_64, 1},
    {"rings_outside_ram", c_rings_outside_ram, 0},
    {"readonly_config_write", c_readonly_config_write, 1},
    {"features_written_late", c_features_written_late, 0},
    {"features_not_offered", c_features_not_offered, 0, MODERN_ONLY},
    {"driver_ok_without_features_ok", c_driver_ok_without_features_ok, 0, MODERN_ONLY},
    {"notify_disabled_queue", c_notify_disabled_queue, 0},
    {"notify_bad_queue_index", c_notify_bad_queue_index, 1},
    {"msix_vector_out_of_range", c_msix_vector_out_of_range, 0},
    {"msix_table_garbage", c_msix_table_garbage, 1},
    {"status_isr_garbage", c_status_isr_garbage, 0},
    {"queue_select_out_of_range", c_queue_select_out_of_range, 0},
    {"queue_rewritten_while_enabled", c_queue_rewritten_while_enabled, 1},
    {"blk_beyond_disk", c_blk_beyond_disk, 1, BLK_ONLY},
    {"blk_no_status_byte", c_blk_no_status_byte, 1, BLK_ONLY},
};
#define NCASES ((int)(sizeof(cases) / sizeof(cases[0])))

static void report(struct vdev *d, const char *name, int v)
{
    puts("case ");
    puts(d->name);
    putc('/');
    puts(name);
    putc(' ');
    puts(vname[v]);
    if (v >= V_WEDGED || detail) {
        puts(" 0x");
        put_hex(detail, 2);
    }
    putc('\n');
    if (v >= V_WEDGED)
        bad = 1;
}

static void run_case(const struct case_def *c, struct vdev *d)
{
    detail = 0;
    int v;
    if ((c->only == MODERN_ONLY && !d->modern) || (c->only == BLK_ONLY && d->kind != BLK))
        return;                                           /* not for this device */
    if (d->dead) {                                        /* WEDGED earlier: not again */
        detail = 0x2f;
        report(d, c->name, V_WEDGED);
        return;
    }
    if (c->fresh) {
        int r = init_default(d);
        if (r) {
            detail = r;
            d->dead = 1;
            report(d, c->name, V_WEDGED);
            return;
        }
    }
    v = c->fn(d);
    if (v != V_FAIL) {
        /* every other device still works on the queue it already had */
        for (int k = 0; k < NDEV; k++) {
            struct vdev *o = &devs[k];
            if (o == d || o->dead)
                continue;
            int e = work(o);
            if (e) {
                detail = 0x80 | (k << 4) | (e & 0xf);
                o->dead = 1;
                v = V_WEDGED;
                break;
            }
        }
    }
    if (v != V_WEDGED) {
        int e = init_default(d);                          /* reset brings the target back */
        if (!e)
            e = work(d);
        if (e) {
            detail = e;
            d->dead = 1;
            v = V_WEDGED;
        }
    }
    report(d, c->name, v);
}

int main(void)
{
    for (int k = 0; k < NDEV; k++) {
        int r = probe(&devs[k], k);
        if (!r)
            r = init_default(&devs[k]);
        if (!r)
            r = work(&devs[k]);
        if (r) {
            puts("device ");
            puts(devs[k].name);
            puts(" unusable 0x");
            put_hex(r, 2);
            putc('\n');
            return 0x50 + k;
        }
        puts("device ");
        puts(devs[k].name);
        puts(" ok\n");
    }
    for (int c = 0; c < NCASES; c++)
        for (int k = 0; k < NDEV; k++)
            run_case(&cases[c], &devs[k]);
    puts("console lines ");
    put_hex(console_lines, 8);
    puts("\ndone\n");
    return bad ? 0x70 : VERDICT_PASS;
}
