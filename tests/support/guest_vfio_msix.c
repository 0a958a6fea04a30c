/*
 * A guest program (static, run from the test initramfs): take a PCI function through the
 * guest kernel's own vfio-pci, enable N MSI-X vectors with one eventfd each, ring the
 * function's doorbell for each vector in turn (BAR0 offset 0: write k -> raise message k,
 * the synthetic passthrough device of devicemodel/passthru/host.py), and report which
 * eventfd fired. Output lines, parsed by tests/integration/test_integration_vfio_user.py:
 *
 *   msix-count N          what VFIO_DEVICE_GET_IRQ_INFO says for the MSI-X index
 *   enabled N             N vectors enabled through VFIO_DEVICE_SET_IRQS
 *   vector K fired F      after ringing K: F = the eventfd that fired (-1: none in 5 s)
 *   error WHAT: ERRNO
 *
 * usage: vfio_msix <iommu group> <device, e.g. 0000:00:03.0> <vectors>
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/pci_regs.h>
#include <linux/vfio.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define MAX_VECTORS 32

static int fail(const char *what)
{
    printf("error %s: %s\n", what, strerror(errno));
    return 1;
}

static int region(int dev, unsigned index, struct vfio_region_info *info)
{
    memset(info, 0, sizeof(*info));
    info->argsz = sizeof(*info);
    info->index = index;
    return ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, info);
}

int main(int argc, char **argv)
{
    if (argc != 4)
        return fprintf(stderr, "usage: %s <group> <device> <vectors>\n", argv[0]), 2;
    int nvec = atoi(argv[3]);
    if (nvec < 1 || nvec > MAX_VECTORS)
        return fprintf(stderr, "vectors 1..%d\n", MAX_VECTORS), 2;

    int container = open("/dev/vfio/vfio", O_RDWR);
    if (container < 0)
        return fail("open /dev/vfio/vfio");
    char path[64];
    snprintf(path, sizeof(path), "/dev/vfio/%s", argv[1]);
    int group = open(path, O_RDWR);
    if (group < 0)
        return fail(path);
    struct vfio_group_status status = { .argsz = sizeof(status) };
    if (ioctl(group, VFIO_GROUP_GET_STATUS, &status) < 0)
        return fail("GROUP_GET_STATUS");
    if (!(status.flags & VFIO_GROUP_FLAGS_VIABLE)) {
        errno = EBUSY;
        return fail("group not viable");
    }
    if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container) < 0)
        return fail("GROUP_SET_CONTAINER");
    if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU) < 0 &&
        ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1_IOMMU) < 0)
        return fail("SET_IOMMU");
    int dev = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, argv[2]);
    if (dev < 0)
        return fail("GROUP_GET_DEVICE_FD");

    struct vfio_irq_info irq = { .argsz = sizeof(irq), .index = VFIO_PCI_MSIX_IRQ_INDEX };
    if (ioctl(dev, VFIO_DEVICE_GET_IRQ_INFO, &irq) < 0)
        return fail("GET_IRQ_INFO");
    printf("msix-count %u\n", irq.count);
    if ((int)irq.count < nvec)
        nvec = irq.count;

    /* memory decoding and bus mastering: a function may not send MSIs without it */
    struct vfio_region_info cfg, bar0;
    if (region(dev, VFIO_PCI_CONFIG_REGION_INDEX, &cfg) < 0)
        return fail("config region");
    if (region(dev, VFIO_PCI_BAR0_REGION_INDEX, &bar0) < 0)
        return fail("BAR0 region");
    uint16_t cmd;
    if (pread(dev, &cmd, 2, cfg.offset + PCI_COMMAND) != 2)
        return fail("read command");
    cmd |= PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
    if (pwrite(dev, &cmd, 2, cfg.offset + PCI_COMMAND) != 2)
        return fail("write command");

    int fds[MAX_VECTORS];
    char buf[sizeof(struct vfio_irq_set) + sizeof(fds)];
    struct vfio_irq_set *set = (struct vfio_irq_set *)buf;
    for (int i = 0; i < nvec; i++)
        fds[i] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    set->argsz = sizeof(*set) + nvec * sizeof(int);
    set->flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    set->index = VFIO_PCI_MSIX_IRQ_INDEX;
    set->start = 0;
    set->count = nvec;
    memcpy(set->data, fds, nvec * sizeof(int));
    if (ioctl(dev, VFIO_DEVICE_SET_IRQS, set) < 0)
        return fail("SET_IRQS MSI-X");
    printf("enabled %d\n", nvec);
    fflush(stdout);

    for (int k = 0; k < nvec; k++) {
        uint32_t doorbell = k;
        if (pwrite(dev, &doorbell, 4, bar0.offset) != 4)
            return fail("doorbell");
        struct pollfd pfd[MAX_VECTORS];
        for (int i = 0; i < nvec; i++)
            pfd[i] = (struct pollfd){ .fd = fds[i], .events = POLLIN };
        int fired = -1;
        if (poll(pfd, nvec, 5000) > 0) {
            for (int i = 0; i < nvec; i++) {
                uint64_t n;
                if ((pfd[i].revents & POLLIN) && read(fds[i], &n, 8) == 8 && fired < 0)
                    fired = i;
            }
        }
        printf("vector %d fired %d\n", k, fired);
        fflush(stdout);
    }
    return 0;
}
